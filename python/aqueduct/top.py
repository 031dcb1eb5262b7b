"""``python -m aqueduct top``: a running flow, live.

Every flow serves a snapshot of its metrics on a Unix socket (its path is logged when the flow
starts: ``aqueduct-<pid>-<n>.sock`` in the user's private socket directory,
``$XDG_RUNTIME_DIR/aqueduct`` or ``<tmp>/aqueduct-<uid>``). ``top`` reads it every second
and shows, per step: processes alive, queue depth, tasks in flight, tasks/s, p50 and p99
handler time, mean batch size, deaths and restarts, and resident memory; and for streams
(``Flow.stream``) how many are open, parts per second and the time to the first part.

    python -m aqueduct top                 # this user's most recent flow
    python -m aqueduct top /run/user/1000/aqueduct/aqueduct-1234-1.sock
    python -m aqueduct top --once          # one frame, then exit

The answer is untrusted input: ``top`` reads only sockets of its own user (owner and peer
credentials checked), within one deadline and a size limit, and escapes control characters in
everything it prints. The sockets themselves (names, server, stale ones) are ``aqueduct._stats``.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
from typing import Dict, List, Optional

from . import _unixsock
from ._stats import default_socket_path, find_sockets, remove_stale_sockets  # noqa: F401 (re-exported)
from .metrics._flow import quantile

#: Largest stats answer read (a flow's snapshot is a few KiB per step).
MAX_SNAPSHOT = 4 << 20
#: C0 controls (ESC among them), DEL and C1 controls: what a terminal may act on.
_CONTROL = re.compile('[\x00-\x1f\x7f-\x9f]')


def read_snapshot(path: str, timeout: float = 2.0, limit: int = MAX_SNAPSHOT) -> dict:
    """The snapshot the flow serves at ``path``: from a process of this user only, complete
    within ``timeout`` seconds overall, at most ``limit`` bytes."""
    started = time.monotonic()
    what = f'the stats socket {path}'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        _unixsock.authenticate(s, what=what)  # before reading: a listener of another user is refused
        data = _unixsock.read_all(s, limit=limit, timeout=timeout, what=what, since=started)
    try:
        snap = json.loads(data)
    except ValueError as exc:
        raise _unixsock.SocketProtocolError(f'{what} did not answer JSON: {exc}') from None
    if not isinstance(snap, dict):
        raise _unixsock.SocketProtocolError(f'{what} did not answer a JSON object')
    return snap


def printable(text: object) -> str:
    """``text`` with every control character escaped (``\\x1b``): what the flow sends must not
    drive the operator's terminal."""
    return _CONTROL.sub(lambda m: f'\\x{ord(m.group()):02x}', str(text))


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
            f"{printable(step['name']):<28}{step['alive']:>4}/{step['nprocs']:<2}{step['queue_len']:>7}"
            f"{step['in_flight']:>6}"
            f'{rate:>10,.0f}{_us(quantile(handle, 0.5)):>10}{_us(quantile(handle, 0.99)):>10}{mean_batch:>7}'
            f"{step['deaths']:>8}{step['restarts']:>9}{snap['rss'].get(step['name'], 0) / 2**20:>9.0f}"
        )
    totals: Dict[str, int] = {}
    for counts in snap['outcomes'].values():
        for k, n in counts.items():
            totals[k] = totals.get(k, 0) + n
    lines.append('')
    lines.append('tasks: ' + '  '.join(f'{k} {n:,}' for k, n in totals.items()))
    for i, step in enumerate(snap['steps']):
        if not (step.get('streams_open') or step.get('stream_parts')):
            continue
        before = previous['steps'][i] if previous else None
        parts = step['stream_parts'] - (before.get('stream_parts', 0) if before else 0)
        first = _delta(step['first_part_us'][0], before['first_part_us'][0] if before else None)
        lines.append(
            f"streams into {printable(step['name'])}: {step['streams_open']} open, "
            f'{parts / dt if previous and dt > 0 else 0.0:,.0f} parts/s, first part p50 {_us(quantile(first, 0.5))}'
        )
    # Every field, not only the names: any of them may be a string from the peer.
    return '\n'.join(printable(line) for line in lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m aqueduct top', description='Show a running flow, live.')
    parser.add_argument('socket', nargs='?', help='the flow stats socket (default: the most recent flow)')
    parser.add_argument('--interval', type=float, default=1.0, help='seconds between refreshes')
    parser.add_argument('--once', action='store_true', help='print one frame and exit')
    args = parser.parse_args(argv)
    path = args.socket
    if path is None:
        try:
            found = find_sockets()
        except OSError as exc:
            print(printable(f'cannot look for flows: {exc}'), file=sys.stderr)
            return 1
        if not found:
            print('no running aqueduct flow of this user found', file=sys.stderr)
            return 1
        path = found[0]
    previous, before = None, time.monotonic()
    try:
        while True:
            try:
                snap = read_snapshot(path)
            except OSError as exc:
                print(printable(f'cannot read {path}: {exc}'), file=sys.stderr)
                return 1
            now = time.monotonic()
            try:
                frame = render(snap, previous, now - before)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                print(printable(f'unexpected answer from {path}: {exc!r}'), file=sys.stderr)
                return 1
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
