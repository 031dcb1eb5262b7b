"""Streaming over HTTP: time to first part and parts per second, ours (aiohttp +
``Flow.stream``) against mosec's SSE worker and LitServe's ``stream=True``, same run.

    python bench/peers/stream_run.py [--rounds 2] [--only ours_http,ours,mosec,litserve]

ours_http is the Rust HTTP front (its Rust threads write the handler's events); ours is aiohttp
with ``Flow.stream``. Scenarios: 100 short tokens, and 10 parts of a 1 MiB array as base64 text, each at 1 stream at a
time (30 requests in a row) and at 64 concurrent streams (3 waves of 64). Each framework runs in
its own venv (``setup.py``); the client is this interpreter's aiohttp on 127.0.0.1. Time to
first part is from sending the request to the first body bytes (the first part); parts per
second counts every part received over the scenario's wall time. Medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import _cpu_model, free_port, stop_session, venv_python  # noqa: E402

#: framework -> (URL path, what marks one part in the body)
SERVERS = {
    'ours_http': ('/stream', b'data: '),
    'ours': ('/stream', b'data: '),
    'mosec': ('/inference', b'data: '), 'litserve': ('/predict', b'{"part"'),
}
LABELS = {
    'ours_http': 'aqueduct-rs HTTP front',
    'ours': 'aqueduct-rs + aiohttp', 'mosec': 'mosec 0.9 (SSEWorker)', 'litserve': 'LitServe 0.2 (stream=True)',
}
SCENARIOS = [(100, False, 1), (100, False, 64), (10, True, 1), (10, True, 64)]


class Server:
    def __init__(self, framework: str):
        self.framework = framework
        self.port = free_port()
        path, self.marker = SERVERS[framework]
        self.url = f'http://127.0.0.1:{self.port}{path}'
        self.log = HERE / '.cache' / f'stream-{framework}.log'
        cmd = [str(venv_python(framework)), 'stream_servers.py', '--framework', framework, '--port', str(self.port)]
        with open(self.log, 'wb') as log:
            self.proc = subprocess.Popen(
                cmd, cwd=HERE / 'servers', start_new_session=True, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        stop_session(self.proc)


#: Length of one big part's text (1 MiB as base64, `servers/stream_servers.BIG`).
BIG_TEXT = 4 * -(-(1 << 20) // 3)


async def one(session: aiohttp.ClientSession, server: Server, parts: int, big: bool) -> float:
    """Streams one request; returns its time to first part. Raises unless every part came:
    small parts are counted by their markers; big ones by the bytes that came (a scan of every
    megabyte for markers costs the client, which shares the 2 CPUs with the server, more than
    a server spends on it)."""
    started = time.perf_counter()
    first = None
    count = size = 0
    tail = b''
    edge = len(server.marker) - 1
    async with session.post(server.url, json={'parts': parts, 'big': big}) as response:
        if response.status != 200:
            raise RuntimeError(f'{server.framework}: status {response.status}: {(await response.text())[:200]}')
        async for chunk in response.content.iter_any():
            if first is None:
                first = time.perf_counter() - started
            size += len(chunk)
            if not big:  # markers across the edge of the last chunk, then the ones in this one
                count += (tail + chunk[:edge]).count(server.marker) + chunk.count(server.marker)
                tail = (tail + chunk)[-edge:] if len(chunk) < edge else chunk[-edge:]
    if big:
        # Each part's text and its framing (tens of bytes), nothing missing, nothing extra.
        count = parts if parts * BIG_TEXT <= size <= parts * (BIG_TEXT + 64) else -1
    if count != parts:
        raise RuntimeError(f'{server.framework}: {count} parts of {parts} ({size} bytes)')
    assert first is not None
    return first


async def wait_ready(server: Server, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < end:
            if server.proc.poll() is not None:
                raise RuntimeError(f'{server.framework} exited: {server.log.read_text()[-2000:]}')
            try:
                await one(session, server, 2, False)
                return
            except (aiohttp.ClientError, RuntimeError):
                await asyncio.sleep(0.2)  # a server that is starting: no event to wait on
    raise RuntimeError(f'{server.framework}: not answering')


async def scenario(server: Server, parts: int, big: bool, streams: int) -> dict:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        waves = 30 if streams == 1 else 3
        firsts = []
        t0 = time.perf_counter()
        for _ in range(waves):
            firsts += await asyncio.gather(*(one(session, server, parts, big) for _ in range(streams)))
        wall = time.perf_counter() - t0
    return {'ttfp_ms': statistics.median(firsts) * 1e3, 'parts_per_s': waves * streams * parts / wall}


async def measure(framework: str) -> dict:
    server = Server(framework)
    try:
        await wait_ready(server)
        await scenario(server, 10, False, 16)  # warm-up
        return {f'{p}/{int(b)}/{s}': await scenario(server, p, b, s) for p, b, s in SCENARIOS}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--only', default=','.join(SERVERS))
    args = parser.parse_args()
    names = args.only.split(',')
    results: dict = {n: [] for n in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            r = asyncio.run(measure(name))
            results[name].append(r)
            print(f'round {round_ + 1} {name}: {json.dumps(r)}', flush=True)
    out = HERE.parent / 'results' / 'peers_streaming.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'cpu': _cpu_model(), 'results': results}, indent=1))
    print(f'\n2 CPUs ({_cpu_model()}); {args.rounds} rounds, medians; 127.0.0.1, aiohttp client.\n')
    heads = [f'{p} {"1 MiB" if b else "small"} parts, {s} stream(s): TTFP / parts/s' for p, b, s in SCENARIOS]
    print('| framework | ' + ' | '.join(heads) + ' |')
    print('|---|' + '---|' * len(SCENARIOS))
    for name in names:
        cells = []
        for p, b, s in SCENARIOS:
            runs = [r[f'{p}/{int(b)}/{s}'] for r in results[name]]
            ttfp = statistics.median(x['ttfp_ms'] for x in runs)
            rate = statistics.median(x['parts_per_s'] for x in runs)
            cells.append(f'{ttfp:.2f} ms / {rate:,.0f}')
        print(f'| {LABELS[name]} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
