"""Faults stay local: handler errors, dead workers, full queues, bad input, signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import threading

import psutil
import pytest
from aqueduct import Flow, FlowState, FlowStep, shm
from aqueduct.exceptions import (
    FlowError,
    HandlerError,
    QueueFullError,
    TaskSerializationError,
    TaskTimeoutError,
    WorkerDiedError,
)
from aqueduct.flow import RestartPolicy

from .conftest import children, finish_or_dump, python_script
from .handlers import Add, Die, NeedsTwoArgs, RaiseOdd, Sleep, Task, Unpicklable, explode, is_seven


async def test_a_handler_error_that_cannot_be_pickled_gets_a_faithful_stand_in(make_flow):
    flow = make_flow(RaiseOdd())
    with pytest.raises(NeedsTwoArgs) as info:
        await flow.process(Task(3))
    assert isinstance(info.value, FlowError) and 'odd input' in str(info.value)
    assert info.value.__cause__ is None, 'the original did not survive pickling'
    with pytest.raises(HandlerError, match='EphemeralError: made up in the worker') as info:
        await flow.process(Task(99))
    assert 'EphemeralError' in info.value.remote_type
    ok = Task(4)
    await flow.process(ok)
    assert ok.result == 4


@pytest.mark.parametrize('how', ['kill', 'exit', 'segfault'])
async def test_a_dead_worker_fails_only_its_tasks_and_is_replaced(make_flow, how, caplog):
    flow = make_flow(FlowStep(Die(), nprocs=2))
    first = Task(0)
    await flow.process(first)
    with caplog.at_level(logging.ERROR, logger='aqueduct'):
        with pytest.raises(WorkerDiedError) as info:
            await flow.process(Task(1, die=how), timeout_sec=20)
    assert 'step1_Die' in str(info.value) and info.value.pid > 0
    assert f'The process {info.value.pid} for Die handler is dead' in caplog.text
    # The flow goes on, on the survivor and on the replacement, whose on_start ran again.
    tasks = [Task(i) for i in range(20)]
    await asyncio.gather(*(flow.process(t, timeout_sec=20) for t in tasks))
    pids = {t.result[0] for t in tasks}
    assert info.value.pid not in pids
    assert all(t.result[0] == t.result[1] for t in tasks), 'every worker ran its own on_start'
    health = flow.health()
    assert health['steps'][0]['deaths'] == 1 and health['steps'][0]['restarts'] == 1
    await _until(lambda: flow.health()['ready'])


async def _until(condition, timeout: float = 10.0) -> None:
    """Waits for a condition the flow reaches through its event loop (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, 'condition not reached'
        await asyncio.sleep(0.01)


async def test_past_the_restart_policy_the_flow_stops_and_says_why(make_flow, caplog):
    flow = make_flow(Die(), restart_policy=RestartPolicy(max_restarts=1, window=60))
    with caplog.at_level(logging.ERROR, logger='aqueduct'):
        for _ in range(2):
            with pytest.raises(WorkerDiedError):
                await flow.process(Task(1, die='kill'), timeout_sec=20)
        await _until(lambda: flow.state is FlowState.STOPPED)
    assert 'died 2 times within 60 s' in caplog.text
    with pytest.raises(FlowError):
        await flow.process(Task(1))
    assert children() == []


def test_restart_policy_arguments_are_checked():
    with pytest.raises(ValueError, match='max_restarts'):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError, match='window'):
        RestartPolicy(window=0)
    with pytest.raises(TypeError, match='restart_policy'):
        Flow(Add(), restart_policy=3)
    with pytest.raises(ValueError, match='queue_full'):
        Flow(Add(), queue_full='drop')


