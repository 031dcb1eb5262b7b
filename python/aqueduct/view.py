"""``Flow.view``: what metrics, the stats server, ``aqueduct.sockets`` and tools may read about a
flow, read-only, from the flow's driver (the one source of truth for workers, health and
outcome counts). Nothing outside ``aqueduct.flow`` and this module reads a flow's internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, NamedTuple, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .flow import Flow, FlowStep


class WorkerInfo(NamedTuple):
    """One worker process of a flow, as :attr:`FlowView.workers` lists it."""

    slot: int
    step: int
    pid: int
    alive: bool


class FlowView:
    """What metrics, the stats server, ``aqueduct.sockets`` and tools may read about a flow:
    read-only, and the same whichever front end runs the flow. ``Flow.view`` gives it."""

    def __init__(self, flow: Flow):
        self._flow = flow

    @property
    def step_names(self) -> Tuple[str, ...]:
        return tuple(self._flow._step_names)

    @property
    def steps(self) -> Tuple[FlowStep, ...]:
        return tuple(self._flow._steps)

    @property
    def priorities(self) -> int:
        return self._flow._queue_priorities

    @property
    def started(self) -> bool:
        """Whether the flow has workers (running, or handed over to another process)."""
        return self._flow._driver is not None

    def workers(self) -> List[WorkerInfo]:
        """Every worker slot that has had a process, with its current pid."""
        driver = self._flow._driver
        if driver is None:
            return []
        out = []
        for slot in range(driver.slot_count):
            pid, alive = driver.worker(slot)
            if pid:
                out.append(WorkerInfo(slot, driver.slot_step(slot), pid, alive))
        return out

    def step_health(self) -> List[Any]:
        """Per step, a ``_core.StepHealth`` (alive, ready, deaths, restarts, waiting, in_flight,
        longest_batch_s, overdue); empty before the flow starts."""
        driver = self._flow._driver
        return driver.health() if driver is not None else []

    def outcome_counts(self) -> List[List[int]]:
        """Per priority: calls that completed, timed out, were cancelled and failed (this
        process's and port clients'), since the flow started."""
        driver = self._flow._driver
        levels = [[0, 0, 0, 0] for _ in range(self._flow._queue_priorities)]
        if driver is None:
            return levels
        for step in driver.counts():
            for total, counts in zip(levels, step, strict=True):
                for i, n in enumerate(counts):
                    total[i] += n
        return levels

    def engine_metrics(self, drain: bool = False) -> dict | None:
        """The engine's histograms and sample rings (see ``_core.Driver.metrics``); ``drain``
        consumes the samples (the StatsD exporter is their one reader)."""
        driver = self._flow._driver
        return driver.metrics(drain) if driver is not None else None

    def stream_stats(self) -> List[dict]:
        """Per entry step: streams open, parts delivered, time to the first part (histogram, µs);
        empty before the flow starts."""
        driver = self._flow._driver
        return driver.stream_stats() if driver is not None else []

    def queue_len(self, step: int) -> int:
        driver = self._flow._driver
        return driver.queue_len(step) if driver is not None else 0

    def exit_codes(self) -> dict:
        """Exit codes of the worker processes reaped so far, by pid (the launcher's record,
        which stays readable after the flow stopped)."""
        launcher = self._flow._launcher
        return getattr(launcher, 'exit_codes', {}) if launcher is not None else {}


__all__ = ['FlowView', 'WorkerInfo']
