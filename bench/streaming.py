"""Streaming in one process: time to first part and parts per second of ``Flow.stream``, against
the same flow's ``process()`` round trip, in one run.

Two handlers: 100 small parts (a token each) and 10 parts of a 1 MiB float32 array; 1 and 64
concurrent streams (one stream: 30 in a row, for a median); 2 worker processes, without
batching and with batches of up to 16 collected for at most 5 ms (where a lone task waits those
5 ms, in `process()` as in `stream()`).

    python bench/streaming.py [--rounds 3]

Prints a Markdown table with the host; medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep  # noqa: E402
from run import machine_info  # noqa: E402

ARRAY = 1 << 18  # float32 values: 1 MiB


class Job(BaseTask):
    def __init__(self, parts: int, big: bool):
        super().__init__()
        self.parts = parts
        self.big = big
        self.done = 0


class Emit(BaseTaskHandler):
    def on_start(self) -> None:
        self.array = np.ones(ARRAY, dtype=np.float32)

    def handle(self, *tasks: Job):
        for i in range(max(t.parts for t in tasks)):
            for task in tasks:
                if i < task.parts:
                    task.done = i + 1
                    yield task, (self.array if task.big else f'token {i}')


async def one_stream(flow: Flow, parts: int, big: bool) -> tuple:
    started = time.perf_counter()
    first = None
    n = 0
    async for _ in flow.stream(Job(parts, big), timeout_sec=120):
        if first is None:
            first = time.perf_counter() - started
        n += 1
    assert n == parts
    return first, time.perf_counter() - started


async def scenario(flow: Flow, streams: int, parts: int, big: bool) -> dict:
    """One wave of ``streams`` concurrent streams, or for a single stream 30 in a row: one
    stream's time to first part is one sample, too few for a median."""
    waves = 30 if streams == 1 else 1
    t0 = time.perf_counter()
    results = []
    for _ in range(waves):
        results += await asyncio.gather(*(one_stream(flow, parts, big) for _ in range(streams)))
    wall = time.perf_counter() - t0
    firsts = sorted(r[0] for r in results)
    return {'ttfp_ms': statistics.median(firsts) * 1e3, 'parts_per_s': waves * streams * parts / wall}


async def round_trip(flow: Flow, n: int = 200) -> float:
    """Median ``process()`` round trip of a task with no parts to send, in ms."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await flow.process(Job(0, False))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    print(machine_info())
    for batch_size, batch_timeout in [(1, 0.0), (16, 0.005)]:
        flow = Flow(FlowStep(Emit(), nprocs=2, batch_size=batch_size, batch_timeout=batch_timeout))
        flow.start(timeout=60)
        cases = [(1, 100, False), (64, 100, False), (1, 10, True), (64, 10, True)]
        got: dict = {c: [] for c in cases}
        trips = []
        try:
            await one_stream(flow, 10, False)  # warm-up
            for _ in range(args.rounds):
                trips.append(await round_trip(flow))
                for case in cases:
                    got[case].append(await scenario(flow, *case))
        finally:
            await flow.stop()
        trip = statistics.median(trips)
        print(f'\nbatch_size={batch_size}, batch_timeout={batch_timeout}: `process()` round trip (no parts) '
              f'{trip:.3f} ms (median of {args.rounds} rounds of 200)\n')
        print('| streams | parts | part | time to first part | ratio to process() | parts/s |')
        print('|---|---|---|---|---|---|')
        for (streams, parts, big), runs in got.items():
            ttfp = statistics.median(r['ttfp_ms'] for r in runs)
            rate = statistics.median(r['parts_per_s'] for r in runs)
            kind = '1 MiB array' if big else 'small str'
            print(f'| {streams} | {parts} | {kind} | {ttfp:.3f} ms | {ttfp / trip:.2f}x | {rate:,.0f} |')


if __name__ == '__main__':
    asyncio.run(main())