async def test_a_full_queue_waits_or_rejects_by_policy(make_flow):
    waiting = make_flow(Sleep(0.05), queue_size=1)
    results = await asyncio.gather(*(waiting.process(Task(i), timeout_sec=30) for i in range(30)))
    assert results == [True] * 30, 'with the default policy everyone waits their turn'
    # A call that finds no room waits only until its own deadline, and says why it failed.
    # 16 calls of 0.1 s each: one runs, one waits in the flow (queue_size=1, whether queued or
    # sent ahead to the worker), and 14 wait for room ahead of the last call, longer than its 0.2 s.
    slow = make_flow(Sleep(0.1), queue_size=1)
    held = [asyncio.ensure_future(slow.process(Task(i), timeout_sec=30)) for i in range(16)]
    await asyncio.sleep(0)  # one pass of the loop: the held calls submit first
    step = slow.health()['steps'][0]
    assert step['queued'] == 1 and step['in_flight'] >= 1, step
    with pytest.raises(TaskTimeoutError, match='queue stayed full'):
        await slow.process(Task(99), timeout_sec=0.2)
    assert await asyncio.gather(*held) == [True] * 16
    rejecting = make_flow(Sleep(0.2), queue_size=1, queue_full='reject')
    outcomes = await asyncio.gather(*(rejecting.process(Task(i)) for i in range(20)), return_exceptions=True)
    rejected = [o for o in outcomes if isinstance(o, QueueFullError)]
    assert rejected and all(isinstance(o, FlowError) for o in rejected)
    # The bound is the one set: one task running and queue_size=1 waiting, whatever the engine
    # sends ahead to the worker.
    assert sum(1 for o in outcomes if o is True) == 2, outcomes


async def test_bad_input_gets_a_clear_error(make_flow):
    flow = make_flow(Add(), FlowStep(Unpicklable(), handle_condition=is_seven))
    unpicklable = Task(1)
    unpicklable.callback = lambda: None
    with pytest.raises(TaskSerializationError, match='Task cannot be pickled'):
        await flow.process(unpicklable)
    with pytest.raises(FlowError, match='pickling the result of step2_Unpicklable'):
        await flow.process(Task(7))
    with pytest.raises(ValueError, match='timeout_sec'):
        await flow.process(Task(1), timeout_sec=-1)
    with pytest.raises(ValueError, match='timeout_sec'):
        await flow.process(Task(1), timeout_sec='soon')
    ok = Task(2)
    await flow.process(ok)
    assert ok.result == 3, 'the flow keeps serving'


async def test_a_handle_condition_that_raises_names_itself(start_method):
    flow = Flow(FlowStep(Add(), handle_condition=explode), mp_start_method=start_method)
    flow.start(timeout=30)
    try:
        with pytest.raises(FlowError, match='handle_condition of step1_Add raised KeyError'):
            await flow.process(Task(1))
    finally:
        await flow.stop()
    later = Flow(Add(), FlowStep(Add(), handle_condition=explode), mp_start_method=start_method)
    later.start(timeout=30)
    try:
        with pytest.raises(FlowError, match='a handle_condition after step1_Add'):
            await later.process(Task(1))
    finally:
        await later.stop()


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
async def test_workers_restore_the_default_sigterm_and_sigint_handlers(start_method, signum):
    previous = signal.signal(signum, signal.SIG_IGN)  # what a web server might install
    try:
        flow = Flow(Die(), mp_start_method=start_method)
        flow.start(timeout=30)
    finally:
        signal.signal(signum, previous)
    try:
        first = Task(0)
        await flow.process(first)
        os.kill(first.result[0], signum)
        await _until(lambda: flow.health()['steps'][0]['deaths'] == 1)
        again = Task(1)
        await flow.process(again, timeout_sec=20)
        assert again.result[0] != first.result[0]
    finally:
        await flow.stop()


