"""The soak's 3-minute version (benchmarks/soak.py): one llama.cpp server under mixed load with
keys and rate limits, two models swapping, hostile requests, an engine SIGKILLed at 1 minute
and the whole server SIGKILLed at 2 minutes and started again; every criterion must hold.

It runs the benchmark as a script (its own server, its own temporary folder) and reads its
JSON report; the hour-long version is the same command with --minutes 60."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
MINUTES = 3
# The load, then stragglers (up to the hang timeout), the restart and the final checks.
WALL_TIMEOUT_S = MINUTES * 60 + 600


def failures(report: dict) -> list[str]:
    """Each failed criterion with what the report says about it."""
    explained = {
        "no_unexplained_outcome": report["unexplained_examples"][:10],
        "no_hang": [r for r in report["unexplained_examples"] if r["failure"] == "hang"][:5],
        "faults_injected_and_recovered": report["faults"],
        "rss_flat_after_warmup": [g for g in report["growth"] if g["metric"].startswith("rss")],
        "open_files_flat_after_warmup": [
            g for g in report["growth"] if g["metric"].startswith("fds")
        ],
        "store_sound_after_server_kill": [
            f["details"] for f in report["faults"] if f["kind"] == "server_kill"
        ],
        "stored_responses_all_there_at_end": report["final"],
        "stored_responses_private_to_their_key": report["final"]["stored_over_http"],
        "stored_though_client_left_after_completed": report["final"],
        "no_engine_left_behind": report["final"],
        "second_model_swapped": report["second_model"],
    }
    return [
        f"{name}: {json.dumps(explained.get(name, ''), indent=1)[:3000]}"
        for name, ok in report["criteria"].items()
        if not ok
    ]


def test_three_minute_soak_with_engine_and_server_kills_meets_every_criterion(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (./install.sh)")
    report_path = tmp_path / "soak.json"
    command = [
        sys.executable, str(SOAK), "--minutes", str(MINUTES), "--port", str(free_port()),
        "--workdir", str(tmp_path / "soak"), "--json", str(report_path),
        "--plot", str(tmp_path / "soak.png"),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=WALL_TIMEOUT_S)
    assert report_path.exists(), (
        f"no report; the soak said:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
    )
    report = json.loads(report_path.read_text())
    print(run.stdout)  # the summary tables, shown by pytest -rA or on failure
    assert not failures(report), "\n".join(failures(report))
    assert run.returncode == 0, run.stdout[-3000:]
    kinds = {kind.removeprefix("hostile:") for kind in report["by_kind"]}
    assert {"chat_stream", "responses_stream", "chain", "tools", "json_schema"} <= kinds
    assert [f["kind"] for f in report["faults"]] == ["engine_kill", "server_kill"]
