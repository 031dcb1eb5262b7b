"""What one export period hands to an exporter: :class:`AqueductMetricsStorage`.

The attribute names are those of aqueduct 1.15, so custom exporters written for it keep
working. Times are in seconds, sizes in bytes. ``handle_times`` holds one sample per batch;
timings are sampled (at most 64 per worker and metric per period) when tasks outpace the
export period, while counts (``tasks_stats``, ``processes_stats``) are exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Tuple

from .base import MetricsItems


@dataclass
class TasksStats:
    complete: int = 0
    timeout: int = 0
    cancel: int = 0
    error: int = 0

    @property
    def items(self) -> Iterable[Tuple[str, int]]:
        return asdict(self).items()

    def extend(self, other: TasksStats) -> None:
        self.complete += other.complete
        self.timeout += other.timeout
        self.cancel += other.cancel
        self.error += other.error


@dataclass
class ProcessesStats:
    running: int = 0
    dead: int = 0
    restarted: int = 0

    @property
    def items(self) -> Iterable[Tuple[str, int]]:
        return asdict(self).items()

    def extend(self, other: ProcessesStats) -> None:
        self.running += other.running
        self.dead += other.dead
        self.restarted += other.restarted


class AqueductMetricsStorage:
    def __init__(self) -> None:
        self.transfer_times = MetricsItems()
        self.task_sizes = MetricsItems()
        self.handle_times = MetricsItems()
        self.batch_times = MetricsItems()
        self.batch_sizes = MetricsItems()
        self.queue_sizes = MetricsItems()
        self.tasks_stats = TasksStats()
        self.memory_usage = MetricsItems()
        self.processes_stats = ProcessesStats()

    def extend(self, other: AqueductMetricsStorage) -> None:
        for name in ('transfer_times', 'task_sizes', 'handle_times', 'batch_times', 'batch_sizes', 'queue_sizes',
                     'memory_usage'):
            getattr(self, name).extend(getattr(other, name))
        self.tasks_stats.extend(other.tasks_stats)
        self.processes_stats.extend(other.processes_stats)


class Collector:
    """Accepted for compatibility with aqueduct 1.15's ``Flow(metrics_collector=...)``; the
    engine collects metrics itself."""

    def __init__(self, collectible_metrics=None, qsize_collect_period: float = 1.0):
        self.collectible_metrics = collectible_metrics
        self.qsize_collect_period = qsize_collect_period
