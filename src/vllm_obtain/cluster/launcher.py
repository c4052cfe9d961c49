"""`vllm-obtain serve --ray`: join a Ray cluster (or start a local one), run the application
on Ray Serve, and on SIGTERM or Ctrl-C take it down: the application, and Serve and Ray
themselves when this process started them (never a cluster's Serve it only joined: other
applications may live there).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from loguru import logger

from vllm_obtain.cluster import require_ray
from vllm_obtain.logs import adopt_loggers
from vllm_obtain.settings import LOCAL_RAY, Settings

# Ray's own loggers in this process, which print in a format of their own.
RAY_LOGGERS = ("ray", "ray.serve", "ray.data", "ray.tune", "ray.train")

# The local Ray's object store: replicas pass token chunks, small enough to travel inline;
# Ray's default (30 % of RAM) would reserve shared memory for nothing.
LOCAL_OBJECT_STORE_BYTES = 300 * 1024 * 1024
# Serve's proxy gives up on a request after this much more than our own request timeout, so
# our 504 (and a stream's error event) always comes first.
PROXY_TIMEOUT_MARGIN_SECONDS = 30.0
# Deleting the application: its replicas' graceful shutdown, then Serve's own bookkeeping.
TAKE_DOWN_MARGIN_SECONDS = 15.0

# HAProxy holds about 2.5 descriptors per connection (client and server sides, and a pipe
# pair for every fourth, which it splices) and refuses to start when the open-files limit
# cannot hold them all. Serve asks for 4096 connections: 10,276 descriptors, more than the
# 4096 that containers and CI runners commonly allow.
SERVE_HAPROXY_MAXCONN = 4096
HAPROXY_FDS_PER_CONNECTION = 2.5
HAPROXY_SPARE_FDS = 128  # listeners, pollers, the stats socket, health checks
HAPROXY_MIN_CONNECTIONS = 64


def connect(address: str, *, log_level: str = "INFO", proxy: str = "haproxy") -> bool:
    """Join the cluster at `address` ('auto': the one this machine belongs to) or start a
    local Ray without the dashboard ('local'); True when this process started it."""
    # Our users keep their data to themselves; Ray reports usage unless told not to.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve  # noqa: F401  (its logger, adopted below, is made on import)

    adopt_loggers(RAY_LOGGERS, level=log_level)

    # Replicas log JSON lines to their own files (and Ray's worker logs); relayed to this
    # console they would come prefixed, no longer JSON.
    common: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address == LOCAL_RAY:
        # Read by the Serve processes this Ray starts, which inherit our environment.
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if proxy == "haproxy" else "0"
        # Serve's proxy (and HAProxy's ingress) drains for 30 s before it stops, for load
        # balancers to notice; with a Ray of our own there is none to notice.
        os.environ.setdefault("RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S", "1")
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")  # HAProxy
        if proxy == "haproxy":
            fit_haproxy_to_open_files()
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            **common,
        )
        return True
    ray.init(address=address, **common)
    return False


def haproxy_connection_limit(open_files: int) -> int:
    """The most connections HAProxy can hold within `open_files` descriptors (Serve's own
    figure when they fit)."""
    fitting = int((open_files - HAPROXY_SPARE_FDS) / HAPROXY_FDS_PER_CONNECTION)
    return max(HAPROXY_MIN_CONNECTIONS, min(SERVE_HAPROXY_MAXCONN, fitting))


def fit_haproxy_to_open_files() -> None:
    """Raise this process's open-files limit to its hard limit (the local Ray, and HAProxy
    under it, inherit it), and ask HAProxy for no more connections than that holds; a
    RAY_SERVE_HAPROXY_MAXCONN of the user's own is theirs to keep."""
    try:
        import resource
    except ImportError:  # Windows, where Serve runs its Python proxy
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = SERVE_HAPROXY_MAXCONN * 3  # ample for Serve's own figure
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-files limit to {}: {}", target, exc)
    if "RAY_SERVE_HAPROXY_MAXCONN" in os.environ:
        return
    connections = haproxy_connection_limit(soft)
    os.environ["RAY_SERVE_HAPROXY_MAXCONN"] = str(connections)
    if connections < SERVE_HAPROXY_MAXCONN:
        logger.warning(
            "HAProxy will hold {} connections at most: the open-files limit is {} "
            "(raise it, `ulimit -Hn` or systemd's LimitNOFILE, for Serve's {})",
            connections,
            soft,
            SERVE_HAPROXY_MAXCONN,
        )


