"""What a person sees in the terminal.

- ganforge's own lines at INFO (what it is doing, one line per finished step); every other library at WARNING
  unless ``--verbose``: no httpx request lines, no Ray Train report lines.
- One live progress bar per long step (a training stage: kimg done / total, images/s, ETA, the latest losses
  and fade-in alpha; feature extraction and tokens in images), unless ``--quiet``.
- Ray workers write their log to the run folder (``<train.out>/logs/``), not to the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ganforge.tasks.secrets import RedactingFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Ray Train V2 logs every ray.train.report of every rank at INFO under a logger named by its file path.
_RAY_TRAIN_CHATTY = ("ray.train", "ray.tune", "ray.data")
_state = {"verbose": False, "progress": True}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream of the moment ``configure``
    ran: a CLI call made in-process (a notebook, a test capturing output) leaves no handler on a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(*, verbose: bool = False, progress: bool = True) -> None:
    """Set up this process's terminal: ganforge at INFO (DEBUG with verbose), the rest at WARNING (DEBUG)."""
    _state.update(verbose=verbose, progress=progress)
    os.environ["GANFORGE_VERBOSE"] = "1" if verbose else "0"  # subprocesses (dvc stages, Prefect workers)
    if not verbose:  # MLflow's per-download bars and INFO lines (its logger is set up when mlflow is imported)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    handler = _StderrHandler()
    handler.addFilter(RedactingFilter())  # no URI credential reaches the terminal, whoever logs it
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format=FORMAT, force=True,
                        handlers=[handler])
    logging.getLogger("ganforge").setLevel(logging.DEBUG if verbose else logging.INFO)


def verbose() -> bool:
    return _state["verbose"] or os.environ.get("GANFORGE_VERBOSE") == "1"


def progress_enabled() -> bool:
    return bool(_state["progress"])


def bar(total: float, desc: str, unit: str, *, initial: float = 0, **kw) -> tqdm:
    """A progress bar on stderr (disabled by --quiet)."""
    kw["disable"] = kw.get("disable", False) or not progress_enabled()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, mininterval=0.5,
                dynamic_ncols=True, **kw)


class StageProgress:
    """The live display of one training stage, fed by the reports rank 0 sends to the driver."""

    KEYS = ("loss_g", "loss_d", "loss_rec", "loss_prior", "loss_elbo", "loss_c", "alpha")

    def __init__(self, name: str, resolution: int, kimg: float):
        self.name, self.resolution, self.total = name, resolution, float(kimg)
        self.bar: tqdm | None = None
        self.kimg = 0.0

    def update(self, metrics: dict) -> None:
        kimg = float(metrics.get("kimg", self.kimg))
        if self.bar is None:  # opened at the first report: a resumed stage starts where it was
            self.bar = bar(round(self.total, 3), f"{self.name} {self.resolution}px", "kimg", initial=round(kimg, 3),
                           bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} kimg "
                                      "[{elapsed}<{remaining}{postfix}]")
            self.kimg = kimg
        elif kimg > self.kimg:
            self.bar.update(kimg - self.kimg)
            self.kimg = kimg
        post = [f"{metrics['images_per_s']:.0f} img/s"] if "images_per_s" in metrics else []
        post += [f"{k.removeprefix('loss_')} {metrics[k]:.3f}" for k in self.KEYS
                 if isinstance(metrics.get(k), (int, float))]
        self.bar.set_postfix_str(" ".join(post), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def worker_logging(run_dir: str | None, stage: str, rank: int, verbose_: bool = False) -> str | None:
    """In a Ray Train worker: ganforge's lines go to ``run_dir/logs/<stage>.rank<r>.log`` (when that folder is
    reachable from this host), Ray Train's per-report lines are dropped unless verbose. Returns the log path."""
    level = logging.DEBUG if verbose_ else logging.INFO
    logger = logging.getLogger("ganforge")
    logger.setLevel(level)
    if not verbose_:
        for name in _RAY_TRAIN_CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:  # the per-report line's logger is named by its file path, not under "ray"
            from ray.train.v2._internal.execution import context as _ctx

            _ctx.logger.setLevel(logging.WARNING)
        except (ImportError, AttributeError):
            pass
    if not run_dir:
        return None
    path = Path(run_dir) / "logs" / f"{stage}.rank{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError:  # the run folder lives on the driver's host only: Ray's own worker logs keep these lines
        return None
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(level)
    handler.addFilter(RedactingFilter())
    for h in list(logger.handlers):  # one file per stage and rank, also when a worker process is reused
        if isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
            h.close()
    logger.addHandler(handler)
    return str(path)
