"""``ProcessesStats``: worker process counts, exported as the ``processes.*`` StatsD counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Tuple

from .base import IMetricsItems


@dataclass
class ProcessesStats(IMetricsItems):
    """``dead`` and ``restarted`` count events since the previous export; ``running`` is the
    number of live workers at each once-a-second sample, summed, as 1.15 sends it.

    The positional order is 1.15's (``dead, running``); ``restarted`` is ours (1.15 stopped the
    flow when a worker died).
    """

    dead: int = 0
    running: int = 0
    restarted: int = 0

    @property
    def items(self) -> Iterable[Tuple[str, int]]:
        return asdict(self).items()

    def extend(self, other: ProcessesStats) -> None:
        self.dead += other.dead
        self.running += other.running
        self.restarted += other.restarted

    def add_dead_process(self) -> None:
        self.dead += 1

    def add_running_process(self) -> None:
        self.running += 1