def start_serve(settings: Settings) -> None:
    """Serve's proxy on our host and port, on the head node only: one URL, as on one box."""
    from ray import serve
    from ray.serve.config import HTTPOptions, ProxyLocation

    from vllm_obtain.cluster.application import serve_logging

    serve.start(
        proxy_location=ProxyLocation.HeadOnly,
        http_options=HTTPOptions(
            host=settings.host,
            port=settings.port,
            request_timeout_s=settings.request_timeout + PROXY_TIMEOUT_MARGIN_SECONDS,
        ),
        logging_config=serve_logging(settings),
    )


def proxy_url(settings: Settings) -> str:
    """Where Serve's proxy listens: ours, unless Serve already ran on the cluster with its own
    (the first serve.start there decides; Serve keeps the HTTP options in its client)."""
    from ray.serve.context import _get_global_client

    asked = f"http://{settings.host}:{settings.port}"
    try:
        client = _get_global_client()
        http = client.http_config if client is not None else None
    except Exception:  # Serve's private client moved: say what we asked for
        return asked
    return f"http://{http.host}:{http.port}" if http is not None else asked


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def serve_on_ray(settings: Settings) -> int:
    """Run until SIGTERM or Ctrl-C; 1 when the application could not start."""
    require_ray()
    from ray import serve

    from vllm_obtain.cluster.application import APP_NAME, build_application, cluster_models
    from vllm_obtain.hardware import detect_platform

    assert settings.ray is not None
    models = cluster_models(settings, detect_platform())
    started_ray = connect(
        settings.ray, log_level=settings.effective_log_level, proxy=settings.ray_proxy
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if not serving:  # still starting: abandon serve.run's wait
            raise KeyboardInterrupt
        stop.set()

    serving = False
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        start_serve(settings)
        app = build_application(settings, models, cluster_gpus=cluster_gpus())
        started = time.perf_counter()
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except Exception as exc:  # a replica that cannot start (weights, engine) fails it all
            logger.opt(exception=exc).critical("the application could not start: {}", exc)
            return 1
        serving = True
        logger.info(
            "serving {} on Ray Serve at {} (up in {:.1f}s)",
            ", ".join(m.id for m in models),
            proxy_url(settings),
            time.perf_counter() - started,
        )
        while not stop.wait(1.0):
            pass
        logger.info("stopping: the application, then what this process started")
        return 0
    finally:
        take_down(started_ray, within=settings.shutdown_timeout + TAKE_DOWN_MARGIN_SECONDS)


def take_down(started_ray: bool, *, within: float) -> None:
    """The application always; Ray too (and Serve with it) when this process started it.
    Deleting the application waits for responses in flight (--shutdown-timeout); past
    `within` seconds it is given up: Ray's own processes may have had the signal too (a
    terminal's Ctrl-C, systemd's default KillMode) and no longer answer."""
    import ray
    from ray import serve

    from vllm_obtain.cluster.application import APP_NAME

    def delete() -> None:
        try:
            serve.delete(APP_NAME)
            logger.info("the application is down")
        except Exception as exc:
            logger.opt(exception=exc).error("taking the application down failed: {}", exc)

    deleting = threading.Thread(target=delete, name="delete-application", daemon=True)
    deleting.start()
    deleting.join(timeout=within)
    if deleting.is_alive():
        logger.error("the application did not go down within {:.0f}s; leaving it", within)
    if started_ray:  # Serve's controller and proxy go with the Ray this process started
        ray.shutdown()
        logger.info("Ray is down")
