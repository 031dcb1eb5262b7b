"""The flow's side of metrics: the :class:`Collector` each export period is gathered in, the
once-a-second and ``qsize_collect_period`` gauge samples, and turning engine snapshots and the
driver's outcome counts into exporter periods, Prometheus families and ``top`` frames. Everything
is read through the flow's public :class:`aqueduct.view.FlowView`.

Histograms from the engine are ``(buckets, count, sum)`` with the log-linear buckets of
``aqueduct_core::metrics`` (two per octave; bucket ``2k + 1`` starts at ``2**k``).
"""

from __future__ import annotations

import asyncio
import os
from random import random
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ..logger import log
from .base import MAIN_PROCESS, MetricsItems, MetricsTypes
from .collect import AqueductMetricsStorage, Collector, ProcessesStats, TasksStats
from .task import TasksMetricsStorage

if TYPE_CHECKING:  # pragma: no cover
    from ..view import FlowView

#: Outcome counters, in this order, per priority.
OUTCOMES = ('complete', 'timeout', 'cancel', 'error')
_PAGE = os.sysconf('SC_PAGE_SIZE')
#: How often memory and live processes are sampled: 1.15's fixed period.
PROCESSES_PERIOD = 1.0
#: ``handle_time.total`` samples kept per export period (uniformly, when more tasks complete),
#: the bound the engine keeps for its own timings.
TOTAL_SAMPLES = 64


def bucket_upper(i: int) -> int:
    """Exclusive upper bound of bucket ``i`` (mirrors the engine)."""
    if i == 0:
        return 1
    k = (i - 1) // 2
    if (i - 1) % 2 == 0:
        return 2 if k == 0 else (1 << k) + (1 << (k - 1))
    return 1 << (k + 1)


def count_below(buckets: List[int], bound: int) -> int:
    """How many values are below ``bound`` (exact for powers of two)."""
    return sum(n for i, n in enumerate(buckets) if bucket_upper(i) <= bound)