async def test_fifty_start_stop_cycles_leave_nothing_behind():
    used = shm.pool().used_bytes
    for _ in range(50):
        flow = Flow(Add(), FlowStep(Add(), nprocs=2))
        flow.start(timeout=30)
        task = Task(1)
        await flow.process(task)
        await flow.stop()
        await flow.stop()
        assert task.result == 2
    assert children() == []
    assert shm.pool().used_bytes == used


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (a dead process init has not reaped yet)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ctrl_c_in_the_main_process_stops_the_flow_cleanly():
    with python_script(
        """
        import asyncio, faulthandler, os, signal
        from aqueduct import Flow, FlowStep
        from tests.handlers import Add, Task
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if it hangs
        # An interactive program's Ctrl-C: a test runner started in the background (as CI may
        # be) hands its children SIGINT ignored, and then Python installs no handler for it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        async def main():
            flow = Flow(Add(), FlowStep(Add(), nprocs=2))
            flow.start(timeout=30)
            await flow.process(Task(1))
            print(os.getpid(), flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    ) as proc:
        pid = int(proc.stdout.readline())
        tree = [c.pid for c in psutil.Process(pid).children(recursive=True)]
        assert len(tree) >= 4
        os.kill(pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGUSR1)  # where it is stuck goes to the captured stderr
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            raise AssertionError('the main process did not exit within 20 s of Ctrl-C') from None
        _, alive = psutil.wait_procs([psutil.Process(p) for p in tree if psutil.pid_exists(p)], timeout=5)
        running = [p for p in alive if _running(p)]
        assert not running, f'workers left behind after Ctrl-C: {running}'


def test_workers_exit_within_a_second_of_a_sigkilled_main_process():
    with python_script(
        """
        import asyncio, os
        from aqueduct import Flow, FlowStep
        from tests.handlers import Add, Task
        async def main():
            flow = Flow(Add(), FlowStep(Add(), nprocs=2), mp_start_method='spawn')
            flow.start(timeout=30)
            await flow.process(Task(1))
            print(os.getpid(), flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    ) as proc:
        pid = int(proc.stdout.readline())
        tree = psutil.Process(pid).children(recursive=True)
        workers = [c for c in tree if 'resource_tracker' not in ' '.join(c.cmdline())]
        assert len(workers) >= 3
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=1.0)
        running = [p for p in alive if _running(p)]
        assert not running, f'orphaned: {running}'


def test_no_thread_is_ever_started_in_the_main_process():
    # Fork safety rests on this: the engine runs on the caller's thread.
    before = threading.active_count()

    async def run():
        flow = Flow(Add())
        flow.start(timeout=30)
        await flow.process(Task(1))
        assert threading.active_count() == before
        await flow.stop()

    asyncio.run(run())


def _builtin_exception_names() -> list:
    import builtins

    return sorted(
        name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, BaseException)
    )


def _check_caller_exception(err: BaseException, original: type) -> None:
    """What ``except`` clauses see for a handler that raised ``original``."""
    assert isinstance(err, HandlerError) and isinstance(err, FlowError), type(err).__mro__
    assert 'made in the worker' in str(err) or original.__name__ in str(err), str(err)
    assert 'remote traceback' in str(err)
    if issubclass(original, StopIteration):
        # What a coroutine raising StopIteration gives (PEP 479); asyncio refuses the original.
        assert isinstance(err, RuntimeError) and not isinstance(err, StopIteration)
        assert isinstance(err.__cause__, original)
    elif not issubclass(original, Exception):
        # Raised as itself it would stop the caller's server or cancel its task.
        assert type(err) is HandlerError and isinstance(err.__cause__, original)
    else:
        assert isinstance(err, original), f'{original.__name__} arrived as {type(err).__mro__}'


async def test_every_builtin_exception_type_reaches_the_caller_as_itself_or_a_safe_stand_in(make_flow):
    from .handlers import RaiseNamed, builtin_exception

    # SystemExit and KeyboardInterrupt also end the worker: room for those restarts.
    flow = make_flow(RaiseNamed(), restart_policy=RestartPolicy(max_restarts=10))
    for name in _builtin_exception_names():
        original = builtin_exception(name)
        with pytest.raises(BaseException) as info:
            await flow.process(Task(kind='builtin', name=name), timeout_sec=20)
        _check_caller_exception(info.value, type(original))
        if isinstance(original, Exception) and not isinstance(original, StopIteration):
            assert repr(info.value.args) == repr(original.args), name
        if isinstance(original, OSError):
            assert (info.value.errno, info.value.filename) == (2, 'some/file')
        if isinstance(original, BaseExceptionGroup) and isinstance(original, Exception):
            assert [type(e) for e in info.value.exceptions] == [ValueError]
        # Raising it again from a coroutine of the caller's own is safe too.
        with pytest.raises(HandlerError):
            raise info.value
    ok = Task(5, kind='none')
    await flow.process(ok)  # the flow still serves
    assert ok.result == 5


