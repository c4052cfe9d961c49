import os
from pathlib import Path

from vllm_obtain.settings import Settings, platform_env_file, settings_table


def test_platform_config_file_names():
    assert platform_env_file("Darwin") == ".env.mac"
    assert platform_env_file("Linux") == ".env.linux"
    assert platform_env_file("Windows") == ".env.windows"


def test_defaults_match_the_documented_ones(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env file here
    settings = Settings()
    assert settings.port == 8001
    assert settings.model == []
    assert settings.engine == "auto"


def test_env_vars_with_prefix_override_the_platform_file(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / platform_env_file()).write_text("OBTAIN_PORT=9000\nOBTAIN_CTX_SIZE=2048\n")
    assert Settings().port == 9000
    monkeypatch.setenv("OBTAIN_PORT", "9100")
    settings = Settings()
    assert settings.port == 9100
    assert settings.ctx_size == 2048


def test_log_level_follows_the_mode():
    assert Settings(mode="dev").effective_log_level == "DEBUG"
    assert Settings(mode="prod").effective_log_level == "INFO"
    assert Settings(mode="prod", log_level="warning").effective_log_level == "WARNING"


def test_unit_tests_run_apart_from_the_developers_settings():
    assert not [name for name in os.environ if name.startswith("OBTAIN_")]
    assert not Path(platform_env_file()).exists()
    assert Settings() == Settings.model_construct(**{
        name: field.get_default(call_default_factory=True)
        for name, field in Settings.model_fields.items()
    })  # fmt: skip


def test_readme_configuration_table_is_the_one_settings_make():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = readme.index("| flag | env var | default | |")
    end = readme.index("<!-- end of settings table -->")
    assert readme[start:end].strip() == settings_table(), (
        "README's configuration table is out of date: paste in `python -m vllm_obtain.settings`"
    )


def test_ray_takes_an_address_auto_or_local_but_never_a_model_name():
    import pytest
    from pydantic import ValidationError

    for address in ("local", "auto", "10.0.0.1:6379", "ray://head:10001"):
        assert Settings(ray=address).ray == address
    for model in ("qwen-0.5b", "org/name:Q4_K_M", "./my.gguf"):
        with pytest.raises(ValidationError, match="name models before --ray"):
            Settings(ray=model)


def test_autoscaling_takes_a_replica_range():
    import pytest
    from pydantic import ValidationError

    from vllm_obtain.settings import replica_range

    assert replica_range("1:4") == (1, 4)
    for wrong in ("4", "0:2", "3:2", "a:b"):
        with pytest.raises(ValidationError, match="replica range"):
            Settings(autoscale=wrong)
