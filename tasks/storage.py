"""Where bytes live: local folders by default, S3-compatible object storage by configuration.

``runtime.s3_endpoint_url`` (MinIO, Ceph, moto, ... ; unset for AWS) is exported as the
standard endpoint variables that every client here reads: ``AWS_ENDPOINT_URL`` (boto3,
s3fs, pyarrow's S3 filesystem used by Ray Train storage) and ``MLFLOW_S3_ENDPOINT_URL``
(MLflow's artifact client); Ray workers get them through the job's runtime_env.
Credentials stay in the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``) and
never in params.yaml.

Shards may be read from ``s3://bucket/prefix`` (or any fsspec URL): the manifest is read
remotely and each tar shard is copied once into a local cache, then read by the same
memory-mapped reader as local shards.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def is_remote(path: str | Path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def join(base: str | Path, name: str) -> str:
    return f"{str(base).rstrip('/')}/{name}" if is_remote(base) else str(Path(base) / name)


def s3_env(endpoint_url: str | None) -> dict[str, str]:
    """The environment variables that point every S3 client at ``endpoint_url``."""
    return {v: endpoint_url for v in ENDPOINT_VARS} if endpoint_url else {}


def configure_s3(endpoint_url: str | None) -> dict[str, str]:
    """Export the endpoint for this process (an explicit environment setting wins); returns what Ray
    workers need in their runtime_env."""
    env = s3_env(endpoint_url)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in ENDPOINT_VARS if k in os.environ}


def arrow_fs(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or a URL; S3 honours the configured endpoint
    (what Ray Train's storage and checkpoints use)."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(uri)
    scheme, rest = str(uri).split("://", 1)
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            ep_scheme, _, host = endpoint.partition("://")
            kwargs = {"endpoint_override": host.rstrip("/"), "scheme": ep_scheme}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), rest.rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def configure_dvc_remote(remote: str | None, endpoint_url: str | None, repo: str | Path = ".",
                         name: str = "ganforge") -> dict:
    """Make ``remote`` the default DVC remote of ``repo`` (S3 endpoint included; credentials stay in the
    environment), so that ``dvc push`` / ``dvc pull`` move data and stage outputs there."""
    import subprocess

    if not remote:
        raise ValueError("runtime.dvc_remote is not set (e.g. s3://bucket/dvc or /mnt/shared/dvc)")

    def dvc(*args: str) -> None:
        r = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"dvc {' '.join(args)} failed: {(r.stderr or r.stdout).strip()[:500]}")

    dvc("remote", "add", "--force", "--default", name, remote)
    if endpoint_url and remote.startswith("s3://"):
        dvc("remote", "modify", name, "endpointurl", endpoint_url)
    return {"remote": remote, "name": name, "endpoint_url": endpoint_url if remote.startswith("s3://") else None}


def read_text(path: str | Path) -> str:
    if not is_remote(path):
        return Path(path).read_text()
    import fsspec

    with fsspec.open(str(path), "r") as f:
        return f.read()


def exists(path: str | Path) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    import fsspec

    fs, p = fsspec.core.url_to_fs(str(path))
    return fs.exists(p)


def cache_dir() -> Path:
    return Path(os.environ.get("GANFORGE_CACHE", Path.home() / ".cache" / "ganforge")) / "remote-shards"


def local_copy(url: str, sha256: str | None = None) -> str:
    """A local file with the content of ``url`` (downloaded once; keyed on the shard's sha256 when known)."""
    if not is_remote(url):
        return url
    import fsspec

    key = sha256 or hashlib.sha256(url.encode()).hexdigest()
    dst = cache_dir() / key[:2] / f"{key}.tar"
    if dst.exists():
        return str(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(f".tmp-{os.getpid()}")
    fs, p = fsspec.core.url_to_fs(url)
    fs.get_file(p, str(tmp))
    if sha256:
        from ganforge.tasks.io import sha256_file

        got = sha256_file(tmp)
        if got != sha256:
            tmp.unlink()
            raise ValueError(f"{url}: downloaded content has sha256 {got[:12]}…, the manifest says {sha256[:12]}…")
    os.replace(tmp, dst)
    return str(dst)
