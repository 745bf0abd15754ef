"""Deployments of the three flows, with parameter defaults from params.yaml, served from this process.

`ganforge serve` (or `python -m flows.deploy`) registers `train-pipeline/ganforge`,
`evaluate/ganforge` and `promote/ganforge` with the Prefect API (runtime.prefect_api_url
or PREFECT_API_URL; start one with `prefect server start`) and executes the runs that
the UI, the API or a schedule create.
"""

from __future__ import annotations

from prefect import serve as prefect_serve

from flows.pipeline import evaluate_flow, promote_flow, train_pipeline
from tasks.params import Params, load_params


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
    ]


def serve(params: Params, cron: str | None = None, interval: float | None = None) -> None:
    prefect_serve(*deployments(params, cron, interval))


if __name__ == "__main__":  # pragma: no cover
    serve(load_params())
