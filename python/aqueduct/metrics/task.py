"""``TaskMetrics``: the per-task metrics "backpack" of aqueduct 1.15 (``task.metrics``).

In 1.15 every step wrote its timings into the task and the main process merged them when the
task came back. Here the engine records step timings itself, in shared memory, so the backpack
starts empty and costs nothing unless used: a handler (or the caller, before ``process()``) may
add its own samples, e.g. ``task.metrics.handle_times.add('decode', seconds)``, and when the task
completes they are exported with the flow's, as ``aqueduct.handle_time.decode``. As in 1.15,
``process()`` does not copy the processed task's metrics back into the caller's task.
"""

from __future__ import annotations

from typing import Optional

from .base import IExtendable, MetricsItems
from .timer import TransferTimer


def _route(transfer_from: str, transfer_to: str, priority: int) -> str:
    route = f'from_{transfer_from}_to_{transfer_to}'
    return f'p_{priority}_{route}' if priority > 0 else route


class TasksMetricsStorage(IExtendable):
    """The per-task families: times in seconds, sizes in bytes or tasks."""

    def __init__(self) -> None:
        self.transfer_times = MetricsItems()
        self.task_sizes = MetricsItems()
        self.handle_times = MetricsItems()
        self.batch_times = MetricsItems()
        self.batch_sizes = MetricsItems()

    def extend(self, storage: TasksMetricsStorage) -> None:
        self.transfer_times.extend(storage.transfer_times)
        self.task_sizes.extend(storage.task_sizes)
        self.handle_times.extend(storage.handle_times)
        self.batch_times.extend(storage.batch_times)
        self.batch_sizes.extend(storage.batch_sizes)


class TaskMetrics(TasksMetricsStorage):
    """One task's own samples, with 1.15's helpers for timing a hop by hand."""

    def __init__(self) -> None:
        super().__init__()
        self._transfer_timer: Optional[TransferTimer] = None

    def start_transfer_timer(self, transfer_from: str) -> None:
        self._transfer_timer = TransferTimer(transfer_from)
        self._transfer_timer.start()

    def _started(self) -> TransferTimer:
        if self._transfer_timer is None:
            raise RuntimeError('start_transfer_timer() must be called first')
        return self._transfer_timer

    def stop_transfer_timer(self, transfer_to: str, priority: int = 0) -> None:
        timer = self._started()
        timer.stop()
        timer.transfer_to = transfer_to
        self.transfer_times.add(_route(timer.transfer_from, transfer_to, priority), timer.seconds)

    def save_task_size(self, task_size: int, transfer_to: str, priority: int = 0) -> None:
        self.task_sizes.add(_route(self._started().transfer_from, transfer_to, priority), task_size)
