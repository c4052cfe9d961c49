"""The web playground and dashboard at `/`: a page and its ES modules, shipped in the package
(api/web/, vendored libraries included), so it works with no network. The page carries no
secrets: it calls the same API as any client, with the key the person types in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from vllm_obtain import __version__

WEB_DIR = Path(__file__).with_name("web")
# Where the page's assets are served (relative links in index.html, so a reverse proxy may
# put the whole server under a path prefix).
ASSETS_PATH = "/ui"
# The page is small and changes with each release; browsers revalidate it (ETag) every time.
REVALIDATE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


class RevalidatedFiles(StaticFiles):
    """Static files that browsers check (ETag) before using again: an upgraded server's page
    must not run last release's modules."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(REVALIDATE)
        return response


@router.get("/")
async def index(request: Request) -> Response:
    if not request.app.state.config.ui:
        return JSONResponse(
            {
                "object": "server",
                "name": "vllm-obtain",
                "version": __version__,
                "api": "/v1",
                "message": "An OpenAI-compatible API; the web page is off (--no-ui).",
            }
        )
    return FileResponse(WEB_DIR / "index.html", headers=REVALIDATE)


def mount_assets(app: FastAPI) -> None:
    """The page's scripts, styles and vendored libraries, under /ui/."""
    app.mount(ASSETS_PATH, RevalidatedFiles(directory=WEB_DIR), name="ui")
