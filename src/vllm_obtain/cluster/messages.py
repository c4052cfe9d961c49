"""What crosses between the ingress and an engine replica, besides the contract's own data:
plain dataclasses Ray pickles as they are. Errors travel as runtime.wire's ErrorReport, an
answer rather than a raised exception, so a refused request is still a 400 at the ingress
and an engine restarting in one replica still a 503 (worth a retry elsewhere); only a replica
that is itself lost shows as one of Ray's errors."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_obtain.contract import ModelInfo
from vllm_obtain.runtime.wire import ErrorReport


@dataclass(frozen=True, slots=True)
class ReplicaDescription:
    """A replica's loaded model and what its engine offers (the same on every replica)."""

    info: ModelInfo
    supported_params: frozenset[str]
    max_running: int  # sequences its engine decodes at once


@dataclass(frozen=True, slots=True)
class ReplicaFault:
    """A call that failed in a replica's engine, and which replica it was."""

    error: ErrorReport
    replica_id: str

    @property
    def retryable(self) -> bool:
        """Whether another replica may succeed: this one's engine is down, not the request."""
        return self.error.kind == "unavailable"


@dataclass(frozen=True, slots=True)
class ClusterModel:
    """A model the cluster serves: the id clients name, the name its replicas load it by, the
    engine chosen for it (by `serve --ray`, so every replica agrees), its deployment."""

    id: str
    name: str
    engine: str
    deployment: str
