"""A soak's verdict: each request's outcome judged against the faults injected, memory and open
files compared like with like between faults, the criteria, a plot and a Markdown summary.

Outcomes are judged after the run, when every fault's window is known: a 5xx, a stream's error
event or a cut connection is expected only from a request that overlapped a fault on what it
used (the killed engine's model, or any request while the server was down); a 429 only with
Retry-After; a hostile request only with the status its kind must get. Anything else, and any
request that waited longer than the hang timeout for a byte, is unexplained.
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from soak_server import SECOND, Sample

# What each hostile request must get (403s and 415 as the server documents them).
HOSTILE_STATUS: dict[str, set[int]] = {
    "bad_json": {400, 422},
    "huge_body": {413},
    "cross_origin": {403},
    "evil_host": {403},
    "wrong_key": {401},
    "no_key": {401},
    "user_key_on_admin": {403},
    "other_keys_response": {404},
    "text_plain_with_origin": {400, 403, 415},
    "invalid_params": {400},
}
# After a fault is over (the engine or server ready again), requests still count as its own
# for this long: /health is polled twice a second and a request may have just been refused.
FAULT_MARGIN_S = 3.0
# Memory and open files are compared only this long after a fault has recovered.
SETTLE_S = 15.0
GROWTH_LIMIT_PCT = 5.0


@dataclass
class Record:
    """One request as the client saw it. `failure` says how it did not get a full answer:
    "" (it did), "status" (non-2xx), "event" (an error event in its stream), "cut" (the stream
    ended without its last event or an error), "transport" (a connection error), "hang" (no
    byte for the hang timeout), "check" (a 200 whose content broke what was asked)."""

    kind: str
    model: str
    key: str
    started: float
    ended: float = 0.0
    status: int | None = None
    failure: str = ""
    error: str = ""
    retry_after: float | None = None
    tokens: int = 0
    cancelled: bool = False


@dataclass
class Fault:
    kind: str  # "engine_kill" or "server_kill"
    at: float
    model: str = ""  # the killed engine's model (engine_kill)
    pid: int = 0
    recovered: float | None = None  # when its model (or the server) was ready again
    details: dict[str, Any] = field(default_factory=dict)

    def window(self, end: float) -> tuple[float, float]:
        return self.at, (self.recovered if self.recovered is not None else end) + FAULT_MARGIN_S


def judge(record: Record, faults: list[Fault], end: float) -> tuple[str, str]:
    """(verdict, cause): verdict "ok", "expected" or "unexplained"."""
    if not record.failure:
        return "ok", "cancelled mid-stream" if record.cancelled else "answered"
    status = f"{record.status} " if record.status is not None else ""
    what = f"{record.failure} {status}{record.error}".strip()
    if record.failure == "hang":
        return "unexplained", f"hang: {record.error}"
    if record.status == 429:
        if record.retry_after is None:
            return "unexplained", f"429 without Retry-After: {record.error}"
        return "expected", f"429 {record.error or 'rate limited'}"
    hostile = record.kind.startswith("hostile:") and record.failure == "status"
    if hostile and record.status in HOSTILE_STATUS[record.kind.removeprefix("hostile:")]:
        return "expected", f"{record.status} {record.kind}"
    fault = overlapping_fault(record, faults, end)
    if fault is not None and fault.kind == "server_kill":
        return "expected", f"server killed: {what}"
    if fault is not None and record.failure == "cut":
        return "unexplained", f"stream cut without an error event (engine killed): {what}"
    five_hundred = record.failure == "status" and 500 <= (record.status or 0) < 600
    if fault is not None and (five_hundred or record.failure == "event"):
        return "expected", f"engine killed: {what}"
    return "unexplained", f"{record.kind}: {what}"


def overlapping_fault(record: Record, faults: list[Fault], end: float) -> Fault | None:
    """The server kill the request overlapped, else an engine kill of the model it used."""
    overlapping = [
        f for f in faults if record.started <= f.window(end)[1] and record.ended >= f.window(end)[0]
    ]
    for fault in overlapping:
        if fault.kind == "server_kill":
            return fault
    return next((f for f in overlapping if f.model == record.model), None)


def windows(
    samples: list[Sample], faults: list[Fault], start: float, end: float
) -> list[list[Sample]]:
    """The samples between faults, from `start` (the end of the warm-up) to `end`, leaving out
    each fault until SETTLE_S after it recovered; windows of fewer than 3 samples are dropped."""
    cuts = sorted(
        (f.at, (f.recovered if f.recovered is not None else end) + SETTLE_S) for f in faults
    )
    spans, begin = [], start
    for at, settled in cuts:
        if at > begin:
            spans.append((begin, at))
        begin = max(begin, settled)
    spans.append((begin, end))
    found = [[s for s in samples if a <= s.t < b and s.up and s.known] for a, b in spans]
    return [window for window in found if len(window) >= 3]


def comparisons(
    found: list[list[Sample]], faults: list[Fault], metric: str
) -> list[dict[str, Any]]:
    """Growth of a metric's median from the first window to the last, over the whole run and
    within each life of the server process (a server kill starts a new one)."""
    kills = [f.at for f in faults if f.kind == "server_kill"]

    def life(window: list[Sample]) -> int:
        return sum(window[0].t > at for at in kills)

    pairs = [(found[0], found[-1], "run")] if len(found) >= 2 else []
    for number in sorted({life(w) for w in found}):
        lived = [w for w in found if life(w) == number]
        if len(lived) >= 2 and (lived[0], lived[-1], "run") not in pairs:
            pairs.append((lived[0], lived[-1], f"server life {number + 1}"))
    return [compare(first, last, metric, scope) for first, last, scope in pairs]


def compare(first: list[Sample], last: list[Sample], metric: str, scope: str) -> dict[str, Any]:
    before = statistics.median(getattr(s, metric) for s in first)
    after = statistics.median(getattr(s, metric) for s in last)
    return {
        "metric": metric,
        "scope": scope,
        "from_s": [round(first[0].t), round(first[-1].t)],
        "to_s": [round(last[0].t), round(last[-1].t)],
        "from_median": round(before, 1),
        "to_median": round(after, 1),
        "growth_pct": round(100 * (after - before) / before, 2) if before else 0.0,
    }


def second_model_swaps(samples: list[Sample]) -> dict[str, int]:
    """Loads (distinct engine processes) and unloads (gone while the server stayed up)."""
    pids = {s.engines[SECOND] for s in samples if SECOND in s.engines}
    known = [s for s in samples if s.up and s.known]
    unloads = sum(
        SECOND in before.engines and SECOND not in after.engines
        for before, after in itertools.pairwise(known)
    )
    return {"loads": len(pids), "unloads": unloads}


def tally(records: list[Record], faults: list[Fault], end: float) -> dict[str, Any]:
    """Requests by kind and verdict, every non-2xx by status and cause, the unexplained."""
    verdicts: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    causes: Counter[str] = Counter()
    unexplained: list[dict[str, Any]] = []
    for record in records:
        verdict, cause = judge(record, faults, end)
        verdicts[verdict] += 1
        by_kind.setdefault(record.kind, Counter())[verdict] += 1
        if record.failure:
            causes[f"{verdict}: {cause}"] += 1
        if verdict == "unexplained" and len(unexplained) < 50:
            unexplained.append({**asdict(record), "cause": cause})
    return {
        "requests": len(records),
        "answered": verdicts["ok"],
        "expected_failures": verdicts["expected"],
        "unexplained": verdicts["unexplained"],
        "hangs": sum(r.failure == "hang" for r in records),
        "by_kind": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
        "non_2xx_by_cause": dict(causes.most_common()),
        "unexplained_examples": unexplained,
    }


def tokens_per_second(records: list[Record], samples: list[Sample]) -> None:
    """Fill each sample's tokens/s: tokens of the requests that ended since the sample before."""
    ends = sorted((r.ended, r.tokens) for r in records if r.tokens)
    previous, index = 0.0, 0
    for sample in samples:
        total = 0
        while index < len(ends) and ends[index][0] <= sample.t:
            total += ends[index][1]
            index += 1
        sample.tokens_per_s = round(total / (sample.t - previous), 1) if sample.t > previous else 0
        previous = sample.t