def quantile(buckets: List[int], q: float) -> Optional[float]:
    """The ``q`` quantile, as the upper bound of the bucket it falls in (within 25%)."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank and n:
            return float(bucket_upper(i))
    return float(bucket_upper(len(buckets) - 1))


def rss_bytes(pid: int) -> int:
    try:
        with open(f'/proc/{pid}/statm') as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class FlowMetrics:
    """Per-flow bookkeeping that lives in the main process."""

    def __init__(self, view: FlowView, collector: Optional[Collector] = None, *, exporting: bool):
        self.view = view
        self.collector = collector if collector is not None else Collector()
        #: Whether anything is exported at all (an exporter, and metrics enabled).
        self.exporting = exporting
        #: Whether ``process()`` reports completed tasks (``completed``): task timers are exported.
        self.timers = self.exporting and self.collector.is_collectible(MetricsTypes.TASK_TIMERS)
        self._queues = self.exporting and self.collector.is_collectible(MetricsTypes.QUEUE_SIZE)
        self._exported_outcomes = [0] * len(OUTCOMES)
        self._exported_deaths = 0
        self._exported_restarts = 0
        self._totals: List[float] = []
        self._completed = 0
        self._gauges: Dict[str, asyncio.TimerHandle | asyncio.Handle] = {}

    def sources(self, k: int) -> str:
        """Where tasks of step ``k`` (0-based) usually come from, in 1.15's names."""
        return MAIN_PROCESS if k == 0 else self.view.step_names[k - 1]

    # ------------------------------------------------------------ per task

    def completed(self, started: float, own: Any) -> None:
        """A task ``process()`` started at ``started`` (``time.monotonic()``) completed; ``own``
        is the ``task.metrics`` its handlers may have filled (or ``None``).

        Its end-to-end time is 1.15's ``handle_time.total``: from the call until the result is
        back in the main process, queueing and every step included.
        """
        seconds = monotonic() - started
        n = self._completed = self._completed + 1
        if n <= TOTAL_SAMPLES:
            self._totals.append(seconds)
        else:
            # Reservoir sampling: each of the period's n tasks is kept with the same chance.
            j = int(random() * n)
            if j < TOTAL_SAMPLES:
                self._totals[j] = seconds
        if own is not None and isinstance(own, TasksMetricsStorage):
            self.collector.add_task_metrics(own)

    # ------------------------------------------------------------ gauges

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts the gauge samples on ``loop``: one now, then one per period (1.15 samples
        when the flow starts and then after each period)."""
        self.disarm()
        if not self.exporting:
            return
        self._gauges['processes'] = loop.call_soon(self._gauge, 'processes', loop, PROCESSES_PERIOD, self._processes)
        if self._queues:
            period = self.collector.qsize_collect_period
            self._gauges['qsize'] = loop.call_soon(self._gauge, 'qsize', loop, period, self._queue_sizes)

    def disarm(self) -> None:
        for handle in self._gauges.values():
            handle.cancel()
        self._gauges.clear()

    def _gauge(self, kind: str, loop: asyncio.AbstractEventLoop, period: float, sample: Callable) -> None:
        if not self.view.started:
            self._gauges.pop(kind, None)
            return
        try:
            sample()
        except Exception:
            log.exception('sampling the %s metrics failed', kind)
        self._gauges[kind] = loop.call_later(period, self._gauge, kind, loop, period, sample)

    def _queue_sizes(self) -> None:
        view = self.view
        names = view.step_names
        sizes = [(f'from_{self.sources(k)}_to_{name}', view.queue_len(k)) for k, name in enumerate(names)]
        # Results go straight to the caller's future: the last hop has no queue to wait in.
        sizes.append((f'from_{names[-1]}_to_{MAIN_PROCESS}', 0))
        self.collector.add_queue_sizes(sizes)

    def _processes(self) -> None:
        memory = MetricsItems()
        total_rss = 0
        workers = [w for w in self.view.workers() if w.alive]
        for k, step in enumerate(self.view.steps):
            # 1.15 numbered steps from 0 in these names only (``step0_Handler`` for the first
            # step): kept, so that its dashboards keep working.
            name = type(step.handler).get_step_name(k)
            step_rss = 0
            for w in workers:
                if w.step == k:
                    rss = rss_bytes(w.pid)
                    memory.add(name, rss)
                    step_rss += rss
            if step.nprocs != 1:
                memory.add(f'{name}_nprocs_sum', step_rss)
            total_rss += step_rss
        memory.add('all_memory_usage', total_rss)
        self.collector.add_memory_usage(memory)
        self.collector.add_processes_stats(ProcessesStats(running=len(workers)))

    # ------------------------------------------------------------ export periods

    def period(self) -> AqueductMetricsStorage:
        """One export period: what was collected since the previous one."""
        view = self.view
        names = view.step_names
        snap = view.engine_metrics(drain=True) or {'steps': [], 'routes': []}
        collector = self.collector
        if self.timers:
            timers = TasksMetricsStorage()
            for k, (step, m) in enumerate(zip(view.steps, snap['steps'], strict=True)):
                name = names[k]
                src = self.sources(k)
                for us in m['handle_us_samples']:
                    timers.handle_times.add(name, us / 1e6)
                for us in m['transfer_in_us_samples']:
                    timers.transfer_times.add(f'from_{src}_to_{name}', us / 1e6)
                for size in m['size_in_samples']:
                    timers.task_sizes.add(f'from_{src}_to_{name}', size)
                if step.batch_size > 1:
                    for us in m['batch_wait_us_samples']:
                        timers.batch_times.add(name, us / 1e6)
                    for size in m['batch_size_samples']:
                        timers.batch_sizes.add(name, size)
            for step, to, priority, _th, transfer, _sh, sizes in snap['routes']:
                if to is not None:
                    continue  # hops between steps are counted on arrival, by the receiving worker
                prefix = f'p_{priority}_' if priority else ''
                route = f'{prefix}from_{names[step]}_to_{MAIN_PROCESS}'
                for us in transfer:
                    timers.transfer_times.add(route, us / 1e6)
                for size in sizes:
                    timers.task_sizes.add(route, size)
            timers.handle_times.add_items(('total', seconds) for seconds in self._totals)
            self._totals, self._completed = [], 0
            collector.add_task_metrics(timers)
        totals = [sum(level[i] for level in view.outcome_counts()) for i in range(len(OUTCOMES))]
        stats = TasksStats()
        stats.complete, stats.timeout, stats.cancel, stats.error = (
            t - e for t, e in zip(totals, self._exported_outcomes, strict=True)
        )
        self._exported_outcomes = totals
        collector.add_tasks_stats(stats)
        health = view.step_health()
        deaths, restarts = sum(h.deaths for h in health), sum(h.restarts for h in health)
        collector.add_processes_stats(
            ProcessesStats(dead=deaths - self._exported_deaths, restarted=restarts - self._exported_restarts)
        )
        self._exported_deaths, self._exported_restarts = deaths, restarts
        return collector.extract_metrics()

    def snapshot(self, health: dict) -> dict:
        """Everything at once, without draining, with the flow's ``health()``: for Prometheus
        and ``top``."""
        view = self.view
        names = view.step_names
        snap = view.engine_metrics(drain=False) or {'steps': [], 'routes': []}
        steps = []
        streams = view.stream_stats()
        for k, m in enumerate(snap['steps']):
            h = health['steps'][k]
            step = {**h, **{key: value for key, value in m.items() if not key.endswith('_samples')}}
            if k < len(streams):  # streams entering this step (`Flow.stream`)
                stream = streams[k]
                step['streams_open'] = stream['open']
                step['stream_parts'] = stream['parts']
                step['first_part_us'] = stream['first_part_us']
            steps.append(step)
        rss: Dict[str, int] = {}
        for w in view.workers():
            if w.alive:
                rss[names[w.step]] = rss.get(names[w.step], 0) + rss_bytes(w.pid)
        routes: List[Tuple] = [
            (names[s], names[to] if to is not None else MAIN_PROCESS, p, th, sh)
            for s, to, p, th, _ts, sh, _ss in snap['routes']
        ]
        outcomes = view.outcome_counts()
        return {
            'pid': os.getpid(),
            'state': health['state'],
            'ready': health['ready'],
            'steps': steps,
            'routes': routes,
            'outcomes': {p: dict(zip(OUTCOMES, counts, strict=True)) for p, counts in enumerate(outcomes)},
            'rss': rss,
        }
