"""The example aiohttp service under load: aqueduct-rs against aqueduct 1.15, in the same run.

    python bench/http_compare.py [--quick] [--duration S] [--concurrency N]

Serves ``examples/aiohttp`` four ways, one after the other, each on a fresh port:

- ``app.py`` (one web process with its own flow) on aqueduct-rs and on aqueduct 1.15;
- ``shared.py`` under gunicorn ``--preload`` with 2 web workers sharing one flow through
  ``SocketFlow``, on aqueduct-rs and on aqueduct 1.15.

The same code runs on both (the examples use only the API the two share). For each, a load
client in its own process keeps ``--concurrency`` requests in flight (``POST /classify`` with a
256 x 256 image, 192 KiB) for ``--duration`` seconds after a warm-up, and reports requests/s and
latency percentiles. The load client runs on the same machine and takes CPU from the service:
the numbers compare the implementations, they are not the machine's capacity.

Writes ``bench/results/http.json``; ``bench/run.py`` puts the table into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / 'examples'
RESULTS = ROOT / 'bench' / 'results' / 'http.json'
OURS = ROOT / '.venv' / 'bin' / 'python'
BASELINE = ROOT / 'bench' / '.venv-aqueduct115' / 'bin' / 'python'

LOAD_CLIENT = r'''
import asyncio, json, sys, time
import aiohttp
sys.path.insert(0, sys.argv[1])
from pipeline import sample_image

url, concurrency, warmup, duration = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
image = sample_image(256, 256)

async def main():
    latencies, errors = [], 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker():
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    async with session.post(url, data=image) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else None
    print(json.dumps({"rps": len(latencies) / duration, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
                      "requests": len(latencies), "errors": errors}))

asyncio.run(main())
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def log(message: str) -> None:
    print(f'[http_compare] {message}', file=sys.stderr, flush=True)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """POSTs a small image until it is answered: aqueduct 1.15's app has no health route."""
    sys.path.insert(0, str(EXAMPLES))
    from pipeline import sample_image

    body = sample_image(32, 32)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f'the server exited with {proc.returncode}')
        try:
            request = urllib.request.Request(f'http://127.0.0.1:{port}/classify', data=body, method='POST')
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError('not ready in time')


def variants(ours: Path, baseline: Path) -> List[Dict[str, Any]]:
    def one_process(python: Path) -> List[str]:
        return [str(python), 'examples/aiohttp/app.py', '--port', '{port}']

    def gunicorn(python: Path) -> List[str]:
        return [
            str(python), '-m', 'gunicorn', 'shared:app', '--chdir', 'examples/aiohttp', '--preload',
            '--workers', '2', '--worker-class', 'aiohttp.GunicornWebWorker', '--bind', '127.0.0.1:{port}',
            '--control-socket', '{tmp}/gunicorn.ctl',
        ]  # fmt: skip

    return [
        {'name': 'one web process', 'impl': 'aqueduct-rs', 'python': ours, 'args': one_process(ours)},
        {'name': 'one web process', 'impl': 'aqueduct 1.15', 'python': baseline, 'args': one_process(baseline)},
        {'name': '2 gunicorn workers, one shared flow', 'impl': 'aqueduct-rs', 'python': ours, 'args': gunicorn(ours)},
        {
            'name': '2 gunicorn workers, one shared flow',
            'impl': 'aqueduct 1.15',
            'python': baseline,
            'args': gunicorn(baseline),
        },
    ]


def measure(variant: Dict[str, Any], ours: Path, concurrency: int, warmup: float, duration: float) -> Dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args = [a.format(port=port, tmp=tmp) for a in variant['args']]
        env = {**os.environ, '_SOCKET_PATH': f'{tmp}/flow.sock', 'PYTHONPATH': str(EXAMPLES)}
        env.pop('VIRTUAL_ENV', None)
        with tempfile.TemporaryFile() as err:
            server = subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
            try:
                wait_ready(port, server)
                load = subprocess.run(
                    [str(ours), '-c', LOAD_CLIENT, str(EXAMPLES), f'http://127.0.0.1:{port}/classify',
                     str(concurrency), str(warmup), str(duration)],
                    capture_output=True, text=True, timeout=warmup + duration + 120,
                )  # fmt: skip
                if load.returncode != 0:
                    raise RuntimeError(f'load client failed: {load.stderr[-500:]}')
                result = json.loads(load.stdout.strip().splitlines()[-1])
            except Exception as exc:
                err.seek(0)
                result = {'error': f'{exc}; server stderr: {err.read().decode(errors="replace")[-800:]}'}
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
                time.sleep(1.0)  # let the flow's processes go before the next server starts
    return {'variant': variant['name'], 'impl': variant['impl'], **result}


def render(data: Dict[str, Any]) -> List[str]:
    """Markdown lines for docs/benchmarks.md."""
    rows = data['results']
    lines = [
        '## HTTP: the example aiohttp service under load',
        '',
        (
            f"`python bench/http_compare.py` on {data['date']}: `examples/aiohttp` (2-step image "
            f"classification, numpy) with {data['concurrency']} requests in flight for {data['duration']} s "
            'after a warm-up, 256 x 256 images (192 KiB). The load client runs on the same 2 CPUs.'
        ),
        '',
        '| service | implementation | requests/s | p50 (ms) | p99 (ms) | vs 1.15 |',
        '| --- | --- | --- | --- | --- | --- |',
    ]
    by_key = {(r['variant'], r['impl']): r for r in rows}
    for r in rows:
        if 'error' in r:
            lines.append(f"| {r['variant']} | {r['impl']} | failed: {r['error'][:120]} | | | |")
            continue
        base = by_key.get((r['variant'], 'aqueduct 1.15'), {})
        ratio = f"{r['rps'] / base['rps']:.1f}x" if r['impl'] != 'aqueduct 1.15' and base.get('rps') else '—'
        lines.append(
            f"| {r['variant']} | {r['impl']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {ratio} |"
        )
    one = by_key.get(('one web process', 'aqueduct-rs'), {})
    two = by_key.get(('2 gunicorn workers, one shared flow', 'aqueduct-rs'), {})
    if one.get('rps') and two.get('rps'):
        lines += [
            '',
            f"Two web workers sharing one flow serve {two['rps'] / one['rps']:.2f}x the requests of one web "
            'process with its own flow, on the same machine.',
        ]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='short windows (a smoke test)')
    parser.add_argument('--duration', type=float, default=None, help='seconds measured per service (default 15)')
    parser.add_argument('--concurrency', type=int, default=32)
    parser.add_argument('--ours', type=Path, default=OURS)
    parser.add_argument('--baseline', type=Path, default=BASELINE)
    args = parser.parse_args(argv)
    duration = args.duration or (3.0 if args.quick else 15.0)
    warmup = 1.0 if args.quick else 3.0
    if not args.baseline.exists():
        setup = subprocess.run(['bash', str(ROOT / 'bench' / 'setup_baseline.sh')], cwd=ROOT)
        if setup.returncode != 0:
            log('cannot create the aqueduct 1.15 venv; its rows will fail')
    results = []
    for variant in variants(args.ours, args.baseline):
        log(f"{variant['name']}, {variant['impl']} ...")
        result = measure(variant, args.ours, args.concurrency, warmup, duration)
        log(json.dumps(result))
        results.append(result)
    data = {
        'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
        'concurrency': args.concurrency,
        'duration': duration,
        'quick': args.quick,
        'results': results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2))
    print('\n'.join(render(data)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