@pytest.mark.parametrize(
    'name, expected',
    [
        ('PathError', 'PathError'),
        ('Exhausted', RuntimeError),
        ('next', RuntimeError),
        ('KeywordOnly', 'KeywordOnly'),
        ('Picky', ValueError),
        ('CancelledError', HandlerError),
    ],
)
async def test_user_exceptions_with_odd_constructors_reach_the_caller(make_flow, name, expected):
    from . import handlers

    flow = make_flow(handlers.RaiseNamed())
    with pytest.raises(HandlerError) as info:
        await flow.process(Task(kind='user', name=name))
    err = info.value
    expected = getattr(handlers, expected) if isinstance(expected, str) else expected
    assert isinstance(err, expected), type(err).__mro__
    if name == 'PathError':
        assert isinstance(err, FileNotFoundError) and err.filename == 'some/file' and err.errno == 2
    if name == 'CancelledError':
        # A handler's CancelledError must not cancel the caller's task.
        assert not isinstance(err, asyncio.CancelledError) and isinstance(err.__cause__, asyncio.CancelledError)
    assert asyncio.current_task() is not None and not asyncio.current_task().cancelling()


async def test_a_failed_call_leaves_no_reference_cycle_holding_the_task(make_flow):
    """The future, the error and the call's frame must not form a cycle: a task (and the shared
    memory of its fields) would then live until the cyclic GC runs, which may be never."""
    import gc
    import weakref

    flow = make_flow(RaiseOdd())
    gc.collect()
    gc.disable()
    try:
        task = Task(3)
        alive = weakref.ref(task)
        with pytest.raises(NeedsTwoArgs):
            await flow.process(task)
        del task
        await asyncio.sleep(0)  # the loop drops the handle that resumed this call
        assert alive() is None, 'the failed task is freed without the cyclic GC'
    finally:
        gc.enable()


def test_health_read_from_another_thread_while_calls_complete_does_not_deadlock():
    """A sync /healthz route runs in a thread pool: reading the flow from there must not wait
    for the driver's lock while holding the GIL, which the loop's thread, resolving futures
    under that lock, needs to go on."""
    with python_script(
        """
        import asyncio, faulthandler, signal, sys, threading, time
        from aqueduct import Flow, FlowStep
        from tests.handlers import Add, Task
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if it hangs
        sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible
        async def main():
            flow = Flow(FlowStep(Add(1), nprocs=2, batch_size=8), metrics_enabled=False)
            flow.start(timeout=30)
            done = threading.Event()
            def probe():
                while not done.is_set():
                    flow.health()
            thread = threading.Thread(target=probe, daemon=True)
            thread.start()
            ends = time.monotonic() + 3
            while time.monotonic() < ends:
                await asyncio.gather(*(flow.process(Task(i), timeout_sec=30) for i in range(200)))
            done.set()
            thread.join(10)
            await flow.stop()
            print('done', flush=True)
        asyncio.run(main())
        """
    ) as proc:
        out = finish_or_dump(proc, 40, 'deadlocked: the loop waits for the GIL, the probe for the driver')
        assert out.strip().endswith('done')


async def test_an_error_while_polling_the_engine_does_not_stop_the_polling(make_flow):
    """Found in review: an exception out of the event loop's poll left the flow believing it
    was polling, with the doorbell down, so a result already in the ring waited for its caller's
    deadline. Now polling starts again at once."""
    flow = make_flow(Add())
    real = flow._driver

    class FailsOnce:
        failed = False

        def __getattr__(self, name):
            return getattr(real, name)

        def poll_pass(self, events=False):
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise RuntimeError('injected poll failure')
            return real.poll_pass(events)

    loop = asyncio.get_running_loop()
    reported = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context.get('exception')))
    flow._driver = FailsOnce()
    try:
        task = Task(1)
        # The deadline is far away: only polling that resumes answers within the wait.
        await asyncio.wait_for(flow.process(task, timeout_sec=120), timeout=20)
    finally:
        flow._driver = real
        loop.set_exception_handler(previous)
    assert task.result == 2
    assert FailsOnce.failed and any(isinstance(e, RuntimeError) for e in reported), 'the failure was reported'
