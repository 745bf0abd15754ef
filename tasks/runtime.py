"""Starting Ray from the run's own params: a local Ray by default, a cluster by ``runtime.ray_address``; the
S3 endpoint reaches every worker through the job's runtime_env."""

from __future__ import annotations

import logging

from ganforge.tasks.params import RuntimeParams
from ganforge.tasks.storage import configure_s3

log = logging.getLogger("ganforge.runtime")


def init_ray(runtime: RuntimeParams) -> None:
    """Connect to (or start) Ray as ``runtime`` says; a Ray already started in this process is kept."""
    import ray

    env = configure_s3(runtime.s3_endpoint_url)  # this process, and (below) every Ray worker
    if ray.is_initialized():
        return
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": True}
    if runtime.ray_address:
        kwargs["address"] = runtime.ray_address
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    log.info("starting Ray: %s", runtime.ray_address or "local")
    ray.init(**kwargs)
