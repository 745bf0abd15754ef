"""A run folder's record of a stage: one JSON line per report in RUN_DIR/metrics/<stage>.jsonl and a copy of
each checkpoint's sample grid in RUN_DIR/samples. Written where the reports arrive (the driver, from a Ray
Train callback; in-process runs, from the session), so workers on other hosts need no shared folder; MLflow,
DVC plots and the progress display read it back."""

from __future__ import annotations

import json
from pathlib import Path


def history_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "metrics" / f"{stage}.jsonl"


def append_history(run_dir: str | Path, stage: str, record: dict) -> None:
    path = history_path(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def sample_name(stage: str, kimg: float) -> str:
    return f"{stage}-{kimg:08.3f}kimg.png"


def record_report(run_dir: str | Path, stage: str, metrics: dict, grid_png: bytes | None = None) -> None:
    """Keep one report of ``stage``: its metrics line, and the checkpoint's sample grid when it has one."""
    append_history(run_dir, stage, metrics)
    if grid_png is not None:
        samples = Path(run_dir) / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        tmp = samples / f".{sample_name(stage, float(metrics['kimg']))}.tmp"
        tmp.write_bytes(grid_png)
        tmp.replace(samples / sample_name(stage, float(metrics["kimg"])))


def read_history(run_dir: str | Path, stage: str) -> list[dict]:
    """Rank 0's metric reports of a stage, the last one per step (a restarted attempt rewrites steps)."""
    path = history_path(run_dir, stage)
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a killed writer
                continue
            by_step[int(rec["step"])] = rec
    return [by_step[k] for k in sorted(by_step)]


def numeric_keys(history: list[dict], first: tuple[str, ...] = ("step", "kimg")) -> list[str]:
    """Every numeric key of a history, ``first`` leading: the columns of a stage's CSV plot."""
    keys = {k for h in history for k, v in h.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return [k for k in first if k in keys] + sorted(keys - set(first))
