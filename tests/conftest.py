"""Shared fixtures: small real shard sets (digits, synthetic) built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ganforge.tasks.params import DataParams  # noqa: E402
from ganforge.tasks.shard import shard  # noqa: E402


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """Real scikit-learn digits at 16x16, several train shards + a val split."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    shard("digits", out, DataParams(resolution=16, shard_size=400, workers=1), progress=False)
    return out


@pytest.fixture(scope="session")
def digits32_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits32") / "shards"
    shard("digits", out, DataParams(resolution=32, shard_size=500, workers=1), progress=False)
    return out


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with room for 2 training workers plus Ray Train's own actors, per test module."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