def plot(
    samples: list[Sample], faults: list[Fault], warmup_s: float, end_s: float, path: Path
) -> None:
    """Tokens/s, RSS and open files over time (gaps while the server is down); the warm-up,
    engine kills, the server kill (and its down time) and the end of the load marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t / 60 for s in samples]

    def series(metric: str) -> list[float]:
        return [float(getattr(s, metric)) if s.up else float("nan") for s in samples]

    figure, (speed, memory, files) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    speed.plot(minutes, [s.tokens_per_s for s in samples], lw=0.5, color="0.6", label="per sample")
    speed.plot(minutes, smoothed(samples, SMOOTHING_S), lw=1.5, label=f"{SMOOTHING_S:.0f} s mean")
    speed.set_ylabel("generated tokens/s")
    memory.plot(minutes, series("rss_total"), lw=1, label="server and all engines")
    memory.plot(minutes, series("rss_base"), lw=1, label="server + pinned + embedding engines")
    memory.plot(minutes, series("rss_server"), lw=1, label="server process")
    memory.set_ylabel("RSS (MiB)")
    files.plot(minutes, series("fds_total"), lw=1, label="server and all engines")
    files.plot(minutes, series("fds_server"), lw=1, label="server process")
    files.set_ylabel("open files")
    files.set_xlabel("minutes")
    for axes in (speed, memory, files):
        axes.axvspan(0, warmup_s / 60, color="0.9", lw=0)
        axes.axvline(end_s / 60, color="0.3", lw=1, ls=":")
        mark_faults(axes, faults)
        axes.grid(alpha=0.3)
        axes.legend(loc="upper right", fontsize=8)
    speed.set_title(
        "soak: grey, warm-up; dashed, engine SIGKILL; red, server SIGKILL until ready again; "
        "dotted, end of the load",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


SMOOTHING_S = 30.0


def smoothed(samples: list[Sample], seconds: float) -> list[float]:
    """Each sample's tokens/s averaged with those of the `seconds` before it."""
    means = []
    for sample in samples:
        recent = [s.tokens_per_s for s in samples if sample.t - seconds < s.t <= sample.t]
        means.append(sum(recent) / len(recent))
    return means


