"""A load client for the example services: ``concurrency`` clients POST the same image for
``duration`` seconds; prints one JSON line with requests/s, latency percentiles and errors.

Run: ``python examples/load.py http://127.0.0.1:8080/classify [--concurrency 32] [--duration 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline import sample_image  # noqa: E402


async def run(url: str, concurrency: int, duration: float, image: bytes) -> dict:
    latencies = []
    errors = 0
    deadline = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=image) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3, 2) if latencies else None  # noqa: E731
    return {
        'requests_per_s': round(len(latencies) / elapsed, 1),
        'p50_ms': pick(0.5),
        'p99_ms': pick(0.99),
        'ok': len(latencies),
        'errors': errors,
        'concurrency': concurrency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('url')
    parser.add_argument('--concurrency', type=int, default=32)
    parser.add_argument('--duration', type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.url, args.concurrency, args.duration, sample_image()))))


if __name__ == '__main__':
    main()
