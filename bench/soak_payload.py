"""Soak: many large payloads through a 2-step flow; RSS and shared memory must stay flat.

Sends ``--tasks`` tasks (default 10,000), each carrying a fresh 16 MiB numpy array (no
``share_value``), 4 in flight, through two steps that read it. Every ``--every`` tasks it samples
the resident memory of the main process and all workers (psutil; shared pages are counted in
each process that touches them) and the pool's bytes in use and warm. Prints a table and a JSON
summary; exits non-zero if memory grew by more than ``--tolerance-mb`` after warm-up.

Run: ``python bench/soak_payload.py [--tasks N] [--mb 16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np
import psutil
from aqueduct import BaseTask, BaseTaskHandler, Flow, shm


class PayloadTask(BaseTask):
    def __init__(self, arr: np.ndarray):
        super().__init__()
        self.arr = arr
        self.first = None
        self.last = None


class ReadFirst(BaseTaskHandler):
    def handle(self, *tasks: PayloadTask) -> None:
        for t in tasks:
            t.first = int(t.arr[0])


class ReadLast(BaseTaskHandler):
    def handle(self, *tasks: PayloadTask) -> None:
        for t in tasks:
            t.last = int(t.arr[-1])


def rss_mb() -> float:
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tasks', type=int, default=10_000)
    parser.add_argument('--mb', type=int, default=16)
    parser.add_argument('--in-flight', type=int, default=4)
    parser.add_argument('--every', type=int, default=1000)
    parser.add_argument('--tolerance-mb', type=float, default=64.0)
    args = parser.parse_args()

    size = args.mb << 20
    flow = Flow(ReadFirst(), ReadLast())
    flow.start(timeout=60)
    pool = shm.pool()
    samples = []
    done = 0
    started = time.perf_counter()

    async def one(i: int) -> None:
        arr = np.full(size, i % 251, dtype=np.uint8)
        arr[-1] = (i + 1) % 251
        task = PayloadTask(arr)
        await flow.process(task, timeout_sec=60)
        assert task.first == i % 251 and task.last == (i + 1) % 251, 'payload corrupted'

    async def lane(start: int) -> None:
        nonlocal done
        for i in range(start, args.tasks, args.in_flight):
            await one(i)
            done += 1
            if done % args.every == 0:
                samples.append((done, round(rss_mb(), 1), pool.used_bytes >> 20, pool.warm_bytes >> 20))

    await asyncio.gather(*(lane(k) for k in range(args.in_flight)))
    elapsed = time.perf_counter() - started
    await flow.stop()

    print('| tasks | RSS main+workers (MiB) | pool in use (MiB) | pool warm (MiB) |')
    print('|---|---|---|---|')
    for s in samples:
        print(f'| {s[0]:,} | {s[1]:,} | {s[2]:,} | {s[3]:,} |')
    warm = samples[len(samples) // 5] if len(samples) >= 5 else samples[0]
    growth = samples[-1][1] - warm[1]
    summary = {
        'tasks': args.tasks,
        'payload_mb': args.mb,
        'tasks_per_s': round(args.tasks / elapsed, 1),
        'gb_moved_per_s': round(args.tasks * args.mb / 1024 / elapsed, 2),
        'rss_after_warmup_mb': warm[1],
        'rss_end_mb': samples[-1][1],
        'rss_growth_mb': round(growth, 1),
        'pool_in_use_end_mb': samples[-1][2],
        'pool_in_use_max_mb': max(s[2] for s in samples),
    }
    print(json.dumps(summary))
    return 0 if growth <= args.tolerance_mb else 1


if __name__ == '__main__':
    sys.exit(asyncio.run(main()))
