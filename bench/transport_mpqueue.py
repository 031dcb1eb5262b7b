"""The multiprocessing.Queue row of the transport micro-benchmark (see ARCHITECTURE.md).

Same method as ``cargo bench -p aqueduct-core --bench transport_compare``: between two processes,
for 64 B, 4 KiB and 1 MiB messages, one-way latency by ping-pong (the sender stamps
``time.monotonic_ns()`` into the message, the receiver subtracts) and round trips per second
with a window of 64 messages in flight. ``multiprocessing.Queue`` is what aqueduct 1.15 chains
its steps with.

Run: ``python bench/transport_mpqueue.py [--quick]``.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time

SIZES = [64, 4096, 1 << 20]
WINDOW = 64


def echo(inbox: mp.Queue, outbox: mp.Queue, lat: mp.Queue) -> None:
    latencies = []
    while True:
        msg = inbox.get()
        if msg is None:
            break
        latencies.append(time.monotonic_ns() - int.from_bytes(msg[:8], 'little'))
        outbox.put(msg)
    lat.put(latencies)


def measure(size: int, n: int) -> tuple[float, float, float]:
    ctx = mp.get_context('fork')
    inbox, outbox, lat = ctx.Queue(), ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=echo, args=(inbox, outbox, lat))
    proc.start()
    payload = bytearray(size)

    def message() -> bytes:
        payload[:8] = time.monotonic_ns().to_bytes(8, 'little')
        return bytes(payload)

    for _ in range(n):
        inbox.put(message())
        outbox.get()
    started = time.perf_counter()
    sent = done = 0
    while done < n:
        while sent < n and sent - done < WINDOW:
            inbox.put(message())
            sent += 1
        outbox.get()
        done += 1
    rate = n / (time.perf_counter() - started)
    inbox.put(None)
    latencies = sorted(lat.get()[:n])
    proc.join()
    return latencies[len(latencies) // 2] / 1e3, latencies[len(latencies) * 99 // 100] / 1e3, rate


def main() -> None:
    quick = '--quick' in sys.argv
    pings = 2000 if quick else 20000
    print(f'| transport | size | one-way p50 | one-way p99 | round trips/s (window {WINDOW}) |')
    print('|---|---|---|---|---|')
    for size in SIZES:
        n = pings // 20 if size >= 1 << 20 else pings
        p50, p99, rate = measure(size, n)
        label = f'{size >> 20} MiB' if size >= 1 << 20 else f'{size >> 10} KiB' if size >= 1024 else f'{size} B'
        print(f'| multiprocessing.Queue | {label} | {p50:.1f} µs | {p99:.1f} µs | {rate:.0f} |')


if __name__ == '__main__':
    main()
