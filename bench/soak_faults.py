"""Soak with faults: 100,000 tasks through a 2-step flow with nprocs=2, 1% of them failing in
the handler, and 3 workers SIGKILLed along the way.

Every call must return its own correct result or the right exception: a ``ValueError`` (also a
``FlowError``) for the tasks that fail on purpose, ``WorkerDiedError`` only for tasks a killed
worker held. Nothing may be lost (every call returns), duplicated (results carry their task's
number), or time out; RSS of the main process and the workers must stay flat.

Run: ``python bench/soak_faults.py [--tasks N]`` (``make soak`` runs it with the payload soak).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter

import psutil
from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep
from aqueduct.exceptions import FlowError, WorkerDiedError


class NumTask(BaseTask):
    def __init__(self, x: int):
        super().__init__()
        self.x = x
        self.result = None


class Flaky(BaseTaskHandler):
    """Fails 1% of tasks (those with x % 100 == 42)."""

    def handle(self, *tasks: NumTask) -> None:
        for t in tasks:
            if t.x % 100 == 42:
                raise ValueError(f'task {t.x} fails on purpose')
            t.result = t.x * 2


class Finish(BaseTaskHandler):
    def handle(self, *tasks: NumTask) -> None:
        for t in tasks:
            t.result += 1


def rss_mb() -> float:
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def workers() -> list:
    """The worker processes: children of the zygote (fork mode)."""
    found = []
    for zygote in psutil.Process().children():
        found.extend(zygote.children())
    return found


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tasks', type=int, default=100_000)
    parser.add_argument('--in-flight', type=int, default=64)
    parser.add_argument('--kills', type=int, default=3)
    parser.add_argument('--tolerance-mb', type=float, default=32.0)
    args = parser.parse_args()

    flow = Flow(FlowStep(Flaky(), nprocs=2), FlowStep(Finish(), nprocs=2))
    flow.start(timeout=60)
    outcomes: Counter = Counter()
    wrong: list = []
    samples = []
    done = 0
    kill_at = {args.tasks * (k + 1) // (args.kills + 1) for k in range(args.kills)}
    killed = []

    async def one(i: int) -> None:
        nonlocal done
        task = NumTask(i)
        try:
            await flow.process(task, timeout_sec=60)
        except ValueError as exc:
            ok = i % 100 == 42 and isinstance(exc, FlowError)
            outcomes['handler error' if ok else 'WRONG'] += 1
            if not ok:
                wrong.append((i, repr(exc)))
        except WorkerDiedError:
            outcomes['worker died'] += 1
        except Exception as exc:  # noqa: BLE001 - every other outcome is a failure of the soak
            outcomes['WRONG'] += 1
            wrong.append((i, repr(exc)))
        else:
            if task.result == i * 2 + 1 and i % 100 != 42:
                outcomes['ok'] += 1
            else:
                outcomes['WRONG'] += 1
                wrong.append((i, task.result))
        done += 1
        if done in kill_at:
            victim = workers()[done % 2]
            killed.append(victim.pid)
            os.kill(victim.pid, signal.SIGKILL)
        if done % 10_000 == 0:
            samples.append((done, round(rss_mb(), 1)))

    async def lane(start: int) -> None:
        for i in range(start, args.tasks, args.in_flight):
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(lane(k) for k in range(args.in_flight)))
    elapsed = time.perf_counter() - started
    health = flow.health()
    await flow.stop()

    print('| tasks | RSS main+workers (MiB) |')
    print('|---|---|')
    for s in samples:
        print(f'| {s[0]:,} | {s[1]:,} |')
    warm = samples[min(1, len(samples) - 1)][1]
    summary = {
        'tasks': args.tasks,
        'seconds': round(elapsed, 2),
        'tasks_per_s': round(args.tasks / elapsed),
        'outcomes': dict(outcomes),
        'accounted': sum(outcomes.values()),
        'killed_pids': killed,
        'restarts': [s['restarts'] for s in health['steps']],
        'rss_after_warmup_mb': warm,
        'rss_end_mb': samples[-1][1],
        'rss_growth_mb': round(samples[-1][1] - warm, 1),
        'wrong_examples': wrong[:5],
    }
    print(json.dumps(summary))
    expected_failures = len([i for i in range(args.tasks) if i % 100 == 42])
    passed = (
        not wrong
        and summary['accounted'] == args.tasks
        and outcomes['handler error'] + outcomes['worker died'] >= expected_failures
        and summary['rss_growth_mb'] <= args.tolerance_mb
    )
    print('soak', 'passed' if passed else 'FAILED')
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(asyncio.run(main()))
