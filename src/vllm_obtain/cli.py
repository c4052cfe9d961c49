"""The `vllm-obtain` command: serve, selftest, models."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from vllm_obtain import __version__
from vllm_obtain.settings import Settings

# CLI flag -> Settings field; a flag left out leaves env vars and .env files in charge.
SERVE_FLAGS: dict[str, dict[str, Any]] = {
    "--host": {"help": "address to listen on (default 127.0.0.1; 0.0.0.0 for all)"},
    "--port": {"type": int, "help": "port (default 8001)"},
    "--engine": {
        "choices": ["auto", "llama.cpp", "vllm", "mlx"],
        "help": "inference engine (default auto: chosen from the hardware and the model)",
    },
    "--served-model-name": {"help": "model id clients use (default: the alias or file name)"},
    "--embedding-model": {
        "help": "embedding model for /v1/embeddings: alias, .gguf or BERT folder; 'none' for "
        "none (default all-minilm-l6-v2)"
    },
    "--ctx-size": {"type": int, "help": "context length in tokens (default: the model's own)"},
    "--threads": {"type": int, "help": "CPU threads (default: all cores)"},
    "--batch-size": {"type": int, "help": "llama.cpp: tokens per decoding step (default 512)"},
    "--parallel": {"type": int, "help": "llama.cpp: sequences decoded together (default 16)"},
    "--kv-cache-tokens": {"type": int, "help": "llama.cpp: KV cache cells (default: automatic)"},
    "--gpu-layers": {"type": int, "help": "layers offloaded to a GPU if present (-1: all)"},
    "--chat-template": {"help": "Jinja chat template file to use instead of the model's"},
    "--kv-cache-gib": {"type": int, "help": "vLLM on CPU: KV cache size in whole GiB"},
    "--max-batch": {"type": int, "help": "MLX: sequences decoded together (default 32)"},
    "--mode": {"choices": ["dev", "prod"], "help": "prod: JSON logs; dev: readable logs, reload"},
    "--log-level": {"help": "DEBUG, INFO, WARNING... (default DEBUG in dev, INFO in prod)"},
    "--api-key": {
        "dest": "api_keys",
        "action": "append",
        "metavar": "KEY",
        "help": "require 'Authorization: Bearer KEY' (repeatable; env OBTAIN_API_KEYS=k1,k2)",
    },
    "--auth-health": {"action": "store_const", "const": True, "help": "/health needs a key too"},
    "--auth-metrics": {"action": "store_const", "const": True, "help": "/metrics needs a key too"},
    "--cors-origin": {
        "dest": "cors_origins",
        "action": "append",
        "metavar": "ORIGIN",
        "help": "allow browsers from this origin (repeatable; '*' for any; default: none)",
    },
    "--max-queue": {"type": int, "help": "requests waiting per model before 429 (default 256)"},
    "--request-timeout": {"type": float, "help": "seconds a request may take (default 600)"},
    "--max-body-mb": {"type": float, "help": "largest request body in MiB (default 8)"},
    "--max-prompt-tokens": {"type": int, "help": "longest prompt accepted (default: context)"},
    "--max-tokens-limit": {"type": int, "help": "largest max_tokens allowed (default: context)"},
    "--engine-isolation": {
        "choices": ["process", "none"],
        "help": "process (default): the engine runs in a child restarted after a crash",
    },
    "--engine-hang-timeout": {
        "type": float,
        "help": "seconds a busy engine may go without progress before it is restarted (120)",
    },
    "--engine-max-restarts": {"type": int, "help": "restarts allowed in 10 minutes (default 5)"},
    "--shutdown-timeout": {
        "type": float,
        "help": "on SIGTERM, seconds streams in flight get to finish (default 30)",
    },
    "--log-prompts": {
        "action": "store_const",
        "const": True,
        "help": "include prompt text in request log lines (off by default: it is private)",
    },
    "--models-dir": {"help": "where local models live (default models/)"},
    "--cache-dir": {"help": "downloads and converted weights (default cache/)"},
    "--logs-dir": {"help": "rotating log files (default logs/)"},
}


def settings_from(args: argparse.Namespace) -> Settings:
    fields = [
        options.get("dest", flag[2:].replace("-", "_")) for flag, options in SERVE_FLAGS.items()
    ]
    overrides = {field: getattr(args, field) for field in fields}
    overrides["model"] = args.model
    if args.vllm_arg:
        overrides["vllm_args"] = dict(parse_engine_arg(a) for a in args.vllm_arg)
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def parse_engine_arg(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value), the value read as JSON when it is JSON (2, true, "auto")."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip().replace("-", "_"), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip().replace("-", "_"), raw


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vllm_obtain.logs import configure_logging_for

    settings = settings_from(args)
    configure_logging_for(settings)
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
        # The reloader re-imports the app in a child process: hand it the settings as env vars.
        for key, value in settings.model_dump(exclude_unset=True).items():
            os.environ[f"OBTAIN_{key.upper()}"] = str(value)
        src = os.path.dirname(os.path.dirname(__file__))
        uvicorn.run(
            "vllm_obtain.api.app:create_app_from_env",
            factory=True,
            reload=True,
            reload_dirs=[src],
            **common,
        )
        return 0
    from vllm_obtain.api.app import create_app

    failed = False

    def stop_on_load_failure() -> None:
        nonlocal failed
        failed = True
        server.should_exit = True

    app = create_app(settings, on_load_failure=stop_on_load_failure)
    server = uvicorn.Server(uvicorn.Config(app, **common))
    server.run()
    return 1 if failed else 0


def selftest(args: argparse.Namespace) -> int:
    """Load the model and generate a few tokens: proves the engine runs on this machine."""
    from vllm_obtain.core.generation import stream_choice
    from vllm_obtain.core.requests import GenerationRequest, SamplingParams
    from vllm_obtain.serving import build_registry

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
    from vllm_obtain.catalog import aliases, model_format
    from vllm_obtain.engines.base import EngineNotInstalledError
    from vllm_obtain.platform import ENGINES, choose_engine, detect_platform

    settings = settings_from(args)
    info = detect_platform()
    memory = f"{info.memory_gib:.1f} GiB" if info.memory_gib else "unknown"
    print(f"system      {info.system} {info.machine}, {info.cpu_count} CPUs, {memory} memory")
    print(f"cpu         {' '.join(info.cpu_features) or '-'}")
    print(f"apple       {'Apple Silicon' if info.apple_silicon else 'no'}")
    gpus = ", ".join(f"{g.vendor} {g.name}" for g in info.gpus)
    print(f"gpus        {gpus or 'none (no nvidia-smi / ROCm device)'}")
    for engine in ENGINES:
        print(f"engine      {engine:10} {'installed' if engine in info.installed_engines else '-'}")
    names = [settings.model] if settings.model else list(aliases())
    print()
    for name in names:
        try:
            engine, why = choose_engine(
                info, model_format(name, settings.models_dir), settings.engine
            )
            print(f"{name:28} -> {engine:10} {why}")
        except (LookupError, EngineNotInstalledError) as exc:
            print(f"{name:28} -> cannot serve: {exc}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Drive one or two OpenAI-compatible servers with concurrent streaming clients."""
    from vllm_obtain.bench import bench

    urls = [args.base_url.rstrip("/")] + ([args.compare.rstrip("/")] if args.compare else [])
    report = asyncio.run(
        bench(
            urls,
            model=args.model,
            concurrency=[int(c) for c in args.concurrency.split(",")],
            requests_per_client=args.requests_per_client,
            max_tokens=args.max_tokens,
            warmup=args.warmup,
        )
    )
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
    from vllm_obtain.catalog import aliases

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
        cmd.add_argument("model", nargs="?", help="alias, .gguf path, HF directory or models/ name")
        for flag, options in SERVE_FLAGS.items():
            cmd.add_argument(flag, **options)
        cmd.add_argument(
            "--vllm-arg",
            action="append",
            metavar="KEY=VALUE",
            help="vLLM engine argument, repeatable (tensor_parallel_size=2, dtype=bfloat16 ...)",
        )
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
    bench_cmd.add_argument("--json", help="also write the report here")
    bench_cmd.set_defaults(func=run_bench)

    commands.add_parser("models", help="list model aliases").set_defaults(func=list_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from vllm_obtain.catalog import ModelResolutionError
    from vllm_obtain.engines.base import EngineNotInstalledError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ModelResolutionError, EngineNotInstalledError) as exc:
        print(f"vllm-obtain: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
