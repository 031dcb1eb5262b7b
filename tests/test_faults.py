"""Fault handling: dead launchers, hung and stopped workers, handle_timeout, stops that cannot
wait for their tasks, concurrent stops, and start-up failures.

Handlers block on a marker file the test creates, and tell the test their pid through a file
they write atomically; nothing here waits on a fixed delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from aqueduct import FlowState, FlowStep
from aqueduct.exceptions import (
    FlowError,
    HandlerTimeoutError,
    TaskTimeoutError,
    WorkerDiedError,
    WorkerStartError,
)
from aqueduct.flow import RestartPolicy

from .conftest import children, python_script
from .fault_handlers import Block, Brief, FailOnStart, Task

# ---------------------------------------------------------------------------- helpers


async def _until(condition, timeout: float = 20.0, what: str = 'condition') -> None:
    """Waits (bounded) for something the flow reaches through its event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f'{what} not reached within {timeout} s'
        await asyncio.sleep(0.005)


async def _read_when_written(path: Path, timeout: float = 20.0) -> str:
    """The content of a file a handler writes atomically, once it exists (bounded wait)."""
    await _until(path.exists, timeout, f'{path.name} written')
    return path.read_text()


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (a dead process nobody has reaped yet)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _still_running(procs: list, timeout: float) -> list:
    """Those of ``procs`` still running after at most ``timeout`` s. A zombie has exited: an
    orphan waits for init to reap it, which may take a while, so ``psutil.wait_procs`` alone
    would wait for init rather than for the process."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        psutil.wait_procs(alive, timeout=0.02)


def _describe(proc: psutil.Process) -> str:
    """What a process that should be gone is, and what it holds open (what may keep it alive)."""
    lines = [f'pid {proc.pid}']
    with contextlib.suppress(psutil.Error):
        lines.append(f'  status {proc.status()}, ppid {proc.ppid()}')
        lines.append(f'  cmdline {proc.cmdline()}')
    fd_dir = f'/proc/{proc.pid}/fd'
    with contextlib.suppress(OSError):
        for fd in sorted(os.listdir(fd_dir), key=int):
            with contextlib.suppress(OSError):
                lines.append(f'  fd {fd} -> {os.readlink(os.path.join(fd_dir, fd))}')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------- 1. forkserver


def test_forkserver_workers_and_helpers_exit_when_the_main_process_is_sigkilled():
    with python_script(
        """
        import asyncio, json, os
        import psutil
        from aqueduct import Flow, FlowStep
        from tests.fault_handlers import Block, Task

        async def main():
            flow = Flow(FlowStep(Block(), nprocs=2), mp_start_method='forkserver', stats_socket=False)
            flow.start(timeout=30)
            task = Task(1)
            await flow.process(task, timeout_sec=20)
            helpers = {}
            for child in psutil.Process().children():
                cmdline = ' '.join(child.cmdline())
                if 'forkserver' in cmdline:
                    helpers['forkserver'] = child.pid
                elif 'resource_tracker' in cmdline:
                    helpers['resource_tracker'] = child.pid
            print(json.dumps({
                'pid': os.getpid(),
                'task_pid': task.pid,
                'workers': sorted(w.pid for w in flow.view.workers()),
                **helpers,
            }), flush=True)
            await asyncio.Event().wait()  # until the test kills this process

        asyncio.run(main())
        """
    ) as proc:
        line = proc.stdout.readline()
        assert line, 'the script exited before reporting its processes'
        info = json.loads(line)
        assert len(info['workers']) == 2 and info['task_pid'] in info['workers']
        assert {'forkserver', 'resource_tracker'} <= info.keys(), f'helpers not found among the children: {info}'
        workers = [psutil.Process(pid) for pid in info['workers']]
        # forkserver workers are the fork server's children, not the main process's: nothing
        # but their own watch on the main process ends them when it is killed.
        assert all(w.ppid() == info['forkserver'] for w in workers)
        helpers = [psutil.Process(info['forkserver']), psutil.Process(info['resource_tracker'])]

        os.kill(info['pid'], signal.SIGKILL)
        proc.wait(timeout=10)

        orphaned = _still_running(workers, timeout=10)
        assert not orphaned, 'workers outlived their main process:\n' + '\n'.join(map(_describe, orphaned))
        left = _still_running(helpers, timeout=10)
        assert not left, "multiprocessing's helpers outlived the main process:\n" + '\n'.join(map(_describe, left))


# ---------------------------------------------------------------------------- 2. fork zygote


@pytest.mark.parametrize('start_method', ['fork'])
async def test_a_sigkilled_fork_zygote_takes_its_workers_along_and_a_new_one_forks_replacements(
    make_flow, tmp_path
):
    flow = make_flow(FlowStep(Block(), nprocs=2), restart_policy=RestartPolicy(max_restarts=10))
    zygote = flow._launcher.pid
    workers = {w.pid for w in flow.view.workers()}
    main_children = {c.pid for c in psutil.Process().children()}
    assert zygote in main_children and not workers & main_children, 'the zygote, not the main process, forks workers'
    assert {c.pid for c in psutil.Process(zygote).children()} == workers
    worker_procs = [psutil.Process(pid) for pid in workers]

    # One blocked task in each worker (batch_size=1, both idle): in flight when the zygote dies.
    held, holders = [], set()
    for i in range(2):
        task = Task(i, marker=str(tmp_path / 'never'), pid_file=str(tmp_path / f'pid{i}'))
        held.append(asyncio.ensure_future(flow.process(task, timeout_sec=30)))
        holders.add(int(await _read_when_written(tmp_path / f'pid{i}')))
    assert holders == workers

    os.kill(zygote, signal.SIGKILL)
    outcomes = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), 20)
    assert all(isinstance(o, WorkerDiedError) for o in outcomes), outcomes
    assert {o.pid for o in outcomes} == workers
    assert not _still_running(worker_procs, timeout=10), 'workers outlived their zygote'

    # Replacements come from a new zygote, forked from the main process.
    tasks = [Task(i) for i in range(10)]
    results = await asyncio.wait_for(asyncio.gather(*(flow.process(t, timeout_sec=20) for t in tasks)), 20)
    assert results == [True] * 10 and [t.result for t in tasks] == list(range(10))
    new_zygote = flow._launcher.pid
    assert new_zygote != zygote
    # The second replacement waits out the restart backoff.
    await _until(lambda: flow.health()['ready'], what='health ready')
    new_workers = {w.pid for w in flow.view.workers()}
    assert not new_workers & workers and {t.pid for t in tasks} <= new_workers
    assert {c.pid for c in psutil.Process(new_zygote).children()} == new_workers
    assert zygote not in {c.pid for c in psutil.Process().children()}, 'the dead zygote was not reaped'
    await _until(lambda: flow.health()['ready'], what='health ready')
    step = flow.health()['steps'][0]
    assert step['alive'] == step['ready'] == 2 and step['deaths'] == 2 and step['restarts'] == 2, step


# ---------------------------------------------------------------------------- 3. a hung worker


async def test_tasks_do_not_wait_behind_a_hung_worker(make_flow, tmp_path):
    flow = make_flow(FlowStep(Block(), nprocs=2, batch_size=1))
    marker, pid_file = tmp_path / 'release', tmp_path / 'pid'
    hung = asyncio.ensure_future(flow.process(Task(-1, marker=str(marker), pid_file=str(pid_file)), timeout_sec=40))
    try:
        hung_pid = int(await _read_when_written(pid_file))
        # Quick tasks arrive while one worker is stuck; the engine may send some ahead to the
        # stuck one, and must take them back when the other worker falls idle.
        quick = [Task(i) for i in range(50)]
        results = await asyncio.wait_for(asyncio.gather(*(flow.process(t, timeout_sec=10) for t in quick)), 20)
        assert results == [True] * 50 and [t.result for t in quick] == list(range(50))
        assert hung_pid not in {t.pid for t in quick}
        assert not hung.done(), 'the hung task finished before its marker existed'
    finally:
        marker.touch()
        released = await asyncio.wait_for(asyncio.gather(hung, return_exceptions=True), 20)
    assert released == [True]
    assert flow.health()['steps'][0]['in_flight'] == 0


# ---------------------------------------------------------------------------- 4. handle_timeout


async def test_a_handler_running_past_handle_timeout_is_killed_and_its_worker_replaced(make_flow):
    flow = make_flow(FlowStep(Block(), handle_timeout=0.5))
    first = Task(0)
    await flow.process(first)
    before = psutil.Process(first.pid)

    with pytest.raises(HandlerTimeoutError) as info:
        await asyncio.wait_for(flow.process(Task(1, forever=True), timeout_sec=30), 20)
    err = info.value
    assert isinstance(err, WorkerDiedError) and isinstance(err, FlowError)
    assert 'step1_Block' in str(err) and 'handle_timeout' in str(err), str(err)
    assert err.step_name == 'step1_Block' and err.pid == first.pid

    after = Task(2)
    await flow.process(after, timeout_sec=20)
    assert after.result == 2 and after.pid != first.pid, 'the next task ran on a replacement'
    assert not _still_running([before], timeout=10), 'the hung worker was not killed'
    step = flow.health()['steps'][0]
    assert step['restarts'] == 1 and step['deaths'] == 1, step
    await _until(lambda: flow.health()['ready'], what='health ready')


async def test_past_handle_timeout_only_the_overrunning_batch_fails(make_flow, tmp_path):
    # One worker: the quick tasks are sent ahead to it behind the hung one. When it is killed,
    # the batches it never began go to its replacement; they do not fail with it.
    flow = make_flow(FlowStep(Block(), handle_timeout=0.5))
    pid_file = tmp_path / 'pid'
    hung = asyncio.ensure_future(flow.process(Task(-1, forever=True, pid_file=str(pid_file)), timeout_sec=30))
    hung_pid = int(await _read_when_written(pid_file))
    quick = [Task(i) for i in range(5)]
    calls = asyncio.gather(*(flow.process(t, timeout_sec=20) for t in quick))
    with pytest.raises(HandlerTimeoutError):
        await asyncio.wait_for(hung, 20)
    assert await asyncio.wait_for(calls, 20) == [True] * 5
    assert [t.result for t in quick] == list(range(5)) and hung_pid not in {t.pid for t in quick}
    assert flow.health()['steps'][0]['restarts'] == 1


async def test_a_sigstopped_worker_is_killed_past_handle_timeout(make_flow, tmp_path):
    flow = make_flow(FlowStep(Block(), handle_timeout=1.0))
    marker, pid_file = tmp_path / 'release', tmp_path / 'pid'
    held = asyncio.ensure_future(flow.process(Task(1, marker=str(marker), pid_file=str(pid_file)), timeout_sec=30))
    pid = int(await _read_when_written(pid_file))
    stopped = psutil.Process(pid)
    os.kill(pid, signal.SIGSTOP)
    marker.touch()  # a running handler would now return; a stopped one cannot

    with pytest.raises(HandlerTimeoutError) as info:
        await asyncio.wait_for(held, 20)
    assert info.value.pid == pid
    assert not _still_running([stopped], timeout=10), 'the stopped worker was not killed'
    after = Task(2)
    await flow.process(after, timeout_sec=20)
    assert after.result == 2 and after.pid != pid
    assert flow.health()['steps'][0]['restarts'] == 1


async def test_without_handle_timeout_a_blocked_worker_shows_in_health(make_flow, tmp_path):
    flow = make_flow(FlowStep(Block(), nprocs=2))
    marker, pid_file = tmp_path / 'release', tmp_path / 'pid'
    held = asyncio.ensure_future(flow.process(Task(1, marker=str(marker), pid_file=str(pid_file)), timeout_sec=40))
    await _read_when_written(pid_file)

    def longest():
        return flow.health()['steps'][0]['longest_batch_s']

    await _until(lambda: (longest() or 0) > 0, what='longest_batch_s > 0')
    seen = longest()
    await _until(lambda: longest() > seen, what='longest_batch_s growing')
    health = flow.health()
    step = health['steps'][0]
    assert step['overdue'] == 0 and step['in_flight'] == 1, step
    assert health['ready'], 'a busy worker without a limit is not a fault'

    marker.touch()
    assert await asyncio.wait_for(held, 20) is True
    await _until(lambda: longest() is None, what='no batch running')


# ---------------------------------------------------------------------------- 5. stop(grace_sec)


async def test_a_stop_past_grace_sec_fails_a_hung_task_and_leaves_no_process(make_flow, tmp_path):
    flow = make_flow(Block())
    pid_file = tmp_path / 'pid'
    held = asyncio.ensure_future(flow.process(Task(1, forever=True, pid_file=str(pid_file)), timeout_sec=45))
    await _read_when_written(pid_file)

    await asyncio.wait_for(flow.stop(grace_sec=0.5), 20)
    assert flow.state is FlowState.STOPPED
    with pytest.raises(FlowError) as info:
        await asyncio.wait_for(held, 5)
    assert not isinstance(info.value, TaskTimeoutError), 'failed by the stop, not by its own timeout'
    assert children() == []


async def test_a_graceful_stop_waits_for_a_hung_handler_no_longer_than_handle_timeout(make_flow, tmp_path):
    flow = make_flow(FlowStep(Block(), handle_timeout=0.5))
    pid_file = tmp_path / 'pid'
    held = asyncio.ensure_future(flow.process(Task(1, forever=True, pid_file=str(pid_file)), timeout_sec=45))
    await _read_when_written(pid_file)
    # The grace period outlasts the hang guard: only handle_timeout can end this stop in time.
    await asyncio.wait_for(flow.stop(grace_sec=40), 20)
    assert flow.state is FlowState.STOPPED
    with pytest.raises(HandlerTimeoutError):
        await asyncio.wait_for(held, 5)
    assert flow.health()['steps'][0]['restarts'] == 0, 'no replacement for a worker killed while stopping'
    assert children() == []


async def test_stop_refuses_an_invalid_grace_sec_and_keeps_running(make_flow):
    flow = make_flow(Block())
    for grace in (math.nan, -1, 'x'):
        with pytest.raises(ValueError, match='grace_sec'):
            await flow.stop(grace_sec=grace)
        assert flow.state is FlowState.RUNNING
    task = Task(3)
    await flow.process(task)
    assert task.result == 3


# ---------------------------------------------------------------------------- 6. concurrent stops


async def test_a_second_graceful_stop_returns_only_once_the_flow_is_stopped(make_flow, tmp_path):
    flow = make_flow(Block())
    marker, pid_file = tmp_path / 'release', tmp_path / 'pid'
    held = asyncio.ensure_future(flow.process(Task(1, marker=str(marker), pid_file=str(pid_file)), timeout_sec=45))
    await _read_when_written(pid_file)
    first = asyncio.ensure_future(flow.stop(grace_sec=30))
    await _until(lambda: flow.state is FlowState.STOPPING, what='stopping')

    async def second_stop() -> FlowState:
        await flow.stop()
        return flow.state

    second = asyncio.ensure_future(second_stop())
    await _until(lambda: flow._stopped_waiters, what='the second stop waiting')
    assert not second.done() and not first.done()

    marker.touch()  # the task finishes within the grace period: both stops complete
    assert await asyncio.wait_for(second, 20) is FlowState.STOPPED
    await asyncio.wait_for(first, 20)
    assert await held is True, 'a graceful stop let the task finish'
    assert children() == []


async def test_a_hard_stop_escalates_a_graceful_stop_under_way(make_flow, tmp_path):
    flow = make_flow(Block())
    pid_file = tmp_path / 'pid'
    held = asyncio.ensure_future(flow.process(Task(1, forever=True, pid_file=str(pid_file)), timeout_sec=45))
    await _read_when_written(pid_file)
    graceful = asyncio.ensure_future(flow.stop(grace_sec=30))
    await _until(lambda: flow.state is FlowState.STOPPING, what='stopping')

    await asyncio.wait_for(flow.stop(graceful=False), 20)
    assert flow.state is FlowState.STOPPED
    await asyncio.wait_for(graceful, 20)
    with pytest.raises(FlowError) as info:
        await asyncio.wait_for(held, 5)
    assert not isinstance(info.value, TaskTimeoutError)
    assert children() == []


# ---------------------------------------------------------------------------- 7. hard stop under load


@pytest.mark.timeout(120)
@pytest.mark.parametrize('queue_size', [None, 4000], ids=['default-queue', 'large-queue'])
async def test_a_hard_stop_with_thousands_of_tasks_in_flight_fails_each_one_cleanly(
    make_flow, caplog, capfd, queue_size
):
    loop = asyncio.get_running_loop()
    loop_errors: list = []
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    caplog.set_level(logging.DEBUG, logger='aqueduct')
    caplog.set_level(logging.DEBUG, logger='asyncio')
    try:
        flow = make_flow(FlowStep(Brief(0.002), nprocs=2, batch_size=8), queue_size=queue_size)
        calls = [asyncio.ensure_future(flow.process(Task(i), timeout_sec=60)) for i in range(3000)]
        await _until(lambda: sum(c.done() for c in calls) >= 100, what='100 tasks done')
        await asyncio.wait_for(flow.stop(graceful=False), 20)
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 20)
        for _ in range(3):  # callbacks the stop scheduled get their turn before the checks
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous_handler)

    odd = [o for o in outcomes if not (o is True or isinstance(o, FlowError))]
    assert not odd, odd[:5]
    assert any(o is True for o in outcomes) and any(isinstance(o, FlowError) for o in outcomes)
    assert not any(isinstance(o, TaskTimeoutError) for o in outcomes)
    assert loop_errors == []
    for record in caplog.records:
        message = record.getMessage()
        assert 'protocol error' not in message.lower(), message
        assert 'Exception in callback' not in message, message
    err = capfd.readouterr().err
    assert 'protocol error' not in err.lower() and 'Exception in callback' not in err, err[-3000:]


# ---------------------------------------------------------------------------- 8. on_start failing


@pytest.mark.parametrize('failing', ['both', 'one', 'one-others-hang'])
async def test_an_on_start_failure_fails_start_naming_the_step_and_leaves_no_child(make_flow, tmp_path, failing):
    # 'one': the other worker is ready when the failure comes; 'one-others-hang': it never will
    # be, and start() must not wait for it (its timeout would be the error then).
    claim = None if failing == 'both' else str(tmp_path / 'claim')
    handler = FailOnStart(claim, others_hang=failing == 'one-others-hang')
    flow = make_flow(FlowStep(handler, nprocs=2), start=False)
    with pytest.raises(WorkerStartError, match='step1_FailOnStart') as info:
        flow.start(timeout=30)
    assert 'the model file is missing' in str(info.value)
    assert flow.state is FlowState.STOPPED
    assert children() == []


async def test_a_worker_killed_while_a_graceful_stop_drains_is_replaced_and_the_queue_finishes(make_flow, tmp_path):
    """The step's only worker hangs, a graceful stop begins, and the worker is killed for its
    handle_timeout: a replacement runs the task queued behind the hung one (before, it waited out
    the whole grace period and failed as stopped)."""
    flow = make_flow(FlowStep(Block(), handle_timeout=0.5))
    hung = asyncio.ensure_future(
        flow.process(Task(1, forever=True, pid_file=str(tmp_path / 'hung')), timeout_sec=30)
    )
    hung_pid = int(await _read_when_written(tmp_path / 'hung'))
    second = Task(2)
    queued = asyncio.ensure_future(flow.process(second, timeout_sec=30))
    await _until(lambda: flow.health()['steps'][0]['queued'] == 1, what='the second task queued')
    stopping = asyncio.ensure_future(flow.stop(graceful=True, grace_sec=20))
    with pytest.raises(HandlerTimeoutError):
        await asyncio.wait_for(hung, 20)
    await asyncio.wait_for(queued, 15)
    assert second.result == 2 and second.pid != hung_pid
    await asyncio.wait_for(stopping, 20)
    assert flow.state is FlowState.STOPPED
    assert not psutil.pid_exists(hung_pid) or psutil.Process(hung_pid).status() == psutil.STATUS_ZOMBIE


# ---------------------------------------------------------------------------- 9. no pidfds


async def test_without_pidfds_a_sigkilled_worker_is_seen_and_replaced(make_flow, tmp_path, monkeypatch, caplog):
    """Where the kernel refuses pidfd_open (before 5.3, valgrind, an old seccomp profile) the
    engine watches its workers by polling /proc; AQUEDUCT_EXIT_WATCH=poll forces that here. A
    killed worker must still fail exactly its task and be replaced."""
    monkeypatch.setenv('AQUEDUCT_EXIT_WATCH', 'poll')
    caplog.set_level(logging.INFO, logger='aqueduct')
    flow = make_flow(FlowStep(Block(), nprocs=2, batch_size=1), restart_policy=RestartPolicy(max_restarts=10))
    assert flow._live().polls_exits
    assert 'watched by polling' in caplog.text
    before = {w.pid for w in flow.view.workers()}

    pid_file = tmp_path / 'pid'
    held = asyncio.ensure_future(
        flow.process(Task(1, marker=str(tmp_path / 'never'), pid_file=str(pid_file)), timeout_sec=30)
    )
    victim = int(await _read_when_written(pid_file))
    assert victim in before
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(WorkerDiedError) as info:
        await asyncio.wait_for(held, 20)
    assert info.value.pid == victim

    await _until(lambda: flow.health()['ready'], what='health ready')
    after = {w.pid for w in flow.view.workers()}
    assert victim not in after and len(after) == 2 and before - {victim} <= after
    tasks = [Task(i) for i in range(10)]
    results = await asyncio.wait_for(asyncio.gather(*(flow.process(t, timeout_sec=20) for t in tasks)), 20)
    assert results == [True] * 10 and [t.result for t in tasks] == list(range(10))
    step = flow.health()['steps'][0]
    assert step['alive'] == step['ready'] == 2 and step['deaths'] == 1 and step['restarts'] == 1, step
