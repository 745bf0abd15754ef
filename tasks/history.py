"""A run folder's metric history: rank 0 appends one JSON line per report to RUN_DIR/metrics/<stage>.jsonl;
MLflow, DVC plots and the progress display read it back."""

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
