"""The example services, run as real servers on 127.0.0.1 and sent real HTTP requests.

Each server runs in its own session (process group); the test records every process of it
before asking it to stop, and checks that all of them are gone afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import aiohttp
import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / 'examples'
sys.path.insert(0, str(EXAMPLES))

from pipeline import sample_image  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Polls ``url`` until it answers 200: the server is another process, and HTTP is the only
    thing it tells us."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f'the server exited with {proc.returncode} before it was ready')
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise AssertionError(f'{url} not ready within {timeout} s')


class Server:
    """A server process started by :func:`server_process`."""

    def __init__(self, proc: subprocess.Popen, base: str, port: int = 0):
        self.proc = proc
        self.base = base
        self.port = port

    def family(self) -> List[psutil.Process]:
        """The server and every process under it, now."""
        return [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)

    def wait_exit(self, timeout: float = 60) -> tuple:
        """Waits for the server to exit: ``(exit code, its stderr)``."""
        _, stderr = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, stderr.decode()


@contextlib.contextmanager
def server_process(args: List[str], port: int = 0, env: dict | None = None) -> Iterator[Server]:
    """Runs a server in its own session and yields it once ``/healthz`` answers; whatever the
    test leaves running is killed, the whole session. With ``port`` 0 the server binds an
    ephemeral port itself and prints it as its first line of output, so that no other process
    can take the port between the choice and the bind."""
    proc = subprocess.Popen(
        args, cwd=str(ROOT), env={**os.environ, **(env or {})}, start_new_session=True,
        stdout=subprocess.PIPE if port == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        if port == 0:
            line = proc.stdout.readline()
            if not line.strip().isdigit():
                raise AssertionError(f'the server printed {line!r} instead of its port (exit code {proc.poll()})')
            port = int(line)
        server = Server(proc, f'http://127.0.0.1:{port}', port)
        wait_ready(server.base + '/healthz', proc)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
        if proc.stdout is not None:
            proc.stdout.close()


def assert_all_gone(processes: List[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=20)
    assert alive == [], f'processes left behind: {alive}'


@contextlib.contextmanager
def serve(args: List[str], port: int, env: dict | None = None, stop=signal.SIGTERM) -> Iterator[str]:
    """Runs a server; yields its base URL; stops it with ``stop`` and checks that it exits with
    0 and leaves no process behind."""
    with server_process(args, port, env) as server:
        yield server.base
        processes = server.family()
        server.proc.send_signal(stop)
        code, log = server.wait_exit()
        assert code == 0, f'exit code {code}: {log[-3000:]}'
        assert_all_gone(processes)


async def classify_many(base: str, images: List[bytes], concurrency: int) -> List[dict]:
    """POSTs every image, ``concurrency`` at a time; every answer must be 200."""
    results: List[dict] = [{}] * len(images)
    sem = asyncio.Semaphore(concurrency)
    # A connection per request: the web processes share the listening socket, and each new
    # connection goes to whichever accepts it first.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

        async def one(i: int) -> None:
            body = io.BytesIO(images[i]) if len(images[i]) > 1 << 20 else images[i]  # sent with a length
            async with sem, session.post(base + '/classify', data=body) as response:
                assert response.status == 200, await response.text()
                results[i] = await response.json()

        await asyncio.gather(*(one(i) for i in range(len(images))))
    return results


def check_service(base: str, expect_metrics: bool = True) -> collections.Counter:
    """The checks every example passes; returns how many answers each web process gave."""

    async def run() -> collections.Counter:
        # A large body (a 2048 x 2048 image, 12 MiB) read straight into shared memory.
        big = sample_image(2048, 2048, seed=1)
        assert len(big) > 12 << 20
        [answer] = await classify_many(base, [big], 1)
        assert len(answer['top5']) == 5
        # The same image always gets the same classes; different images get others.
        images = [sample_image(256, 256, seed=i % 4) for i in range(96)]
        answers = await classify_many(base, images, concurrency=24)
        by_seed = {}
        for i, a in enumerate(answers):
            classes = [c for c, _ in a['top5']]
            assert by_seed.setdefault(i % 4, classes) == classes
            probabilities = [p for _, p in a['top5']]
            assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
        assert len({tuple(v) for v in by_seed.values()}) > 1
        async with aiohttp.ClientSession() as session:
            buf = io.BytesIO()
            np.save(buf, np.zeros((4, 4), dtype=np.float32))  # not an H x W x 3 uint8 image
            async with session.post(base + '/classify', data=buf.getvalue()) as response:
                assert response.status == 400
                assert 'expected an H x W x 3 uint8 image' in await response.text()
            if expect_metrics:
                async with session.get(base + '/metrics') as response:
                    assert response.status == 200
                    text = await response.text()
                    assert 'aqueduct_tasks_total' in text and 'step2_Classifier' in text
        return collections.Counter(a['served_by'] for a in answers)

    return asyncio.run(run())


def test_aiohttp_example(tmp_path):
    port = free_port()
    with serve([sys.executable, 'examples/aiohttp/app.py', '--port', str(port)], port) as base:
        served = check_service(base)
    assert len(served) == 1, 'one web process'


def test_fastapi_example_on_uvicorn(tmp_path):
    port = free_port()
    args = [sys.executable, '-m', 'uvicorn', 'app:app', '--app-dir', 'examples/fastapi', '--port', str(port)]
    with serve(args, port, stop=signal.SIGINT) as base:
        check_service(base)


def gunicorn(app: str, chdir: str, worker_class: str, port: int, tmp_path: Path) -> List[str]:
    return [
        sys.executable, '-m', 'gunicorn', app, '--chdir', chdir, '--preload', '--workers', '2',
        '--worker-class', worker_class, '--bind', f'127.0.0.1:{port}',
        '--control-socket', str(tmp_path / 'gunicorn.ctl'), '--graceful-timeout', '20',
    ]  # fmt: skip


@pytest.mark.parametrize(
    ('example', 'worker_class'),
    [('examples/aiohttp', 'aiohttp.GunicornWebWorker'), ('examples/fastapi', 'uvicorn.workers.UvicornWorker')],
)
def test_example_shared_by_two_gunicorn_workers(example, worker_class, tmp_path):
    port = free_port()
    args = gunicorn('shared:app', example, worker_class, port, tmp_path)
    env = {'_SOCKET_PATH': str(tmp_path / 'flow.sock')}
    with serve(args, port, env) as base:
        served = check_service(base, expect_metrics=False)
    assert len(served) == 2, f'both web workers answered: {served}'


def test_fastapi_example_on_uvicorn_workers_with_a_flow_server_beside(tmp_path):
    flow_socket = str(tmp_path / 'flow.sock')
    server = subprocess.Popen(
        [sys.executable, '-m', 'aqueduct', 'serve', 'pipeline:build_flow', '--socket', flow_socket],
        cwd=str(EXAMPLES), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port = free_port()
        args = [
            sys.executable, '-m', 'uvicorn', 'shared:app', '--app-dir', 'examples/fastapi',
            '--port', str(port), '--workers', '2',
        ]  # fmt: skip
        env = {'_SOCKET_PATH': flow_socket, 'AQUEDUCT_FLOW_SERVER': 'external'}
        with serve(args, port, env, stop=signal.SIGINT) as base:
            served = check_service(base, expect_metrics=False)
        assert sum(served.values()) == 96
        family = [psutil.Process(server.pid)] + psutil.Process(server.pid).children(recursive=True)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert_all_gone(family)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
