"""``python -m aqueduct top``: a running flow, live.

Every flow serves a snapshot of its metrics on a Unix socket (its path is logged when the flow
starts: ``aqueduct-<pid>-<n>.sock`` in the temporary directory). ``top`` reads it every second
and shows, per step: processes alive, queue depth, tasks in flight, tasks/s, p50 and p99
handler time, mean batch size, deaths and restarts, and resident memory.

    python -m aqueduct top                 # the most recent flow on this machine
    python -m aqueduct top /tmp/aqueduct-1234-0.sock
    python -m aqueduct top --once          # one frame, then exit
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import sys
import tempfile
import time
from typing import List, Optional

from .metrics._flow import quantile

SOCKET_GLOB = 'aqueduct-*.sock'


def default_socket_path(flow_number: int) -> str:
    return os.path.join(tempfile.gettempdir(), f'aqueduct-{os.getpid()}-{flow_number}.sock')


def find_sockets() -> List[str]:
    """Stats sockets of live flows on this machine, newest first."""
    live = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), SOCKET_GLOB)):
        try:
            pid = int(os.path.basename(path).split('-')[1])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            continue
        live.append(path)
    return sorted(live, key=os.path.getmtime, reverse=True)


def read_snapshot(path: str, timeout: float = 2.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b''.join(chunks))


def _delta(now: list, before: Optional[list]) -> list:
    if before is None:
        return now
    return [a - b for a, b in zip(now, before, strict=True)]


def _us(v: Optional[float]) -> str:
    if v is None:
        return '-'
    if v >= 1e6:
        return f'{v / 1e6:.2f} s'
    if v >= 1e3:
        return f'{v / 1e3:.1f} ms'
    return f'{v:.0f} µs'


def render(snap: dict, previous: Optional[dict], dt: float) -> str:
    """One frame of the table."""
    lines = [
        f"aqueduct top - pid {snap['pid']}, state {snap['state']}, ready {'yes' if snap['ready'] else 'no'}",
        '',
        f"{'step':<28}{'procs':>7}{'queue':>7}{'held':>6}{'tasks/s':>10}{'p50':>10}{'p99':>10}"
        f"{'batch':>7}{'deaths':>8}{'restarts':>9}{'rss MiB':>9}",
    ]
    for i, step in enumerate(snap['steps']):
        before = previous['steps'][i] if previous else None
        handle = _delta(step['handle_us'][0], before['handle_us'][0] if before else None)
        batches = step['batch_size'][1] - (before['batch_size'][1] if before else 0)
        tasks = step['batch_size'][2] - (before['batch_size'][2] if before else 0)
        rate = tasks / dt if previous and dt > 0 else 0.0
        mean_batch = f'{tasks / batches:.1f}' if batches else '-'
        lines.append(
            f"{step['name']:<28}{step['alive']:>4}/{step['nprocs']:<2}{step['queue_len']:>7}{step['in_flight']:>6}"
            f'{rate:>10,.0f}{_us(quantile(handle, 0.5)):>10}{_us(quantile(handle, 0.99)):>10}{mean_batch:>7}'
            f"{step['deaths']:>8}{step['restarts']:>9}{snap['rss'].get(step['name'], 0) / 2**20:>9.0f}"
        )
    totals = {}
    for counts in snap['outcomes'].values():
        for k, n in counts.items():
            totals[k] = totals.get(k, 0) + n
    lines.append('')
    lines.append('tasks: ' + '  '.join(f'{k} {n:,}' for k, n in totals.items()))
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m aqueduct top', description='Show a running flow, live.')
    parser.add_argument('socket', nargs='?', help='the flow stats socket (default: the most recent flow)')
    parser.add_argument('--interval', type=float, default=1.0, help='seconds between refreshes')
    parser.add_argument('--once', action='store_true', help='print one frame and exit')
    args = parser.parse_args(argv)
    path = args.socket
    if path is None:
        found = find_sockets()
        if not found:
            print('no running aqueduct flow found', file=sys.stderr)
            return 1
        path = found[0]
    previous, before = None, time.monotonic()
    try:
        while True:
            try:
                snap = read_snapshot(path)
            except OSError as exc:
                print(f'cannot read {path}: {exc}', file=sys.stderr)
                return 1
            now = time.monotonic()
            frame = render(snap, previous, now - before)
            if previous is not None or not args.once:
                if not args.once:
                    print('\033[2J\033[H', end='')
                print(frame, flush=True)
                if args.once:
                    return 0
            previous, before = snap, now
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
