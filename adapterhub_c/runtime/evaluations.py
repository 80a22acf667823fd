"""Evaluation results into the registry's ``evaluations`` table."""
from __future__ import annotations

from adapterhub_c.evals.evaluate import Scores
from adapterhub_c.registry.models import Evaluation
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.stack import StackSpec


def record_evaluations(reg: Registry, spec: StackSpec, data: str, split: str, results: Scores | dict,
                       run_id: str | None) -> None:
    """Store one ``evaluations`` row per metric of ``results`` (``Scores``, or a dict with ``"_details"``)."""
    if not isinstance(results, Scores):
        results = Scores({k: v for k, v in results.items() if not k.startswith("_")}, results.get("_details", {}))
    with reg.session() as s:
        for metric, value in results.values.items():
            s.add(Evaluation(dataset=data, split=split, metric=metric, value=float(value),
                             details=results.details.get(metric, {}), run_id=run_id, **spec.ids()))
