"""The flow's side of metrics: outcome counters, and turning engine snapshots into exporter
periods, Prometheus families and ``top`` frames.

Histograms from the engine are ``(buckets, count, sum)`` with the log-linear buckets of
``aqueduct_core::metrics`` (two per octave; bucket ``2k + 1`` starts at ``2**k``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .base import MAIN_PROCESS
from .collect import AqueductMetricsStorage

if TYPE_CHECKING:  # pragma: no cover
    from ..flow import Flow

#: Outcome counters, in this order, per priority.
OUTCOMES = ('complete', 'timeout', 'cancel', 'error')
_PAGE = os.sysconf('SC_PAGE_SIZE')


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

    def __init__(self, flow: Flow, priorities: int):
        self.flow = flow
        self.outcomes: List[List[int]] = [[0] * len(OUTCOMES) for _ in range(priorities)]
        self._exported_outcomes = [0] * len(OUTCOMES)
        self._exported_deaths = 0
        self._exported_restarts = 0

    def sources(self, k: int) -> str:
        """Where tasks of step ``k`` (0-based) usually come from, in 1.15's names."""
        return MAIN_PROCESS if k == 0 else self.flow._step_names[k - 1]

    def period(self, engine) -> AqueductMetricsStorage:
        """One export period: new samples and counts since the previous one."""
        flow = self.flow
        snap = engine.metrics(drain=True)
        out = AqueductMetricsStorage()
        for k, (step, m) in enumerate(zip(flow._steps, snap['steps'], strict=True)):
            name = flow._step_names[k]
            src = self.sources(k)
            for us in m['handle_us_samples']:
                out.handle_times.add(name, us / 1e6)
            for us in m['transfer_in_us_samples']:
                out.transfer_times.add(f'from_{src}_to_{name}', us / 1e6)
            for size in m['size_in_samples']:
                out.task_sizes.add(f'from_{src}_to_{name}', size)
            if step.batch_size > 1:
                for us in m['batch_wait_us_samples']:
                    out.batch_times.add(name, us / 1e6)
                for size in m['batch_size_samples']:
                    out.batch_sizes.add(name, size)
            out.queue_sizes.add(f'from_{src}_to_{name}', m['queue_len'])
        last = flow._step_names[-1]
        out.queue_sizes.add(f'from_{last}_to_{MAIN_PROCESS}', 0)
        for step, to, priority, _th, transfer, _sh, sizes in snap['routes']:
            if to is not None:
                continue  # hops between steps are counted on arrival, by the receiving worker
            prefix = f'p_{priority}_' if priority else ''
            route = f'{prefix}from_{flow._step_names[step]}_to_{MAIN_PROCESS}'
            for us in transfer:
                out.transfer_times.add(route, us / 1e6)
            for size in sizes:
                out.task_sizes.add(route, size)
        totals = [sum(level[i] for level in self.outcomes) for i in range(len(OUTCOMES))]
        stats = out.tasks_stats
        stats.complete, stats.timeout, stats.cancel, stats.error = (
            t - e for t, e in zip(totals, self._exported_outcomes, strict=True)
        )
        self._exported_outcomes = totals
        total_rss = 0
        for k, step in enumerate(flow._steps):
            name = flow._step_names[k]
            step_rss = 0
            for slot, pid in flow._slot_pids.items():
                if engine.slot_step(slot) == k and flow._slot_alive.get(slot):
                    rss = rss_bytes(pid)
                    out.memory_usage.add(name, rss)
                    step_rss += rss
            if step.nprocs > 1:
                out.memory_usage.add(f'{name}_nprocs_sum', step_rss)
            total_rss += step_rss
        out.memory_usage.add('all_memory_usage', total_rss)
        deaths, restarts = sum(flow._deaths), sum(flow._restarts)
        procs = out.processes_stats
        procs.running = sum(1 for alive in flow._slot_alive.values() if alive)
        procs.dead = deaths - self._exported_deaths
        procs.restarted = restarts - self._exported_restarts
        self._exported_deaths, self._exported_restarts = deaths, restarts
        return out

    def snapshot(self, engine) -> dict:
        """Everything at once, without draining: for Prometheus and ``top``."""
        flow = self.flow
        snap = engine.metrics(drain=False) if engine is not None else {'steps': [], 'routes': []}
        health = flow.health()
        steps = []
        for k, m in enumerate(snap['steps']):
            h = health['steps'][k]
            steps.append({**h, **{key: value for key, value in m.items() if not key.endswith('_samples')}})
        rss: Dict[str, int] = {}
        for slot, pid in flow._slot_pids.items():
            if engine is not None and flow._slot_alive.get(slot):
                name = flow._step_names[engine.slot_step(slot)]
                rss[name] = rss.get(name, 0) + rss_bytes(pid)
        routes: List[Tuple] = [
            (flow._step_names[s], flow._step_names[to] if to is not None else MAIN_PROCESS, p, th, sh)
            for s, to, p, th, _ts, sh, _ss in snap['routes']
        ]
        return {
            'pid': os.getpid(),
            'state': health['state'],
            'ready': health['ready'],
            'steps': steps,
            'routes': routes,
            'outcomes': {p: dict(zip(OUTCOMES, counts, strict=True)) for p, counts in enumerate(self.outcomes)},
            'rss': rss,
        }
