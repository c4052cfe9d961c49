"""The `vllm-obtain` command: serve, selftest, doctor, bench, models, pull, list, rm, ps; its
flags are made from the Settings fields."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from vllm_obtain import __version__
from vllm_obtain.cli_flags import (
    PULL_SETTINGS,
    add_settings_flags,
    add_storage_flags,
    overrides_from,
    settings_from,
)
from vllm_obtain.model_commands import list_installed, pull_command, remove_model, show_running
from vllm_obtain.settings import choices_of, flag_of


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vllm_obtain.wiring import configure_logging_for, create_server_app

    settings = settings_from(args)
    configure_logging_for(settings)
    if settings.ray is not None:
        from vllm_obtain.cluster.launcher import serve_on_ray

        return serve_on_ray(settings)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,  # RequestContextMiddleware writes one richer line per request
        # On SIGTERM uvicorn stops accepting, then lets responses in flight (streams too)
        # finish for this long before cancelling them; then the engines unload.
        "timeout_graceful_shutdown": settings.shutdown_timeout,
    }
    if settings.mode == "dev":
        export_for_reloader(args)
        src = os.path.dirname(os.path.dirname(__file__))
        uvicorn.run(
            "vllm_obtain.wiring:app_from_reloader",
            factory=True,
            reload=True,
            reload_dirs=[src],
            **common,
        )
        return 0
    failed = False

    def stop_on_load_failure() -> None:
        nonlocal failed
        failed = True
        server.should_exit = True

    app = create_server_app(settings, on_load_failure=stop_on_load_failure)
    server = uvicorn.Server(uvicorn.Config(app, **common))
    server.run()
    return 1 if failed else 0


def export_for_reloader(args: argparse.Namespace) -> None:
    """Hand the command line's settings to uvicorn's reloader, which builds the app anew in a
    child process (wiring.app_from_reloader): as JSON, so lists and dicts arrive whole."""
    from vllm_obtain.wiring import RELOADER_OVERRIDES_ENV

    os.environ[RELOADER_OVERRIDES_ENV] = json.dumps(overrides_from(args))


def selftest(args: argparse.Namespace) -> int:
    """Load the model and generate a few tokens: proves the engine runs on this machine."""
    from vllm_obtain.contract import GenerationRequest, SamplingParams
    from vllm_obtain.core.generation import stream_choice
    from vllm_obtain.wiring import build_registry

    async def run() -> int:
        registry = build_registry(settings_from(args))
        await registry.load_all()
        try:
            model = registry.loaded()[0]
            tokens = await model.chat_prompt_tokens([{"role": "user", "content": args.prompt}])
            request = GenerationRequest(
                "selftest", tuple(tokens), args.max_tokens, SamplingParams(temperature=0.0)
            )
            started, text, produced = time.perf_counter(), "", 0
            async for delta in stream_choice(model.engine, request, index=0, stops=()):
                text, produced = text + delta.text, delta.completion_tokens
            elapsed = time.perf_counter() - started
            print(f"{model.id} on {model.engine.name}: {produced} tokens in {elapsed:.2f}s")
            print(f"> {args.prompt}\n{text.strip()}")
            return 0 if produced > 0 else 1
        finally:
            await registry.unload_all()

    return asyncio.run(run())


def doctor(args: argparse.Namespace) -> int:
    """What this machine has, and which engine would serve which model, and why."""
    from vllm_obtain.doctor import print_report, system_report

    print_report(system_report(settings_from(args)))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Drive one or two OpenAI-compatible servers with concurrent streaming clients."""
    from vllm_obtain.bench import bench, plot

    urls = [args.base_url.rstrip("/")] + ([args.compare.rstrip("/")] if args.compare else [])
    report = asyncio.run(
        bench(
            urls,
            model=args.model,
            concurrency=[int(c) for c in args.concurrency.split(",")],
            requests_per_client=args.requests_per_client,
            max_tokens=args.max_tokens,
            warmup=args.warmup,
            temperature=args.temperature,
            seeded=args.seeded,
            names=args.names.split(",") if args.names else None,
        )
    )
    if args.plot:
        plot(report["results"], args.plot, title=args.title)
    print(report.pop("table"))
    if "ratios" in report:
        print("\nratios (first URL vs --compare; above 1: first is better)")
        for level, values in report["ratios"].items():
            print(f"  {level:>3} streams: {values}")
    print(f"\nthroughput vs one stream: {report['scaling_vs_one_stream']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
    errors = sum(r["errors"] for r in report["results"])
    return 1 if errors else 0


def list_models(args: argparse.Namespace) -> int:
    from vllm_obtain.weights.catalog import aliases

    for alias, description in aliases().items():
        print(f"{alias:28} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-obtain", description="A private, OpenAI-compatible LLM endpoint."
    )
    parser.add_argument("--version", action="version", version=f"vllm-obtain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="serve a model over the OpenAI API")
    selftest_cmd = commands.add_parser("selftest", help="load a model and generate a few tokens")
    doctor_cmd = commands.add_parser("doctor", help="what was detected, which engine serves what")
    for cmd in (serve_cmd, selftest_cmd, doctor_cmd):
        add_settings_flags(cmd)
    doctor_cmd.set_defaults(func=doctor)
    serve_cmd.set_defaults(func=serve)
    selftest_cmd.add_argument("--prompt", default="What is the capital of France?")
    selftest_cmd.add_argument("--max-tokens", type=int, default=16)
    selftest_cmd.set_defaults(func=selftest)

    bench_cmd = commands.add_parser("bench", help="load-test an OpenAI-compatible server")
    bench_cmd.add_argument("--base-url", default="http://127.0.0.1:8001", help="server to measure")
    bench_cmd.add_argument("--compare", help="a second server, measured the same way in turn")
    bench_cmd.add_argument("--model", default="smollm2-135m-instruct")
    bench_cmd.add_argument("--concurrency", default="1,16,64", help="comma-separated levels")
    bench_cmd.add_argument("--requests-per-client", type=int, default=2)
    bench_cmd.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    bench_cmd.add_argument("--warmup", type=int, default=2, help="unmeasured requests first")
    bench_cmd.add_argument("--temperature", type=float, default=0.7)
    bench_cmd.add_argument("--seeded", action="store_true", help="send a seed with each request")
    bench_cmd.add_argument("--names", help="labels for the servers, comma-separated")
    bench_cmd.add_argument("--json", help="also write the report here")
    bench_cmd.add_argument("--plot", help="draw tokens/s and TTFT against concurrency (PNG)")
    bench_cmd.add_argument("--title", default="", help="the plot's title")
    bench_cmd.set_defaults(func=run_bench)

    commands.add_parser("models", help="list model aliases").set_defaults(func=list_models)

    pull_cmd = commands.add_parser(
        "pull", help="download a model: an alias, org/name[:QUANT], a URL"
    )
    pull_cmd.add_argument(
        "name",
        help="an alias (vllm-obtain models), a Hugging Face repo org/name, org/name:Q4_K_M for "
        "one GGUF of it, or the http(s) URL of a .gguf file (#sha256=HEX checks it)",
    )
    pull_cmd.add_argument("--sha256", help="the file's expected sha256 (64 hex digits)")
    add_settings_flags(pull_cmd, only=PULL_SETTINGS)  # the guard of URL pulls, as serve's
    pull_cmd.set_defaults(func=pull_command)
    list_cmd = commands.add_parser("list", help="the installed models and the engine for each")
    list_cmd.add_argument(
        flag_of("engine"), dest="engine", default=None, choices=choices_of("engine")
    )
    list_cmd.set_defaults(func=list_installed)
    rm_cmd = commands.add_parser("rm", help="delete an installed model")
    rm_cmd.add_argument("name", help="its id, as vllm-obtain list shows it")
    rm_cmd.set_defaults(func=remove_model)
    for cmd in (pull_cmd, list_cmd, rm_cmd):
        add_storage_flags(cmd)
    ps_cmd = commands.add_parser("ps", help="the models a running server has loaded")
    ps_cmd.add_argument("--base-url", help="the server (default: http://127.0.0.1:PORT)")
    ps_cmd.add_argument("--api-key", help="its API key (default: the first of OBTAIN_API_KEYS)")
    ps_cmd.set_defaults(func=show_running)
    return parser


def command_names(parser: argparse.ArgumentParser) -> set[str]:
    """The parser's commands (serve, doctor, ...)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def with_default_command(argv: Sequence[str]) -> list[str]:
    """`python run.py --mode dev ...` is `vllm-obtain serve --mode dev ...`; a command of its
    own (doctor, bench...) or a top-level option is kept as given."""
    known = command_names(build_parser()) | {"-h", "--help", "--version"}
    return list(argv) if argv and argv[0] in known else ["serve", *argv]


def main(argv: Sequence[str] | None = None) -> int:
    from vllm_obtain.cluster import RayNotInstalledError
    from vllm_obtain.contract import EngineNotInstalledError
    from vllm_obtain.weights.catalog import ModelResolutionError
    from vllm_obtain.wiring import KeysFileError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (
        ModelResolutionError,
        EngineNotInstalledError,
        RayNotInstalledError,
        KeysFileError,
    ) as exc:
        print(f"vllm-obtain: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a flag, OBTAIN_* variable or .env line out of range
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        print(f"vllm-obtain: invalid settings: {problems}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
