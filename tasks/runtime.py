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
