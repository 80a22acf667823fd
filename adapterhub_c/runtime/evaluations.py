from __future__ import annotations

from adapterhub_c.registry.models import Evaluation
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.stack import StackSpec


def record_evaluations(reg: Registry, spec: StackSpec, data: str, split: str, results: dict,
                       run_id: str | None) -> None:
    """Store one ``evaluations`` row per metric."""
    details = results.get("_details", {})
    with reg.session() as s:
        for metric, value in results.items():
            if metric.startswith("_"):
                continue
            s.add(Evaluation(dataset=data, split=split, metric=metric, value=float(value),
                             details=details.get(metric, {}), run_id=run_id, **spec.ids()))
