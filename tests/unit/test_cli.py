import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants as hf_constants

from tests.unit.test_inventory import make_hub_repo
from vllm_obtain.cli import build_parser, export_for_reloader, main, with_default_command
from vllm_obtain.cli_flags import parse_engine_arg, settings_from
from vllm_obtain.hardware import choose_engine, detect_platform
from vllm_obtain.model_commands import human_bytes, until
from vllm_obtain.settings import Settings, flag_of
from vllm_obtain.wiring import RELOADER_OVERRIDES_ENV, reloader_settings

ROOT = Path(__file__).resolve().parents[2]


def test_engine_args_are_read_as_json_when_they_are_json():
    assert parse_engine_arg("tensor_parallel_size=2") == ("tensor_parallel_size", 2)
    assert parse_engine_arg("enforce-eager=true") == ("enforce_eager", True)
    assert parse_engine_arg("dtype=bfloat16") == ("dtype", "bfloat16")


def test_malformed_engine_arg_is_refused():
    with pytest.raises(argparse.ArgumentTypeError):
        parse_engine_arg("no-equals-sign")


def test_flags_become_settings_and_unset_flags_leave_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        ["serve", "qwen-0.5b", "--port", "9000", "--engine", "vllm", "--vllm-arg", "max_num_seqs=8"]
    )
    settings = settings_from(args)
    assert settings.model == ["qwen-0.5b"]
    assert settings.port == 9000
    assert settings.engine == "vllm"
    assert settings.vllm_args == {"max_num_seqs": 8}
    assert settings.host == "127.0.0.1"


def test_run_py_mode_flag_is_a_serve_option():
    args = build_parser().parse_args(["serve", "--mode", "dev"])
    assert args.mode == "dev"


