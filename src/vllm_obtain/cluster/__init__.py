"""Past one machine: the server on a Ray Serve cluster (`vllm-obtain serve --ray`).

An ingress deployment runs our FastAPI app; each model is an engine deployment of replicas,
each owning a supervised engine process, reached from the ingress through a streaming
DeploymentHandle behind the same engine contract a single box uses (RemoteEngine). Requests
are routed on the engine deployment by prompt prefix (PrefixAwareRouter).

Only this package imports Ray, and only when `--ray` is asked for: importing this module
itself does not.
"""

from __future__ import annotations

import importlib.util

from vllm_obtain.hardware import RAY_INSTALL_HINT, ray_serve_version

__all__ = ["RAY_INSTALL_HINT", "RayNotInstalledError", "ray_serve_version", "require_ray"]


class RayNotInstalledError(RuntimeError):
    """`--ray` without Ray Serve installed; the message says how to install it."""


def require_ray() -> None:
    """Raise RayNotInstalledError unless Ray Serve can be imported."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise RayNotInstalledError(
            f"--ray needs Ray Serve, which is not installed: {RAY_INSTALL_HINT}"
        )
