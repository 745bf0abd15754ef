"""Hashing and atomic writes: the bottom of ganforge.tasks (imports nothing from ganforge)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("ganforge.io")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    os.replace(tmp, path)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; the previous output survives until the new one is complete."""
    old = None
    if out.exists():
        old = owned_name(out, "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- temporary folders of dead runs

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+$")


def owned_name(target: Path, kind: str) -> Path:
    """A hidden sibling of ``target`` for work in progress (``kind`` tmp) or a replaced output (old), named
    after the host and process that own it, so a later run can tell a dead owner's leftovers."""
    host = socket.gethostname().replace("-", "_") or "host"
    return target.with_name(f".{target.name}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove ``target``'s hidden tmp/old siblings whose owner process on this host is gone (safe: nobody is
    writing them). Returns what was removed."""
    removed = []
    host = socket.gethostname().replace("-", "_") or "host"
    parent = target.parent
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _TMP.match(p.name)
        if not m or m["name"] != target.name or m["host"] != host or _alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` (leftovers of dead runs removed first) that replaces ``out`` when the block
    succeeds and is removed when it fails: a failed or interrupted run never leaves half an output where the
    last good one was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in clean_stale(out):
        log.info("removed %s, left by a run that died", p)
    tmp = owned_name(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