def test_production_flags_become_settings(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv = ["serve", "--api-key", "k1", "--api-key", "k2", "--cors-origin", "*", "--auth-metrics"]
    argv += ["--max-queue", "4", "--request-timeout", "30", "--engine-isolation", "none"]
    settings = settings_from(build_parser().parse_args(argv))
    assert settings.api_keys == ["k1", "k2"]
    assert settings.cors_origins == ["*"]
    assert settings.auth_metrics is True
    assert settings.auth_health is False
    assert settings.max_queue == 4
    assert settings.request_timeout == 30
    assert settings.engine_isolation == "none"


def test_api_keys_from_the_environment_are_comma_separated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OBTAIN_API_KEYS", "sk-a, sk-b")
    settings = settings_from(build_parser().parse_args(["serve"]))
    assert settings.api_keys == ["sk-a", "sk-b"]


def test_every_setting_has_a_flag_that_sets_it():
    """The flags are made from the Settings fields: one each, under the documented name."""
    parser = build_parser()
    serve = next(
        action.choices["serve"]
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    flags = {option for action in serve._actions for option in action.option_strings}
    for name in Settings.model_fields:
        if name != "model":
            assert flag_of(name) in flags, name
    assert {"--api-key", "--cors-origin", "--vllm-arg", "--no-auth-health"} <= flags


def test_dev_mode_hands_lists_and_dicts_to_the_reloader_whole(monkeypatch, tmp_path):
    """The reloader's child rebuilds the settings; lists and dicts once arrived as Python
    reprs (str()) that no parser reads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RELOADER_OVERRIDES_ENV, "{}")  # restored after the test
    argv = ["serve", "--mode", "dev", "--api-key", "k1", "--api-key", "k2", "--port", "9000"]
    argv += ["--cors-origin", "https://app.example", "--vllm-arg", "max_num_seqs=8"]
    argv += ["--vllm-arg", "enforce_eager=true", "--auth-metrics"]
    args = build_parser().parse_args(argv)
    export_for_reloader(args)
    reloaded = reloader_settings()
    assert reloaded.api_keys == ["k1", "k2"]
    assert reloaded.cors_origins == ["https://app.example"]
    assert reloaded.vllm_args == {"max_num_seqs": 8, "enforce_eager": True}
    assert reloaded.auth_metrics is True
    assert (reloaded.port, reloaded.mode) == (9000, "dev")
    assert reloaded == settings_from(args)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["doctor"], ["doctor"]),
        (["bench", "--concurrency", "1"], ["bench", "--concurrency", "1"]),
        (["selftest"], ["selftest"]),
        (["--version"], ["--version"]),
        (["--mode", "dev"], ["serve", "--mode", "dev"]),
        (["qwen-0.5b"], ["serve", "qwen-0.5b"]),
        ([], ["serve"]),
    ],
)
def test_run_py_serves_by_default_and_passes_every_command_through(argv, expected):
    assert with_default_command(argv) == expected


def test_run_py_doctor_reports_the_machine_instead_of_serving_a_model_named_doctor(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBTAIN_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("system ")
    assert "smollm2-135m-instruct" in done.stdout
    ray_line = next(line for line in done.stdout.splitlines() if line.startswith("cluster"))
    assert "ray serve" in ray_line  # its version, or how to install it


# --- pull, list, rm, ps ---------------------------------------------------------------------


def storage(tmp_path: Path) -> list[str]:
    return ["--models-dir", str(tmp_path / "models"), "--cache-dir", str(tmp_path / "cache")]


def test_list_shows_each_installed_model_with_its_format_size_engine_and_source(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "Local-Q4_0.gguf").write_bytes(b"G" * 2_500_000)
    assert main(["list", *storage(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "FORMAT", "SIZE", "ENGINE", "SOURCE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    engine, _ = choose_engine(detect_platform(), "gguf")
    assert rows["local-q4_0"] == ["local-q4_0", "gguf", "2", "MB", engine, "models"]
    assert rows["smollm2-135m-instruct"][1:4] == ["alias", "98", "MB"]
    assert rows["smollm2-135m-instruct"][-1] == "alias"


def test_rm_deletes_a_pulled_model_and_refuses_the_embedded_one_and_unknown_names(tmp_path, capsys):
    make_hub_repo(tmp_path / "cache", "org/Tiny-GGUF", {"tiny-Q4_1.gguf": b"g" * 10})
    assert main(["rm", "org/tiny-gguf:q4_1", *storage(tmp_path)]) == 0
    assert "removed org/Tiny-GGUF:Q4_1" in capsys.readouterr().out
    assert not (tmp_path / "cache" / "huggingface" / "models--org--Tiny-GGUF").exists()

    assert main(["rm", "org/Tiny-GGUF:Q4_1", *storage(tmp_path)]) == 2
    assert "is not installed" in capsys.readouterr().err
    assert main(["rm", "smollm2-135m-instruct", *storage(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-obtain: ") and "cannot be removed" in err


def test_pull_prints_the_id_to_send_and_a_failed_pull_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    make_hub_repo(tmp_path / "cache", "org/Tiny-GGUF", {"tiny-Q4_1.gguf": b"g" * 10})
    assert main(["pull", "org/Tiny-GGUF:Q4_1", *storage(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "org/Tiny-GGUF:Q4_1"
    assert main(["pull", "org/Tiny-GGUF:Q8_0", *storage(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("vllm-obtain: org/Tiny-GGUF has no")
    assert main(["pull", "not a model name", *storage(tmp_path)]) == 2


def test_loaded_models_are_shown_with_their_time_left(capsys):
    now = time.time()
    listing = {
        "object": "list",
        "data": [
            {"id": "qwen-0.5b", "state": "loaded", "engine": "llama.cpp", "format": "alias",
             "size_bytes": 400_000_000, "memory_bytes": 520_000_000, "last_used": now,
             "expires_at": now + 240},
            {"id": "smollm2-135m-instruct", "state": "loaded", "engine": "vllm",
             "memory_bytes": 2_100_000_000, "last_used": None, "expires_at": None},
            {"id": "org/Big-GGUF:Q4_K_M", "state": "available", "engine": None,
             "memory_bytes": None, "last_used": None, "expires_at": None},
        ],
    }  # fmt: skip
    with admin_server(listing, api_key="sk-test") as (base, seen):
        assert main(["ps", "--base-url", base, "--api-key", "sk-test"]) == 0
        assert seen == ["Bearer sk-test"]
        assert main(["ps", "--base-url", base]) == 2
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "ENGINE", "MEMORY", "UNTIL"]
    assert lines[1].split() == ["qwen-0.5b", "loaded", "llama.cpp", "520", "MB", "in", "4",
                                "minutes"]  # fmt: skip
    assert lines[2].split() == ["smollm2-135m-instruct", "loaded", "vllm", "2.1", "GB", "never"]
    assert len(lines) == 3  # the available (unloaded) model is not shown
    assert "HTTP 401" in err and "--api-key" in err


def test_ps_against_no_server_exits_2(capsys):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["ps", "--base-url", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_time_left_reads_as_people_say_it():
    assert until(None, 0) == "never"
    assert until(100, 100) == "now"
    assert until(30, 0) == "in 30 seconds"
    assert until(3600, 0) == "in 1 hour"
    assert human_bytes(98_000_000) == "98 MB"
    assert human_bytes(4_700_000_000) == "4.7 GB"


@contextlib.contextmanager
def admin_server(listing: dict[str, Any], api_key: str) -> Iterator[tuple[str, list[str]]]:
    """A stand-in for the server's GET /admin/models, behind an API key."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            if auth != f"Bearer {api_key}":
                self.send_error(401)
                return
            seen.append(auth)
            body = json.dumps(listing).encode()
            self.send_response(200 if self.path == "/admin/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    finally:
        server.shutdown()
        server.server_close()


def test_ray_alone_means_a_local_ray_and_a_model_may_come_first():
    assert settings_from(build_parser().parse_args(["serve", "--ray"])).ray == "local"
    args = build_parser().parse_args(["serve", "my-model", "--ray", "auto", "--replicas", "2"])
    settings = settings_from(args)
    assert (settings.model, settings.ray, settings.replicas) == (["my-model"], "auto", 2)


def test_ray_without_ray_serve_installed_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from vllm_obtain import cluster

    real = importlib.util.find_spec
    monkeypatch.setattr(
        cluster.importlib.util,
        "find_spec",
        lambda name, *a: None if name.split(".")[0] == "ray" else real(name, *a),
    )
    assert main(["serve", "--ray", "--embedding-model", "none"]) == 2
    assert "./install.sh --ray" in capsys.readouterr().err


def test_the_base_server_never_imports_ray():
    """Building the single-box app (and parsing every command) leaves Ray unimported: a
    base install has none, and importing it costs seconds."""
    probe = (
        "import sys\n"
        "from vllm_obtain.cli import build_parser\n"
        "from vllm_obtain.cli_flags import settings_from\n"
        "from vllm_obtain.wiring import create_server_app\n"
        "args = build_parser().parse_args(['serve', '--embedding-model', 'none'])\n"
        "settings = settings_from(args)\n"
        "create_server_app(settings)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"
