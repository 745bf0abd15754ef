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
import sys
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


_JSON_TMP = re.compile(r"^\.(?P<name>.+)\.\d+\.tmp$")  # write_json's temporary file
_LOCK = re.compile(r"^\.(?P<name>.+)\.lock$")  # hold()'s lock file


def visible_path(path: str | Path) -> str:
    """A path as the user named it: a hidden work-in-progress sibling (``.shards.tmp-host-pid-id``) is shown
    as what it becomes (``shards``), in messages about a failure while writing it."""
    parts = [m["name"] if (m := _TMP.match(p) or _JSON_TMP.match(p) or _LOCK.match(p)) else p for p in Path(path).parts]
    return str(Path(*parts)) if parts else str(path)


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


# ----------------------------------------------------------------------------- one process per output folder

_held: dict[str, list] = {}  # lock path -> [open file, depth]: a process may re-enter its own hold


@contextlib.contextmanager
def hold(target: str | Path, what: str) -> Iterator[None]:
    """Hold ``target`` (a run folder, a shard folder being written) for this process: a second process that
    asks for it gets a BusyError naming the holder (pid, host, start time, command). The lock is the kernel's
    (``flock`` on the hidden sibling ``.NAME.lock``, removed on release), so it dies with its process,
    ``kill -9`` included: the next run takes over a dead holder's folder, saying so."""
    import fcntl
    import time

    from ganforge.tasks.errors import BusyError

    target = Path(target)
    lock = target.with_name(f".{target.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock.resolve())
    if key in _held:  # this process already holds it (train() around each train_stage())
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    for _ in range(20):
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise BusyError(f"{target} is in use: {holder}; wait for it to finish, or use another folder") from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            if os.fstat(f.fileno()).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    else:
        raise BusyError(f"{target}: could not take its lock file {lock}")
    f.seek(0)
    previous = f.read().strip()
    if previous:
        log.warning("%s: taking it over (%s; that process has ended)", target, previous)
    f.seek(0)
    f.truncate()
    cmd = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:160] if sys.argv and sys.argv[0] else "python"
    f.write(f"{what} by pid {os.getpid()} on host {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} ({cmd})\n")
    f.flush()
    _held[key] = [f, 1]
    try:
        yield
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            lock.unlink()  # while still locked: whoever opened the old file sees it is gone and retries
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` (leftovers of dead runs removed first) that replaces ``out`` when the block
    succeeds and is removed when it fails: a failed or interrupted run never leaves half an output where the
    last good one was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with hold(out, "writing"):
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
