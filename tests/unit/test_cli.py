import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_obtain.cli import (
    build_parser,
    export_for_reloader,
    parse_engine_arg,
    settings_from,
    with_default_command,
)
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
    assert settings.model == "qwen-0.5b"
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
