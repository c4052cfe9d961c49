"""Logging through loguru: readable lines in dev, compact JSON lines in prod, a rotating file
in logs/. uvicorn and other libraries log through the standard `logging` module; one
intercepting handler sends their records to the same sinks. Imports nothing of ours, so the
engine process can use it too."""

from __future__ import annotations

import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any

from loguru import logger


class InterceptHandler(logging.Handler):
    """Forward standard-library log records to loguru (the recipe from loguru's docs)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = inspect.currentframe(), 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame, depth = frame.f_back, depth + 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def _json_line(record: Any) -> str:
    """One flat JSON object per line: what log shippers (Loki, ELK, CloudWatch) index."""
    entry = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "logger": record["name"],
        **{k: v for k, v in record["extra"].items() if not k.startswith("_")},
    }
    if record["exception"] is not None:
        entry["exception"] = repr(record["exception"].value)
    record["extra"]["_json"] = json.dumps(entry, default=str)
    return "{extra[_json]}\n"


LOG_FILE = "vllm-obtain.log"


def configure_logging(
    *, level: str, json_lines: bool, logs_dir: Path | None, file_name: str = LOG_FILE
) -> None:
    """Sinks for this process: stderr, and `file_name` in `logs_dir` (each process that logs
    to files has a name of its own: rotation is not shared between processes)."""
    logger.remove()
    fmt: Any = _json_line if json_lines else None
    options: dict[str, Any] = {"level": level, "backtrace": False, "diagnose": False}
    if fmt is not None:
        options["format"] = fmt
    logger.add(sys.stderr, **options)
    if logs_dir is not None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        logger.add(logs_dir / file_name, rotation="50 MB", retention=5, enqueue=True, **options)
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
    adopt_loggers(("uvicorn", "uvicorn.error", "uvicorn.access", "fastapi"), level=level)


def adopt_loggers(names: tuple[str, ...], *, level: str) -> None:
    """Send these libraries' loggers (which may have handlers of their own: Ray's do) to our
    sinks only. Their records below our level would only be dropped by loguru; and uvicorn
    wraps the app in a per-message tracing middleware (work on every SSE chunk) when its
    level is TRACE."""
    standard_level = logging.getLevelName(level.upper())
    for name in names:
        named = logging.getLogger(name)
        named.handlers = [InterceptHandler()]
        named.propagate = False
        named.setLevel(standard_level if isinstance(standard_level, int) else logging.DEBUG)