def mark_faults(axes: Any, faults: list[Fault]) -> None:
    for fault in faults:
        if fault.kind == "engine_kill":
            axes.axvline(fault.at / 60, color="tab:orange", ls="--", lw=1)
        else:
            until = fault.recovered if fault.recovered is not None else fault.at
            axes.axvspan(fault.at / 60, until / 60, color="tab:red", alpha=0.25, lw=0)
            axes.axvline(fault.at / 60, color="tab:red", lw=1)


def markdown(report: dict[str, Any]) -> str:
    """The figures as RESULTS.md shows them: one summary table, then non-2xx by cause."""
    growth = {c["metric"]: c for c in report["growth"] if c["scope"] == "run"}

    def pct(metric: str) -> str:
        c = growth.get(metric)
        return f"{c['from_median']} -> {c['to_median']} ({c['growth_pct']:+.1f} %)" if c else "-"

    lines = [
        "| minutes | requests | answered | expected non-2xx | unexplained | hangs | tok/s "
        "| RSS base (MiB) | open files (server) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {report['minutes']} | {report['requests']} | {report['answered']} "
        f"| {report['expected_failures']} | **{report['unexplained']}** | {report['hangs']} "
        f"| {report['tokens_per_s']} | {pct('rss_base')} | {pct('fds_server')} |",
        "",
        "| non-2xx and errors, by cause | requests |",
        "|---|---|",
        *(f"| {cause} | {n} |" for cause, n in report["non_2xx_by_cause"].items()),
        "",
        "| criterion | |",
        "|---|---|",
        *(
            f"| {name} | {'ok' if ok else '**FAILED**'} |"
            for name, ok in report["criteria"].items()
        ),
    ]
    return "\n".join(lines)
