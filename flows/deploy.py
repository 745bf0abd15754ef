"""Deployments of the four flows, with parameter defaults from params.yaml, served from this process.

`ganforge serve` (or `python -m flows.deploy`) registers `train-pipeline/ganforge`,
`evaluate/ganforge`, `promote/ganforge` and `sweep/ganforge` with the Prefect API (runtime.prefect_api_url
or PREFECT_API_URL; start one with `prefect server start`) and executes the runs that
the UI, the API or a schedule create.
"""

from __future__ import annotations

from prefect import serve as prefect_serve

from ganforge.flows.pipeline import evaluate_flow, promote_flow, train_pipeline
from ganforge.flows.sweep import sweep_flow
from ganforge.tasks.params import Params, load_params


def deployments(params: Params, cron: str | None = None, interval: float | None = None, name: str = "ganforge"):
    defaults = {"params": params.model_dump(mode="json")}
    sched = {}
    if cron:
        sched["cron"] = cron
    elif interval:
        sched["interval"] = interval
    return [
        train_pipeline.to_deployment(name=name, parameters=defaults, tags=["ganforge"], **sched),
        evaluate_flow.to_deployment(name=name, parameters=defaults, tags=["ganforge"]),
        promote_flow.to_deployment(name=name, parameters=defaults, tags=["ganforge"]),
        sweep_flow.to_deployment(name=name, parameters=defaults, tags=["ganforge"]),
    ]


_ENTRYPOINTS = (
    (train_pipeline, "flows/pipeline.py:train_pipeline"),
    (evaluate_flow, "flows/pipeline.py:evaluate_flow"),
    (promote_flow, "flows/pipeline.py:promote_flow"),
    (sweep_flow, "flows/sweep.py:sweep_flow"),
)


def deploy_to_pool(params: Params, work_pool: str, cron: str | None = None, interval: float | None = None,
                   name: str = "ganforge", source: str | None = None) -> list[str]:
    """Register the four deployments on a work pool; a `prefect worker` of that pool runs them from ``source``
    (default: this installation's code, which is where the ganforge image keeps it)."""
    from pathlib import Path

    src = source or str(Path(__file__).resolve().parents[1])
    defaults = {"params": params.model_dump(mode="json")}
    ids = []
    for fl, entrypoint in _ENTRYPOINTS:
        sched = {}
        if fl is train_pipeline and cron:
            sched["cron"] = cron
        elif fl is train_pipeline and interval:
            sched["interval"] = interval
        dep = fl.from_source(source=src, entrypoint=entrypoint)
        ids.append(str(dep.deploy(name=name, work_pool_name=work_pool, parameters=defaults, tags=["ganforge"],
                                  build=False, push=False, print_next_steps=False, **sched)))
    return ids


def serve(params: Params, cron: str | None = None, interval: float | None = None) -> None:
    prefect_serve(*deployments(params, cron, interval))


if __name__ == "__main__":  # pragma: no cover
    serve(load_params())
