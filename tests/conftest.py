"""Fixtures: a flow factory that always stops its flows and checks nothing is left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from typing import Callable, Iterator

import psutil
import pytest
from aqueduct import Flow


def _is_multiprocessing_helper(proc: psutil.Process) -> bool:
    """multiprocessing's own long-lived helpers (the resource tracker, the fork server) are
    started by ``spawn``/``forkserver`` and outlive any flow by design."""
    try:
        cmdline = ' '.join(proc.cmdline())
    except psutil.Error:
        return False
    return 'resource_tracker' in cmdline or 'forkserver' in cmdline


async def until(condition, timeout: float = 10.0) -> None:
    """Polls ``condition``: for state of another process, or of a flow, that no event announces."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, 'condition not reached'
        await asyncio.sleep(0.01)


def children() -> list:
    """Live descendant processes, except multiprocessing's helpers."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and not _is_multiprocessing_helper(proc):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


@contextlib.contextmanager
def python_script(code: str) -> Iterator[subprocess.Popen]:
    """Runs ``code`` in a fresh interpreter (from the repository root, stdout piped as text);
    a child the test leaves running is killed and reaped."""
    proc = subprocess.Popen(
        [sys.executable, '-c', textwrap.dedent(code)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


def finish_or_dump(proc: subprocess.Popen, timeout: float, hung: str) -> str:
    """Waits for a ``python_script`` that registered ``faulthandler`` on SIGUSR1; if it does not
    finish in time, has it dump every thread's stack to stderr and fails with ``hung``.
    Returns its stdout."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGUSR1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        raise AssertionError(hung) from None
    return proc.stdout.read()


@pytest.fixture(params=['fork', 'spawn'])
def start_method(request) -> str:
    return request.param


def flow_factory(flows: list, prepare: Callable[[tuple, dict], tuple], start_timeout: float = 30) -> Callable:
    """``make(*steps, start=True, timeout=..., **kwargs)``: a flow of ``prepare(steps, kwargs)``
    (the steps and keyword arguments to build it from), kept in ``flows`` for the teardown, and
    started unless ``start=False``."""

    def make(*steps, start: bool = True, timeout: float | None = start_timeout, **kwargs) -> Flow:
        steps, kwargs = prepare(steps, kwargs)
        flow = Flow(*steps, **kwargs)
        flows.append(flow)
        if start:
            flow.start(timeout=timeout)
        return flow

    return make


def without_start_method(kwargs: dict) -> dict:
    """A flow's arguments without ``mp_start_method``: for steps whose slots are no processes."""
    return {k: v for k, v in kwargs.items() if k != 'mp_start_method'}


@pytest.fixture
async def make_flow(start_method):
    """``make_flow(*steps, **kwargs)`` builds and starts a flow with the test's start method;
    at teardown every flow is stopped and no worker process may remain."""
    flows: list[Flow] = []
    yield flow_factory(flows, lambda steps, kwargs: (steps, {'mp_start_method': start_method, **kwargs}))
    for flow in flows:
        await flow.stop(graceful=False)
    assert children() == [], 'worker processes left behind'


@pytest.fixture(scope='session', autouse=True)
def multiprocessing_helpers():
    """Start the long-lived helpers (multiprocessing's, aqueduct's shared-memory pool) once, up
    front, so that the descriptors they keep open for the life of the process are not mistaken
    for leaks of the first test that happens to start them."""
    from multiprocessing import forkserver, resource_tracker

    from aqueduct import shm

    resource_tracker.ensure_running()
    forkserver.ensure_running()
    shm.pool()  # the process-wide shared-memory pool lives as long as the process


@pytest.fixture(autouse=True)
def no_leaked_fds():
    """Every test must give back the descriptors it opened (memfd, eventfd, epoll, pidfds)."""
    before = set(os.listdir('/proc/self/fd'))
    yield
    after = set(os.listdir('/proc/self/fd'))
    leaked = sorted(int(fd) for fd in after - before)
    details = []
    for fd in leaked:
        try:
            details.append(f'{fd} -> {os.readlink(f"/proc/self/fd/{fd}")}')
        except OSError:
            pass
    assert not details, f'file descriptors leaked: {details}'


@pytest.fixture
def socket_path(tmp_path, monkeypatch):
    path = str(tmp_path / 'flow.sock')
    monkeypatch.setenv('_SOCKET_PATH', path)
    return path


@pytest.fixture
def servers():
    """Flow servers started by a test; stopped (and checked gone) at teardown."""
    started = []
    yield started
    for server in started:
        server.stop(timeout=10)
        assert not server.is_alive()
    # The server's workers (and a handed-over flow's zygote, a child of this process) exit once
    # the server has stopped them: wait for that, boundedly, rather than look at one instant.
    _, alive = psutil.wait_procs(children(), timeout=10)
    assert alive == [], f'processes left behind: {alive}'
