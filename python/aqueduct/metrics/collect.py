"""What one export period hands to an exporter (:class:`AqueductMetricsStorage`), and the
:class:`Collector` that gathers it.

The attribute names are those of aqueduct 1.15, so custom exporters written for it keep
working. Times are in seconds, sizes in bytes. ``handle_times`` holds one sample per batch;
timings are sampled (at most 64 per worker and metric per period) when tasks outpace the
export period, while counts (``tasks_stats``, ``processes_stats``) are exact.

When each family is collected follows 1.15: task timings (``MetricsTypes.TASK_TIMERS``) as
tasks complete; queue sizes (``MetricsTypes.QUEUE_SIZE``) once at start and then every
``qsize_collect_period`` seconds; memory and live processes once at start and then every second.
An export period sends what was collected since the previous one, so a gauge is sent once per
collection, not once per export.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any, Iterable, List, Mapping, Optional, Tuple

from .base import IMetricsItems, MetricsItems, MetricsTypes
from .processes import ProcessesStats
from .task import TasksMetricsStorage

__all__ = ['AqueductMetricsStorage', 'Collector', 'ProcessesStats', 'TasksStats']


@dataclass
class TasksStats(IMetricsItems):
    """Tasks finished since the previous export, by outcome.

    The positional order is 1.15's (``cancel, timeout, complete``); ``error`` is ours: a handler
    exception reaches the caller instead of surfacing as a timeout.
    """

    cancel: int = 0
    timeout: int = 0
    complete: int = 0
    error: int = 0

    @property
    def items(self) -> Iterable[Tuple[str, int]]:
        return asdict(self).items()

    def extend(self, other: TasksStats) -> None:
        self.cancel += other.cancel
        self.timeout += other.timeout
        self.complete += other.complete
        self.error += other.error


class AqueductMetricsStorage(TasksMetricsStorage):
    def __init__(self) -> None:
        super().__init__()
        self.queue_sizes = MetricsItems()
        self.tasks_stats = TasksStats()
        self.memory_usage = MetricsItems()
        self.processes_stats = ProcessesStats()

    def extend(self, other: TasksMetricsStorage) -> None:
        super().extend(other)
        if isinstance(other, AqueductMetricsStorage):
            self.queue_sizes.extend(other.queue_sizes)
            self.tasks_stats.extend(other.tasks_stats)
            self.memory_usage.extend(other.memory_usage)
            self.processes_stats.extend(other.processes_stats)

    def extend_memory_usage(self, metrics: MetricsItems) -> None:
        self.memory_usage.extend(metrics)


def _check_period(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'qsize_collect_period must be a number of seconds > 0, got {value!r}')
    return float(value)


class Collector:
    """Gathers a flow's metrics between exports: ``Flow(metrics_collector=Collector(...))``.

    ``collectible_metrics`` (``MetricsTypes`` or their values; default: all) chooses whether
    task timings (handle, transfer, batch times, task and batch sizes) and queue sizes are
    collected; task counts, memory and processes always are. ``qsize_collect_period`` is how
    often queue sizes are sampled, in seconds.
    """

    def __init__(self, collectible_metrics: Optional[Iterable[Any]] = None, qsize_collect_period: float = 1.0):
        self._metrics = AqueductMetricsStorage()
        self._collectible_metrics: List[MetricsTypes] = (
            list(MetricsTypes) if collectible_metrics is None else [MetricsTypes(t) for t in collectible_metrics]
        )
        self._qsize_collect_period = _check_period(qsize_collect_period)

    @property
    def collectible_metrics(self) -> List[MetricsTypes]:
        return list(self._collectible_metrics)

    @property
    def qsize_collect_period(self) -> float:
        return self._qsize_collect_period

    def is_collectible(self, metrics_type: MetricsTypes) -> bool:
        return metrics_type in self._collectible_metrics

    async def collect_qsize(self, queues_info: Mapping[Any, str]) -> None:
        """Samples ``queue.qsize()`` for each ``{queue: name}`` every ``qsize_collect_period``,
        until cancelled. A flow samples its own queues; this is for queues of your own."""
        if not self.is_collectible(MetricsTypes.QUEUE_SIZE):
            return
        while True:
            self.add_queue_sizes([(name, q.qsize()) for q, name in queues_info.items()])
            await asyncio.sleep(self._qsize_collect_period)

    def add_queue_sizes(self, sizes: Iterable[Tuple[str, int]]) -> None:
        self._metrics.queue_sizes.add_items(sizes)

    def add_task_metrics(self, metrics: TasksMetricsStorage) -> None:
        self._metrics.extend(metrics)

    def add_tasks_stats(self, stats: TasksStats) -> None:
        self._metrics.tasks_stats.extend(stats)

    def add_memory_usage(self, metrics: MetricsItems) -> None:
        self._metrics.extend_memory_usage(metrics)

    def add_processes_stats(self, stats: ProcessesStats) -> None:
        self._metrics.processes_stats.extend(stats)

    def extract_metrics(self) -> AqueductMetricsStorage:
        """What was collected since the previous call; starts collecting afresh."""
        metrics, self._metrics = self._metrics, AqueductMetricsStorage()
        return metrics
