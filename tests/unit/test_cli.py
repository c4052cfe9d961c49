import argparse

import pytest

from vllm_obtain.cli import build_parser, parse_engine_arg, settings_from


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
