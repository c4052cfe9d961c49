"""The web page at / on the scripted engine: served from the package, open without a key (it
holds none), every asset local, --no-ui, and the system report the dashboard reads. The page
itself runs in a real browser in tests/integration/test_web_ui.py."""

from __future__ import annotations

import re

import pytest

from tests.api_helpers import assert_error, make_client
from tests.scripted_engine import ScriptedEngine
from vllm_obtain.api.app import create_app
from vllm_obtain.api.ui import WEB_DIR
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import api_config

KEYS = Settings(api_keys=["sk-page"])
ASSETS = sorted(p for p in WEB_DIR.rglob("*") if p.suffix in (".js", ".css", ".html"))


def test_the_page_is_served_at_the_root_with_the_labels_people_and_tests_use():
    with make_client(ScriptedEngine()) as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert '<label for="message" class="visually-hidden">Message</label>' in page
    assert '<label for="model">Model</label>' in page
    assert re.search(r"<button[^>]*>Send</button>", page)
    assert re.search(r"<button[^>]*>Stop</button>", page)


@pytest.mark.parametrize("asset", ["app.js", "chat.js", "style.css", "vendor/marked.esm.js"])
def test_the_pages_assets_are_served_as_what_they_are_and_revalidated(asset: str):
    with make_client(ScriptedEngine()) as client:
        response = client.get(f"/ui/{asset}")
    assert response.status_code == 200
    kind = "text/css" if asset.endswith(".css") else "javascript"
    assert kind in response.headers["content-type"]
    assert response.headers["cache-control"] == "no-cache"


def test_every_module_the_page_imports_is_shipped_in_the_package():
    """Offline: nothing is fetched from the internet, and every import resolves to a file."""
    for asset in ASSETS:
        text = asset.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)=["']https?://""", text), asset
        for target in re.findall(r"""^import .*?from ["'](.+?)["'];""", text, re.M | re.S):
            assert not target.startswith(("http:", "https:", "//")), (asset, target)
            assert (asset.parent / target).resolve().is_file(), (asset, target)


def test_the_page_and_its_assets_need_no_key_but_the_api_still_does():
    with make_client(ScriptedEngine(), KEYS) as client:
        assert client.get("/").status_code == 200
        assert client.get("/ui/app.js").status_code == 200
        assert_error(client.get("/v1/models"), 401, None, "invalid_api_key")
        assert_error(client.get("/admin/system"), 401, None, "invalid_api_key")
        assert_error(client.get("/v1"), 401, None, "invalid_api_key")  # no path slips through


def test_without_the_page_the_root_points_at_the_api():
    with make_client(ScriptedEngine(), Settings(ui=False)) as client:
        response = client.get("/")
        assert response.status_code == 200
        assert response.json()["api"] == "/v1"
        assert client.get("/ui/app.js").status_code == 404


def test_the_system_report_is_served_as_given_and_missing_is_a_404():
    report = {"system": "Linux", "choices": [{"model": "m", "engine": "llama.cpp", "why": "x"}]}
    with make_client(ScriptedEngine()) as client:
        assert_error(client.get("/admin/system"), 404, None, "not_found")  # none given
        client.app.state.system_report = lambda: report
        assert client.get("/admin/system").json() == report


def test_the_servers_system_report_comes_from_doctor():
    from vllm_obtain.wiring import create_server_app

    app = create_server_app(Settings(embedding_model="none"))
    report = app.state.system_report()
    assert {"system", "engines", "choices", "ray_serve"} <= set(report)
    assert report is app.state.system_report()  # probed once


def test_an_app_without_a_system_report_still_builds():
    app = create_app(api_config(Settings()), registry=ModelRegistry([]))
    assert app.state.system_report is None


def test_the_pages_polling_and_files_are_logged_quietly_but_admin_actions_are_not():
    from vllm_obtain.api.middleware import is_quiet

    for path in ("/", "/ui/app.js", "/admin/models", "/admin/system", "/health", "/metrics"):
        assert is_quiet("GET", path), path
    for method, path in [("POST", "/admin/models/m/load"), ("POST", "/admin/pull"),
                         ("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:  # fmt: skip
        assert not is_quiet(method, path), path
