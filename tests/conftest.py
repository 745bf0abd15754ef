"""Shared fixtures: small real shard sets (digits, synthetic) built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# `make test` runs the suite on pytest-xdist workers (most of it waits on Ray, Prefect and MLflow starting up,
# so a second worker nearly halves the wall time on 2 cores). Each worker gets its own Prefect home: two
# local Prefect servers on one sqlite database would step on each other's migrations. Set before Prefect loads.
if "PREFECT_HOME" not in os.environ:
    import tempfile

    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"ganforge-prefect-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")

# Test-only families (tests/plugins: a module + the dist-info that declares its `ganforge.families` entry
# points), visible to this process, to Ray workers and to CLI / `dvc repro` subprocesses, as an installed
# package of the user's would be. Done before ganforge is imported: the family registry is read once.
PLUGINS = Path(__file__).parent / "plugins"
sys.path.insert(0, str(PLUGINS))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH")) if p)

from ganforge.tasks.params import DataParams  # noqa: E402
from ganforge.tasks.shard import shard  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each worker starts its own local Ray with 4 CPUs)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first, so the longest ones start at once on the workers and the quick ones
    fill in around them (a long test left for the end would run alone)."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 next((i for i, m in enumerate(LONGEST) if item.path.name == m), len(LONGEST))))


# the modules whose single tests run longest (DVC's whole pipelines, the sweep, VQ-GAN's three stages on Ray)
LONGEST = ("test_dvc.py", "test_sweep.py", "test_vqgan.py", "test_train_ray.py", "test_s3.py", "test_readme.py")


_USER_MLFLOW_ENV = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


@pytest.fixture(autouse=True)
def _tracking_uri_stays_in_its_test():
    """mlflow.set_tracking_uri / set_registry_uri export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI; a later
    test's subprocess would take them for the user's choice (the registry one even beats a script's own
    set_tracking_uri), so they are put back after each test."""
    yield
    for k, v in _USER_MLFLOW_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """Real scikit-learn digits at 16x16, several train shards + a val split."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    shard("digits", out, DataParams(resolution=16, shard_size=400, workers=1), progress=False)
    return out


@pytest.fixture(scope="session")
def digits_labelled_shards(tmp_path_factory) -> Path:
    """Digits at 16x16 with a labelled subset of 10 train images per class (semi-supervised families)."""
    out = tmp_path_factory.mktemp("digits-labelled") / "shards"
    shard("digits", out, DataParams(resolution=16, shard_size=400, workers=1, labelled_per_class=10), progress=False)
    return out


@pytest.fixture(scope="session")
def shards8(tmp_path_factory) -> Path:
    """60 synthetic shapes at 8x8 in shards of 20 (a val split of 12): the fault probes' tiny data."""
    out = tmp_path_factory.mktemp("shards8") / "shards"
    shard("synthetic:shapes:60", out, DataParams(resolution=8, shard_size=20, val_fraction=0.2, workers=1),
          progress=False)
    return out


@pytest.fixture(scope="session")
def digits32_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits32") / "shards"
    shard("digits", out, DataParams(resolution=32, shard_size=500, workers=1), progress=False)
    return out


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> Path:
    """Two unpaired domains at 16x16: crops of scikit-learn's temple photo (A, 48) and of its flower (B, 40)."""
    out = tmp_path_factory.mktemp("photos") / "shards"
    shard("photo:china:48", out, DataParams(source_b="photo:flower:40", resolution=16, shard_size=20, workers=1,
                                            val_fraction=0.25), progress=False)
    return out


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with room for 2 training workers plus Ray Train's own actors, per test module."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def stop_and_resume(config: dict, tmp_path: Path, stop: int, total: int) -> tuple[str, str, str]:
    """Run a stage in-process to ``total`` steps, and again stopped at ``stop`` and resumed from that checkpoint
    to ``total``: (uninterrupted final checkpoint, stopped checkpoint, resumed final checkpoint)."""
    import torch

    from ganforge.tasks.loop import LocalSession, run_stage

    torch.set_num_threads(1)
    full = LocalSession(tmp_path / "full")
    run_stage({**config, "max_steps": total}, full)
    part = LocalSession(tmp_path / "part")
    run_stage({**config, "max_steps": stop}, part)
    resumed = LocalSession(tmp_path / "resumed", resume_from=part.checkpoints[-1])
    run_stage({**config, "max_steps": total}, resumed)
    return full.checkpoints[-1], part.checkpoints[-1], resumed.checkpoints[-1]


@pytest.fixture
def restore_environ():
    """Tests that configure S3 endpoints through ganforge (which exports them for this process and Ray workers)
    leave os.environ as they found it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
