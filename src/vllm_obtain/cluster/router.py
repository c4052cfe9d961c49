"""Routing on an engine deployment (Ray Serve's request-router API): a request whose prompt
shares a prefix with earlier ones goes to the replica that was sent it, whose engine then
reuses its cached KV instead of computing the prefix again; unless that replica is full, then
the least loaded one.

It runs in the caller's process (the ingress), beside the DeploymentHandle: Ray's HTTP proxy
never sees the request body, so a prompt can only be routed here. Serve ranks what
`choose_replicas` returns: it takes the least loaded replica of the first rank that has room
(fewer requests than its max_ongoing_requests) and falls back to the next rank. A router
that raises leaves the request hanging, so every hook here catches everything and falls back
to plain least-loaded routing.

Serve ships this module to the callers by value (cloudpickled, globals and all), so it logs
through the standard `logging` (a logger pickles by name), which our processes route to loguru.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from vllm_obtain.cluster.prefix_index import PrefixIndex
from vllm_obtain.contract import GenerationRequest

logger = logging.getLogger(__name__)
# The keyword a retried request carries: replicas it failed on, not to be chosen again.
AVOID_KWARG = "avoid"
# A cached prefix shorter than this is not worth sending a request to a busier replica for:
# recomputing it costs a few milliseconds.
MIN_CACHED_TOKENS = 64


def prompt_of(request: PendingRequest) -> tuple[int, ...] | None:
    """The prompt tokens of a generation request (tokenize and describe calls have none)."""
    for arg in request.args:
        if isinstance(arg, GenerationRequest):
            return arg.prompt_tokens
    return None


def unique_id(replica: RunningReplica) -> str:
    return str(replica.replica_id.unique_id)


class PrefixAwareRouter(RequestRouter):
    """Prefix affinity first, then the least loaded replica (Serve's own choice in a rank)."""

    def initialize_state(self, min_cached_tokens: int = MIN_CACHED_TOKENS, **_: Any) -> None:
        self._index = PrefixIndex()
        self._min_cached_tokens = min_cached_tokens

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        try:
            return self.rank(candidate_replicas, pending_request)
        except Exception as exc:
            logger.exception("prefix routing failed; routing by load: %s", exc)
            return [list(candidate_replicas)]

    def rank(
        self, candidates: Sequence[RunningReplica], request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        """The holders of the longest cached prefix, then the others; or all as one rank."""
        if request is None:
            return [list(candidates)]
        # Every replica is in what we return: once they are all full, wait before asking again.
        request.routing_context.should_backoff = True
        avoid = set(request.kwargs.get(AVOID_KWARG) or ())
        usable = [r for r in candidates if unique_id(r) not in avoid] or list(candidates)
        prompt = prompt_of(request)
        if prompt is None:
            return [usable]
        holders, cached = self._index.longest_match(prompt, {unique_id(r) for r in usable})
        if cached < self._min_cached_tokens:
            return [usable]
        first = [r for r in usable if unique_id(r) in holders]
        rest = [r for r in usable if unique_id(r) not in holders]
        return [first, rest] if rest else [first]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        try:
            prompt = prompt_of(pending_request)
            if prompt is not None:
                self._index.record(str(replica_id.unique_id), prompt)
        except Exception as exc:
            logger.exception("prefix routing could not record a request: %s", exc)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        try:
            self._index.forget(str(replica_id.unique_id))
        except Exception as exc:
            logger.exception("prefix routing could not forget a replica: %s", exc)
