"""Where the engine replicas say how they are: each reports itself every second, the
ingress reads them all. Ray Serve routes a call to one replica of a deployment, so the
ingress could not ask every replica itself; a deployment of its own (one replica, no CPU)
survives what Serve survives and goes with the application.
"""

from __future__ import annotations

import dataclasses
import time

from vllm_obtain.contract import ReplicaReport

REPORT_SECONDS = 1.0
# A replica silent this long is shown as unreachable (Ray is replacing it, or its node went);
# after DROP_SECONDS it is forgotten.
UNREACHABLE_SECONDS = 3 * REPORT_SECONDS
DROP_SECONDS = 30.0


class ReplicaBoard:
    """The last report of every replica, by deployment."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[str, float, ReplicaReport]] = {}

    def report(self, deployment: str, report: ReplicaReport) -> None:
        self._reports[report.replica_id] = (deployment, time.monotonic(), report)

    def forget(self, replica_id: str) -> None:
        """A replica shutting down in order says so, rather than going silent."""
        self._reports.pop(replica_id, None)

    def reports(self, deployment: str) -> list[ReplicaReport]:
        """The replicas of `deployment` heard from lately; the silent ones as unreachable."""
        now = time.monotonic()
        found = []
        for replica_id, (owner, heard, report) in list(self._reports.items()):
            silent = now - heard
            if silent > DROP_SECONDS:
                del self._reports[replica_id]
            elif owner == deployment:
                if silent > UNREACHABLE_SECONDS:
                    report = dataclasses.replace(report, state="unreachable")
                found.append(report)
        return found
