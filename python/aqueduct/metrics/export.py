"""Exporters: where each export period's metrics go. :class:`ToStatsDMetricsExporter` writes
aqueduct 1.15's StatsD names, e.g. ``aqueduct.app.handle_time.step1_MyHandler``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol, Union

from .base import AQUEDUCT
from .collect import AqueductMetricsStorage

TRANSFER_TIME_PREFIX = 'transfer_time'
TASK_SIZE_PREFIX = 'task_size'
HANDLE_TIME_PREFIX = 'handle_time'
BATCH_TIME_PREFIX = 'batch_time'
BATCH_SIZE_PREFIX = 'batch_size'
QSIZE_PREFIX = 'qsize'
TASKS_PREFIX = 'tasks'
MEMORY_USAGE_PREFIX = 'memory_usage'
PROCESSES_PREFIX = 'processes'


class StatsDBuffer(Protocol):
    def count(self, name: str, value: Union[float, int]) -> Any: ...

    def timing(self, name: str, value: Union[float, int]) -> Any: ...

    def gauge(self, name: str, value: Union[float, int]) -> Any: ...


class Exporter(ABC):
    """Receives an :class:`AqueductMetricsStorage` every ``export_period`` seconds."""

    def __init__(self, target: Any, export_period: float = 0.5, prefix: str | None = None):
        if not isinstance(export_period, (int, float)) or export_period <= 0:
            raise ValueError(f'export_period must be a number of seconds > 0, got {export_period!r}')
        self.target = target
        self.export_period = export_period
        self.prefix = AQUEDUCT if prefix is None else f'{AQUEDUCT}.{prefix}'

    @abstractmethod
    def export(self, metrics: AqueductMetricsStorage) -> None: ...


class ToStatsDMetricsExporter(Exporter):
    """Sends metrics to a StatsD client (anything with ``count``, ``timing`` and ``gauge``).

    Timings are in milliseconds (sizes as they are), counts only when non-zero, as in 1.15.
    """

    def __init__(self, target: StatsDBuffer, export_period: float = 0.5, prefix: str | None = None):
        super().__init__(target, export_period, prefix)

    def export(self, metrics: AqueductMetricsStorage) -> None:
        timing, count, p = self.target.timing, self.target.count, self.prefix
        for name, seconds in metrics.handle_times.items:
            timing(f'{p}.{HANDLE_TIME_PREFIX}.{name}', seconds * 1000)
        for name, seconds in metrics.transfer_times.items:
            timing(f'{p}.{TRANSFER_TIME_PREFIX}.{name}', seconds * 1000)
        for name, seconds in metrics.batch_times.items:
            timing(f'{p}.{BATCH_TIME_PREFIX}.{name}', seconds * 1000)
        for name, size in metrics.batch_sizes.items:
            timing(f'{p}.{BATCH_SIZE_PREFIX}.{name}', size)
        for name, size in metrics.queue_sizes.items:
            timing(f'{p}.{QSIZE_PREFIX}.{name}', size)
        for name, size in metrics.task_sizes.items:
            timing(f'{p}.{TASK_SIZE_PREFIX}.{name}', size)
        for name, n in metrics.tasks_stats.items:
            if n > 0:
                count(f'{p}.{TASKS_PREFIX}.{name}', n)
        for name, rss in metrics.memory_usage.items:
            timing(f'{p}.{MEMORY_USAGE_PREFIX}.{name}', rss)
        for name, n in metrics.processes_stats.items:
            if n > 0:
                count(f'{p}.{PROCESSES_PREFIX}.{name}', n)


class DummyExporter(Exporter):
    """Keeps everything it receives (for tests and debugging; it grows without bound)."""

    def __init__(self, target: AqueductMetricsStorage | None = None, **kwargs: Any):
        super().__init__(target if target is not None else AqueductMetricsStorage(), **kwargs)

    def export(self, metrics: AqueductMetricsStorage) -> None:
        self.target.extend(metrics)
