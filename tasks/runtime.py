"""Starting Ray from the run's own params: a local Ray by default, a cluster by ``runtime.ray_address``; the
S3 endpoint reaches every worker through the job's runtime_env."""

from __future__ import annotations

import logging
import os

from ganforge.tasks.params import RuntimeParams
from ganforge.tasks.secrets import redact
from ganforge.tasks.storage import configure_s3

log = logging.getLogger("ganforge.runtime")


def init_ray(runtime: RuntimeParams) -> None:
    """Connect to (or start) Ray as ``runtime`` says; a Ray already started in this process is kept."""
    import ray

    env = configure_s3(runtime.s3_endpoint_url)  # this process, and (below) every Ray worker
    if ray.is_initialized():
        return
    from ganforge.tasks.console import verbose

    # Ray's own INFO lines and the workers' output stay out of the terminal unless --verbose; workers log to
    # the run folder (tasks/console.py), Ray's logs are in its session folder (/tmp/ray/session_latest/logs)
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": verbose(),
                    "logging_level": logging.INFO if verbose() else logging.WARNING}
    if runtime.ray_address:
        kwargs["address"] = runtime.ray_address
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if runtime.ray_address:
        log.info("connecting to Ray at %s (from %s)", redact(runtime.ray_address), runtime.source("ray_address"))
    else:  # the dashboard's processes double a local start's time on a laptop: only when asked for
        kwargs["include_dashboard"] = runtime.ray_dashboard
        log.info("starting a local Ray%s", " (dashboard: http://127.0.0.1:8265)" if runtime.ray_dashboard else "")
    ray.init(**kwargs)


def apply_prefect_api_url(runtime: RuntimeParams) -> None:
    """Point Prefect (which reads PREFECT_API_URL when it is imported) at runtime.prefect_api_url, when that
    is set: a value in params wins over the environment, PREFECT_API_URL over the default (Prefect's own
    local server)."""
    _applied.append(True)
    url = runtime.prefect_api_url
    if url and os.environ.get("PREFECT_API_URL") != url:
        os.environ["PREFECT_API_URL"] = url
    if url:
        log.info("Prefect API: %s (from %s)", redact(url), runtime.source("prefect_api_url"))


_applied: list[bool] = []


def prefect_api_applied() -> bool:
    """Whether this process has applied a run's params to PREFECT_API_URL (the CLI does, before Prefect loads)."""
    return bool(_applied)


def _reach(url: str, timeout_s: float) -> str | None:
    """None when something answers at ``url`` (any HTTP status: the service is up), else why not."""
    import urllib.error
    import urllib.request

    scheme, _, rest = url.partition("://")  # probe without userinfo (a raw "@" or "/" in it confuses urllib);
    at = rest.rfind("@", 0, rest.find("?") if "?" in rest else len(rest))  # an answer of 401 still counts as up
    url = f"{scheme}://{rest[at + 1:]}"
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()  # noqa: S310 - the user's own service URL
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return str(reason) or type(reason).__name__
    return None


def _tcp(host: str, port: int, timeout_s: float) -> str | None:
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    return None


def check_services(runtime: RuntimeParams, *, mlflow: bool = True, ray: bool = True, s3: bool = True,
                   prefect: bool = False, timeout_s: float = 5.0) -> None:
    """Before any work: every configured remote service answers, or ServiceError names the first that does not
    (a pipeline used to train for an hour and then spend minutes retrying an unreachable tracking server).
    Local defaults (sqlite, a local Ray, AWS, Prefect's local server) need no check."""
    from urllib.parse import urlsplit

    from ganforge.tasks.errors import ServiceError

    checks: list[tuple[str, str, str | None]] = []
    uri = runtime.mlflow_tracking_uri
    if mlflow and uri.startswith(("http://", "https://")):
        checks.append(("MLflow tracking server", uri, _reach(f"{uri.rstrip('/')}/health", timeout_s)))
    if prefect and runtime.prefect_api_url:
        checks.append(("Prefect API", runtime.prefect_api_url,
                       _reach(f"{runtime.prefect_api_url.rstrip('/')}/health", timeout_s)))
    if s3 and runtime.s3_endpoint_url:
        checks.append(("S3 endpoint", runtime.s3_endpoint_url, _reach(runtime.s3_endpoint_url, timeout_s)))
    addr = runtime.ray_address
    if ray and addr and addr not in ("auto", "local"):
        parts = urlsplit(addr if "://" in addr else f"ray://{addr}")
        if parts.hostname and parts.port:
            checks.append(("Ray cluster", addr, _tcp(parts.hostname, parts.port, timeout_s)))
    for what, where, problem in checks:
        if problem is not None:
            raise ServiceError(f"{what} {redact(where)} cannot be reached ({problem}); start it, or point "
                               f"runtime.{_FIELD[what]} elsewhere")


_FIELD = {"MLflow tracking server": "mlflow_tracking_uri", "Prefect API": "prefect_api_url",
          "S3 endpoint": "s3_endpoint_url", "Ray cluster": "ray_address"}
