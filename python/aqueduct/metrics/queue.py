"""``TaskMetricsQueue``: importable for code written for aqueduct 1.15, where it was the
``multiprocessing`` queue between steps that measured task sizes. Steps here are connected by
the engine's shared-memory rings, which measure sizes themselves (``task_size`` metrics), so
there is no queue to construct."""

from __future__ import annotations

from multiprocessing.queues import Queue
from typing import Any

_REPLACEMENT = (
    'TaskMetricsQueue was the multiprocessing queue between the steps of an aqueduct 1.15 flow; '
    'the engine connects steps itself and exports task sizes as task_size metrics '
    '(read them with a metrics_exporter, or Flow.metrics())'
)


class TaskMetricsQueue(Queue):
    def __init__(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(_REPLACEMENT)

    def task_size(self, *args: Any, **kwargs: Any) -> Any:  # 1.15's method; no instance exists
        raise NotImplementedError(_REPLACEMENT)
