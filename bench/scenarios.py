"""Benchmark scenarios for aqueduct implementations.

Run exactly one scenario in a fresh interpreter and print its result as a single
JSON object on the last line of stdout::

    <python> bench/scenarios.py <scenario-name> [--quick]
    <python> bench/scenarios.py --list

Only the public API shared by aqueduct 1.15 (pure Python) and aqueduct-rs is used:
``Flow``, ``FlowStep``, ``BaseTask``, ``BaseTaskHandler``, ``flow.start(timeout=...)``,
``await flow.process(task, timeout_sec=...)``, ``await flow.stop()`` and
``task.share_value(field)``. Handlers and tasks live at module level so that they
can be pickled, and the default multiprocessing start method ('fork') is kept.

The JSON result looks like::

    {"scenario": "latency_1step", "metric": "p50", "value": 812.4, "unit": "us",
     "better": "lower", "extra": {...}}

``better`` tells the orchestrator (bench/run.py) in which direction the main
value improves; ``extra`` holds secondary numbers (p99, failures, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep

# Generous per-call timeout: the benchmarks measure speed, they should not turn a
# slow implementation into a pile of timeouts.
CALL_TIMEOUT_S = 30.0
# Timeout given to flow.start().
START_TIMEOUT_S = 60
# After the measurement window closes, tasks still in flight get this long to finish
# before they are cancelled (keeps a collapsed pipeline from stretching the run).
DRAIN_CAP_S = 10.0

# Batching scenario: the handler costs 2 ms + 0.5 ms per task, so full batches of
# 16 take 10 ms and the ideal throughput is 1600 tasks/s.
BATCH_SIZE = 16
BATCH_FIXED_COST_S = 0.002
BATCH_PER_TASK_COST_S = 0.0005

# CPU-bound scenario: every task burns this much CPU in pure Python.
CPU_TASK_S = 0.002


# --------------------------------------------------------------------------------------
# Tasks and handlers (module level: they must be picklable)
# --------------------------------------------------------------------------------------


class NumTask(BaseTask):
    """A tiny task carrying one integer in and one integer out."""

    def __init__(self, x: int):
        super().__init__()
        self.x = x
        self.result: int | None = None
        self.batch_len: int | None = None


class IncHandler(BaseTaskHandler):
    """First step of the trivial pipelines: result = x + 1."""

    def handle(self, *tasks: NumTask) -> None:
        for task in tasks:
            task.result = task.x + 1


class AddOneHandler(BaseTaskHandler):
    """Second step of the trivial 2-step pipelines: result += 1 (so result = x + 2)."""

    def handle(self, *tasks: NumTask) -> None:
        for task in tasks:
            task.result += 1


class ArrayTask(BaseTask):
    """A task carrying a (possibly large) numpy array."""

    def __init__(self, arr: np.ndarray):
        super().__init__()
        self.arr = arr
        self.head: int | None = None
        self.tail: int | None = None


class ArrayHeadHandler(BaseTaskHandler):
    """Reads the first element; the array itself travels on unchanged."""

    def handle(self, *tasks: ArrayTask) -> None:
        for task in tasks:
            task.head = int(task.arr[0])


class ArrayTailHandler(BaseTaskHandler):
    """Reads the last element; the array itself travels on unchanged."""

    def handle(self, *tasks: ArrayTask) -> None:
        for task in tasks:
            task.tail = int(task.arr[-1])


class ArrayMeanHandler(BaseTaskHandler):
    """Real work on the whole array (a mean over 16 MiB costs a few ms), the kind of
    pass a preprocessing step makes; the result goes into ``field``."""

    def __init__(self, field: str):
        super().__init__()
        self.field = field

    def handle(self, *tasks: ArrayTask) -> None:
        for task in tasks:
            setattr(task, self.field, float(task.arr.mean()))


class SleepBatchHandler(BaseTaskHandler):
    """Simulates a batched model call: fixed cost plus a per-item cost."""

    def handle(self, *tasks: NumTask) -> None:
        time.sleep(BATCH_FIXED_COST_S + BATCH_PER_TASK_COST_S * len(tasks))
        for task in tasks:
            task.result = task.x + 1
            task.batch_len = len(tasks)


def spin_cpu(seconds: float = CPU_TASK_S) -> int:
    """Busy-loop in pure Python for ``seconds`` of wall time; returns the loop count."""
    deadline = time.perf_counter() + seconds
    spins = 0
    while time.perf_counter() < deadline:
        spins += 1
    return spins


class CpuHandler(BaseTaskHandler):
    """CPU-bound handler: CPU_TASK_S of pure-Python spinning per task."""

    def handle(self, *tasks: NumTask) -> None:
        for task in tasks:
            spin_cpu()
            task.result = task.x + 1


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@dataclass
class DriveStats:
    """Outcome of one load-generation phase."""

    completed: int = 0
    failures: int = 0
    cancelled: int = 0
    elapsed_s: float = 0.0
    errors: Counter = field(default_factory=Counter)
    first_error: str | None = None

    @property
    def rate(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def fail(self, kind: str, message: str) -> None:
        self.failures += 1
        self.errors[kind] += 1
        if self.first_error is None:
            self.first_error = message[:300]

    def as_extra(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "failures": self.failures,
            "cancelled": self.cancelled,
            "elapsed_s": round(self.elapsed_s, 4),
            "errors": dict(self.errors),
            "first_error": self.first_error,
        }


async def drive(
    flow: Flow,
    make_task: Callable[[int], BaseTask],
    *,
    in_flight: int,
    max_tasks: int,
    max_seconds: float,
    check: Callable[[BaseTask], bool] | None = None,
    on_done: Callable[[BaseTask], None] | None = None,
    submit: Callable[[BaseTask], Awaitable[Any]] | None = None,
) -> DriveStats:
    """Keep ``in_flight`` tasks in the flow until ``max_tasks`` were issued or
    ``max_seconds`` passed, whichever comes first.

    Each of ``in_flight`` worker coroutines loops over ``flow.process``. Once the window
    closes no new task is issued; tasks still in flight get ``DRAIN_CAP_S`` to finish
    and are cancelled after that. The rate is completed tasks divided by the time from
    the start to the last completion.

    Failed calls are counted, not raised; but a phase in which no task at all
    completed raises RuntimeError, so that a broken scenario is reported as failed
    rather than as a throughput of zero.
    """
    stats = DriveStats()
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    last_done = start
    run = submit or (lambda task: flow.process(task, timeout_sec=CALL_TIMEOUT_S))

    async def worker() -> None:
        nonlocal issued, last_done
        while issued < max_tasks and time.perf_counter() < deadline:
            issued += 1
            try:
                task = make_task(issued)  # e.g. share_value() may fail too
                ok = await run(task)
            except asyncio.CancelledError:
                stats.cancelled += 1
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is counted, never fatal
                stats.fail(type(exc).__name__, repr(exc))
                continue
            if ok is False:
                stats.fail("returned_false", "process() returned False")
                continue
            if check is not None and not check(task):
                stats.fail("wrong_result", f"wrong result in {task!r}"[:300])
                continue
            stats.completed += 1
            last_done = time.perf_counter()
            if on_done is not None:
                on_done(task)

    workers = [asyncio.ensure_future(worker()) for _ in range(in_flight)]
    # Wait for the window plus the drain allowance, then cancel whatever is left.
    done, pending = await asyncio.wait(workers, timeout=max_seconds + DRAIN_CAP_S)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:  # a bug in a callback such as on_done
            raise task.exception()
    stats.elapsed_s = last_done - start
    if stats.completed == 0 and issued > 0:
        raise RuntimeError(
            f"no task completed out of {issued} issued ({stats.failures} failed, {stats.cancelled} cancelled); "
            f"errors: {dict(stats.errors)}; first: {stats.first_error}"
        )
    return stats


def num_task(i: int) -> NumTask:
    return NumTask(i)


def check_plus_one(task: NumTask) -> bool:
    return task.result == task.x + 1


def check_plus_two(task: NumTask) -> bool:
    return task.result == task.x + 2


def process_tree() -> list[psutil.Process]:
    """This process and all its descendants."""
    me = psutil.Process(os.getpid())
    return [me, *me.children(recursive=True)]


def rss_by_process() -> dict[int, float]:
    """Resident set size of each process of this tree, in MiB."""
    sizes = {}
    for proc in process_tree():
        try:
            sizes[proc.pid] = proc.memory_info().rss / 2**20
        except psutil.Error:
            pass  # a process that vanished meanwhile
    return sizes


def total_rss_mb() -> float:
    """Resident set size of this process tree, in MiB (shared pages count per process)."""
    return sum(rss_by_process().values())


async def warm_then_measure(
    flow: Flow | None,
    make_task: Callable[[int], BaseTask],
    *,
    in_flight: int,
    warm_tasks: int,
    warm_seconds: float,
    max_tasks: int,
    max_seconds: float,
    check: Callable[[BaseTask], bool] | None = None,
    on_done: Callable[[BaseTask], None] | None = None,
    submit: Callable[[BaseTask], Awaitable[Any]] | None = None,
) -> tuple[DriveStats, DriveStats]:
    """A warm-up phase (pages faulted in, caches and spinners settled), then the measured one,
    both through :func:`drive`; ``on_done`` sees only the measured tasks."""
    common = dict(in_flight=in_flight, check=check, submit=submit)
    warm = await drive(flow, make_task, max_tasks=warm_tasks, max_seconds=warm_seconds, **common)
    stats = await drive(flow, make_task, max_tasks=max_tasks, max_seconds=max_seconds, on_done=on_done, **common)
    return warm, stats


def scaled(quick: bool, quick_value: Any, full_value: Any) -> Any:
    """Pick the parameter for the current mode."""
    return quick_value if quick else full_value


class RunningFlow:
    """``async with RunningFlow(*steps) as flow:`` starts a flow and stops it gracefully.

    The wall times of start() and stop() are kept in ``start_ms`` / ``stop_ms`` so that
    every scenario can report them as a by-product.
    """

    def __init__(self, *steps: FlowStep, **options: Any):
        self.flow = Flow(*steps, **options)
        self.start_ms: float | None = None
        self.stop_ms: float | None = None

    async def __aenter__(self) -> Flow:
        t0 = time.perf_counter()
        self.flow.start(timeout=START_TIMEOUT_S)
        self.start_ms = round((time.perf_counter() - t0) * 1e3, 2)
        return self.flow

    async def __aexit__(self, *exc_info: object) -> None:
        t0 = time.perf_counter()
        await self.flow.stop()
        self.stop_ms = round((time.perf_counter() - t0) * 1e3, 2)

    def timings(self) -> dict[str, float | None]:
        return {"flow_start_ms": self.start_ms, "flow_stop_ms": self.stop_ms}


def result(metric: str, value: float, unit: str, better: str, **extra: Any) -> dict[str, Any]:
    return {"metric": metric, "value": value, "unit": unit, "better": better, "extra": extra}


# --------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------


async def latency_1step(quick: bool) -> dict[str, Any]:
    """Sequential round trips through a trivial 1-step flow."""
    warmup, calls = scaled(quick, (100, 300), (300, 2000))
    samples_us: list[float] = []
    failures = 0
    running = RunningFlow(FlowStep(IncHandler()))
    async with running as flow:
        for i in range(warmup + calls):
            task = NumTask(i)
            t0 = time.perf_counter()
            try:
                await flow.process(task, timeout_sec=CALL_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - counted, never fatal
                failures += 1
                continue
            elapsed_us = (time.perf_counter() - t0) * 1e6
            if not check_plus_one(task):
                failures += 1
            elif i >= warmup:
                samples_us.append(elapsed_us)
    if not samples_us:
        raise RuntimeError(f"no successful call out of {calls} ({failures} failures)")
    percentiles = statistics.quantiles(samples_us, n=100, method="inclusive")
    return result(
        "p50",
        round(statistics.median(samples_us), 2),
        "us",
        "lower",
        p99_us=round(percentiles[98], 2),
        mean_us=round(statistics.fmean(samples_us), 2),
        calls=len(samples_us),
        failures=failures,
        **running.timings(),
    )


async def _throughput(quick: bool, n_steps: int, in_flight: int, **options: Any) -> dict[str, Any]:
    """Trivial handler(s), ``in_flight`` concurrent callers, default queue size."""
    steps = [FlowStep(IncHandler())]
    check = check_plus_one
    if n_steps == 2:
        steps.append(FlowStep(AddOneHandler()))
        check = check_plus_two
    # Bounded by wall time first; the task cap is only a safety net.
    max_tasks, max_seconds = scaled(quick, (100_000, 1.5), (500_000, 3.0))
    running = RunningFlow(*steps, **options)
    async with running as flow:
        warm, stats = await warm_then_measure(
            flow, num_task, in_flight=in_flight, warm_tasks=in_flight * 4, warm_seconds=0.5,
            max_tasks=max_tasks, max_seconds=max_seconds, check=check,
        )  # fmt: skip
    return result(
        "throughput",
        round(stats.rate, 1),
        "tasks/s",
        "higher",
        in_flight=in_flight,
        steps=n_steps,
        warmup_failures=warm.failures,
        **stats.as_extra(),
        **running.timings(),
    )


async def throughput_1step_64(quick: bool) -> dict[str, Any]:
    return await _throughput(quick, 1, 64)


async def throughput_1step_64_nometrics(quick: bool) -> dict[str, Any]:
    """``throughput_1step_64`` with ``metrics_enabled=False``: the cost of metrics."""
    return await _throughput(quick, 1, 64, metrics_enabled=False)


async def throughput_1step_256(quick: bool) -> dict[str, Any]:
    return await _throughput(quick, 1, 256)


async def throughput_2step_64(quick: bool) -> dict[str, Any]:
    return await _throughput(quick, 2, 64)


async def throughput_2step_256(quick: bool) -> dict[str, Any]:
    return await _throughput(quick, 2, 256)


async def _payload(quick: bool, megabytes: int, shared: bool) -> dict[str, Any]:
    """A uint8 array of ``megabytes`` MiB travels through 2 steps, 4 tasks in flight."""
    in_flight = 4
    size = megabytes * 2**20
    # Deterministic content whose first and last bytes differ.
    base = (np.arange(size, dtype=np.int64) % 251).astype(np.uint8)
    head, tail = int(base[0]), int(base[-1])
    max_tasks, max_seconds = scaled(quick, (20_000, 1.5), (100_000, 3.0))

    def make(_: int) -> ArrayTask:
        task = ArrayTask(base)
        if shared:
            # Copies the array into shared memory once; later hops pass a reference.
            task.share_value("arr")
        return task

    def check(task: ArrayTask) -> bool:
        return task.head == head and task.tail == tail

    running = RunningFlow(FlowStep(ArrayHeadHandler()), FlowStep(ArrayTailHandler()))
    async with running as flow:
        _, stats = await warm_then_measure(
            flow, make, in_flight=in_flight, warm_tasks=in_flight * 2, warm_seconds=1.0,
            max_tasks=max_tasks, max_seconds=max_seconds, check=check,
        )  # fmt: skip
    return result(
        "throughput",
        round(stats.rate, 2),
        "tasks/s",
        "higher",
        payload_mb=megabytes,
        shared=shared,
        in_flight=in_flight,
        mb_per_s=round(stats.rate * megabytes, 1),
        **stats.as_extra(),
        **running.timings(),
    )


async def payload_1mb_2step(quick: bool) -> dict[str, Any]:
    return await _payload(quick, 1, shared=False)


async def payload_16mb_2step(quick: bool) -> dict[str, Any]:
    return await _payload(quick, 16, shared=False)


async def payload_1mb_2step_shared(quick: bool) -> dict[str, Any]:
    return await _payload(quick, 1, shared=True)


async def payload_16mb_2step_shared(quick: bool) -> dict[str, Any]:
    return await _payload(quick, 16, shared=True)


async def payload_16mb_2step_work(quick: bool) -> dict[str, Any]:
    """A 16 MiB array through 2 steps that each read all of it (``arr.mean()``), no
    ``share_value``: how close the flow gets to what the handlers' own cost allows.

    The handler's cost is timed in this process on the same array first. With one
    process per step the ideal is one task per slowest step's handler time, unless the
    handlers' total work exceeds the CPUs."""
    in_flight = 4
    base = (np.arange(16 * 2**20, dtype=np.int64) % 251).astype(np.uint8)
    expected = float(base.mean())
    handler_s = min(_time_call(lambda: float(base.mean())) for _ in range(7))
    cpus = os.cpu_count() or 1
    ideal = min(1.0 / handler_s, cpus / (2 * handler_s))
    max_tasks, max_seconds = scaled(quick, (20_000, 1.5), (100_000, 4.0))

    def check(task: ArrayTask) -> bool:
        return task.head == expected and task.tail == expected

    running = RunningFlow(FlowStep(ArrayMeanHandler("head")), FlowStep(ArrayMeanHandler("tail")))
    async with running as flow:
        _, stats = await warm_then_measure(
            flow, lambda _: ArrayTask(base), in_flight=in_flight, warm_tasks=8, warm_seconds=1.0,
            max_tasks=max_tasks, max_seconds=max_seconds, check=check,
        )  # fmt: skip
    return result(
        "throughput",
        round(stats.rate, 2),
        "tasks/s",
        "higher",
        handler_ms=round(handler_s * 1e3, 3),
        ideal_rate=round(ideal, 1),
        efficiency_pct=round(100 * stats.rate / ideal, 1),
        in_flight=in_flight,
        **stats.as_extra(),
        **running.timings(),
    )


def _time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def _batching(quick: bool, batch_timeout: float) -> dict[str, Any]:
    """One batched step (batch_size=16) saturated by 64 concurrent callers."""
    in_flight = 64
    ideal = 1.0 / (BATCH_FIXED_COST_S / BATCH_SIZE + BATCH_PER_TASK_COST_S)  # 1600 tasks/s
    max_tasks, max_seconds = scaled(quick, (20_000, 1.5), (50_000, 4.0))
    batch_lens: list[int] = []

    def record(task: NumTask) -> None:
        if task.batch_len is not None:
            batch_lens.append(task.batch_len)

    running = RunningFlow(FlowStep(SleepBatchHandler(), batch_size=BATCH_SIZE, batch_timeout=batch_timeout))
    async with running as flow:
        _, stats = await warm_then_measure(
            flow, num_task, in_flight=in_flight, warm_tasks=in_flight * 4, warm_seconds=0.5,
            max_tasks=max_tasks, max_seconds=max_seconds, check=check_plus_one, on_done=record,
        )  # fmt: skip
    return result(
        "throughput",
        round(stats.rate, 1),
        "tasks/s",
        "higher",
        ideal_tasks_per_s=round(ideal, 1),
        ratio_to_ideal=round(stats.rate / ideal, 4),
        # Every task reports the size of the batch it was handled in, so this mean is
        # weighted by tasks: the batch size an average task experienced.
        mean_batch_size=round(statistics.fmean(batch_lens), 2) if batch_lens else None,
        batch_size=BATCH_SIZE,
        batch_timeout=batch_timeout,
        in_flight=in_flight,
        **stats.as_extra(),
        **running.timings(),
    )


async def batching_t0(quick: bool) -> dict[str, Any]:
    return await _batching(quick, 0.0)


async def batching_t10ms(quick: bool) -> dict[str, Any]:
    return await _batching(quick, 0.01)


CPU_IN_FLIGHT = 16


def _cpu_budget(quick: bool) -> tuple[int, float]:
    return scaled(quick, (20_000, 1.5), (50_000, 4.0))


async def cpu_2ms_nprocs2(quick: bool) -> dict[str, Any]:
    """2 ms of pure-Python CPU per task, one step with nprocs=2."""
    max_tasks, max_seconds = _cpu_budget(quick)
    running = RunningFlow(FlowStep(CpuHandler(), nprocs=2))
    async with running as flow:
        _, stats = await warm_then_measure(
            flow, num_task, in_flight=CPU_IN_FLIGHT, warm_tasks=CPU_IN_FLIGHT * 4, warm_seconds=0.5,
            max_tasks=max_tasks, max_seconds=max_seconds, check=check_plus_one,
        )  # fmt: skip
    return result(
        "throughput",
        round(stats.rate, 1),
        "tasks/s",
        "higher",
        in_flight=CPU_IN_FLIGHT,
        nprocs=2,
        task_cpu_ms=CPU_TASK_S * 1e3,
        **stats.as_extra(),
        **running.timings(),
    )


async def ppe_cpu_2ms(quick: bool) -> dict[str, Any]:
    """Reference for cpu_2ms_nprocs2: the same work through ProcessPoolExecutor(2)."""
    max_tasks, max_seconds = _cpu_budget(quick)
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(2) as pool:

        async def submit(_task: BaseTask) -> bool:
            await loop.run_in_executor(pool, spin_cpu, CPU_TASK_S)
            return True

        # No flow here: the custom submit function replaces flow.process.
        _, stats = await warm_then_measure(
            None, num_task, in_flight=CPU_IN_FLIGHT, warm_tasks=CPU_IN_FLIGHT * 4, warm_seconds=0.5,
            max_tasks=max_tasks, max_seconds=max_seconds, submit=submit,
        )  # fmt: skip
    return result(
        "throughput",
        round(stats.rate, 1),
        "tasks/s",
        "higher",
        in_flight=CPU_IN_FLIGHT,
        workers=2,
        task_cpu_ms=CPU_TASK_S * 1e3,
        **stats.as_extra(),
    )


async def start_stop(quick: bool) -> dict[str, Any]:
    """Wall time of flow.start() and of a graceful flow.stop() of an idle 1-step flow."""
    running = RunningFlow(FlowStep(IncHandler()))
    async with running as flow:
        # Prove the flow works, then let it go idle before stopping it.
        task = NumTask(1)
        await flow.process(task, timeout_sec=CALL_TIMEOUT_S)
        if not check_plus_one(task):
            raise RuntimeError(f"wrong result {task.result!r}")
        await asyncio.sleep(0.5)
        children_before = len(process_tree()) - 1
    return result(
        "stop_ms",
        running.stop_ms,
        "ms",
        "lower",
        start_ms=running.start_ms,
        children_before_stop=children_before,
        # Descendants still alive right after stop() returned (a resource tracker counts).
        children_after_stop=len(process_tree()) - 1,
    )


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time used so far by all threads of ``proc``.

    Uses the nanosecond counters of /proc/<pid>/task/*/schedstat on Linux (psutil's
    cpu_times() only has clock-tick resolution, too coarse for an idle process), and
    falls back to psutil elsewhere.
    """
    task_dir = f"/proc/{proc.pid}/task"
    try:
        total_ns = 0
        for tid in os.listdir(task_dir):
            with open(f"{task_dir}/{tid}/schedstat") as fh:
                total_ns += int(fh.read().split()[0])
        return total_ns / 1e9
    except (OSError, ValueError, IndexError):
        times = proc.cpu_times()
        return times.user + times.system


async def idle_cpu(quick: bool) -> dict[str, Any]:
    """CPU burnt by an idle 2-step flow (main process + all descendants)."""
    idle_s = 3.0
    async with RunningFlow(FlowStep(IncHandler()), FlowStep(AddOneHandler())) as flow:
        await drive(flow, num_task, in_flight=4, max_tasks=50, max_seconds=1.0, check=check_plus_two)
        await asyncio.sleep(0.5)  # let any post-load activity settle
        procs = process_tree()
        before: dict[int, float] = {}
        for proc in procs:
            try:
                before[proc.pid] = cpu_seconds(proc)
            except psutil.Error:
                pass
        t0 = time.perf_counter()
        await asyncio.sleep(idle_s)
        wall = time.perf_counter() - t0
        per_proc: dict[str, float] = {}
        total = 0.0
        for proc in procs:
            if proc.pid not in before:
                continue
            try:
                used = cpu_seconds(proc) - before[proc.pid]
            except psutil.Error:
                continue
            total += used
            label = "main" if proc.pid == os.getpid() else f"child:{proc.pid}"
            per_proc[label] = round(used / wall * 100, 4)
    return result(
        "cpu_percent",
        round(total / wall * 100, 4),
        "% of one core",
        "lower",
        idle_s=round(wall, 3),
        processes=len(before),
        per_process_percent=per_proc,
    )


async def soak_memory(quick: bool) -> dict[str, Any]:
    """Many small tasks through a 2-step flow; RSS of the process tree sampled along.

    Runs for at least ``min_tasks`` tasks *and* ``min_seconds`` (a fast implementation
    would otherwise be done before any leak shows), within ``max_seconds``.
    """
    min_tasks, min_seconds, max_seconds = scaled(quick, (5000, 2.0, 20.0), (20000, 8.0, 90.0))
    chunk_s = min_seconds / 20  # about 20 samples, more if the task floor needs longer
    in_flight = 16
    samples: list[tuple[int, float]] = []
    totals = DriveStats()

    running = RunningFlow(FlowStep(IncHandler()), FlowStep(AddOneHandler()))
    async with running as flow:
        # A long warm-up so that allocator pools, caches and lazily touched pages of
        # preallocated buffers are resident before the baseline is taken.
        await drive(flow, num_task, in_flight=in_flight, max_tasks=10**9, max_seconds=min_seconds / 4)
        samples.append((0, round(total_rss_mb(), 2)))
        rss_start = rss_by_process()
        t0 = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - t0
            if (totals.completed >= min_tasks and elapsed >= min_seconds) or elapsed >= max_seconds:
                break
            stats = await drive(
                flow, num_task, in_flight=in_flight, max_tasks=10**9, max_seconds=chunk_s, check=check_plus_two
            )
            totals.completed += stats.completed
            totals.failures += stats.failures
            totals.cancelled += stats.cancelled
            totals.errors.update(stats.errors)
            samples.append((totals.completed, round(total_rss_mb(), 2)))
        totals.elapsed_s = time.perf_counter() - t0
        rss_end = rss_by_process()
    start_mb, end_mb = samples[0][1], samples[-1][1]
    mid_mb = samples[len(samples) // 2][1]
    # Where the growth happened: the main process versus the workers (and helpers).
    by_process = {
        "main" if pid == os.getpid() else f"child:{pid}": round(rss_end[pid] - rss_start[pid], 2)
        for pid in rss_start.keys() & rss_end.keys()
    }
    return result(
        "rss_growth_mb",
        round(end_mb - start_mb, 2),
        "MB",
        "lower",
        start_mb=start_mb,
        end_mb=end_mb,
        growth_second_half_mb=round(end_mb - mid_mb, 2),
        growth_per_10k_tasks_mb=round((end_mb - start_mb) / max(totals.completed, 1) * 10_000, 3),
        growth_main_mb=by_process.get("main"),
        growth_by_process_mb=by_process,
        samples=samples,
        rate=round(totals.rate, 1),
        **totals.as_extra(),
        **running.timings(),
    )


# Diagnostic scenarios, used to check that the orchestrator survives broken runs.


async def selftest_raise(quick: bool) -> dict[str, Any]:
    raise RuntimeError("selftest: this scenario always raises")


async def selftest_hang(quick: bool) -> dict[str, Any]:
    # A running flow, so that the runner has worker processes to clean up as well.
    async with RunningFlow(FlowStep(IncHandler())) as flow:
        await flow.process(NumTask(1), timeout_sec=CALL_TIMEOUT_S)
        time.sleep(3600)  # noqa: ASYNC251 - blocks the loop on purpose: the runner must kill us
    return result("never", 0, "", "lower")


# --------------------------------------------------------------------------------------
# One flow shared by several processes (``SocketFlow``, aqueduct 1.15's API)
# --------------------------------------------------------------------------------------

#: The SocketFlow preloaded by ``preload_socket_flow`` before the event loop starts (aqueduct
#: 1.15's flow server must be forked from a process without a running loop).
_SOCKET: dict[str, Any] = {}


def preload_socket_flow() -> None:
    import tempfile

    from aqueduct.sockets.flow import SocketFlow

    os.environ["_SOCKET_PATH"] = os.path.join(tempfile.mkdtemp(), "flow.sock")
    socket_flow = SocketFlow()
    _SOCKET["flow"] = socket_flow
    _SOCKET["server"] = socket_flow.preload(Flow(FlowStep(IncHandler())))


def stop_socket_flow() -> None:
    server = _SOCKET.get("server")
    if hasattr(server, "stop"):  # aqueduct-rs: a graceful stop
        server.stop()
    else:  # aqueduct 1.15: a ProcessContext; its flow's workers are daemons of this process
        for process in getattr(server, "processes", []):
            try:
                os.kill(process.pid, 9)
            except ProcessLookupError:
                pass


async def _socket_client():
    socket_flow = _SOCKET["flow"]
    deadline = time.monotonic() + 30
    while True:  # aqueduct 1.15's server binds its socket a moment after preload() returns
        try:
            await socket_flow.start()
            return socket_flow
        except Exception:  # noqa: BLE001 - retried until the deadline
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def socketflow_latency(quick: bool) -> dict[str, Any]:
    """Sequential round trips through a trivial 1-step flow served by a flow server."""
    warmup, calls = scaled(quick, (100, 300), (300, 2000))
    socket_flow = await _socket_client()
    samples_us: list[float] = []
    try:
        for i in range(warmup + calls):
            task = NumTask(i)
            t0 = time.perf_counter()
            await socket_flow.process([task], timeout_sec=CALL_TIMEOUT_S)
            if i >= warmup and check_plus_one(task):
                samples_us.append((time.perf_counter() - t0) * 1e6)
    finally:
        await socket_flow.stop()
    percentiles = statistics.quantiles(samples_us, n=100, method="inclusive")
    return result("p50", round(statistics.median(samples_us), 2), "us", "lower", p99_us=round(percentiles[98], 2))


async def socketflow_throughput_64(quick: bool) -> dict[str, Any]:
    """A trivial 1-step flow served by a flow server, 64 tasks in flight from one client."""
    max_tasks, max_seconds = scaled(quick, (100_000, 1.5), (500_000, 3.0))
    socket_flow = await _socket_client()

    async def submit(task: BaseTask) -> bool:
        return await socket_flow.process([task], timeout_sec=CALL_TIMEOUT_S)

    try:
        _, stats = await warm_then_measure(
            None, num_task, in_flight=64, warm_tasks=256, warm_seconds=0.5,
            max_tasks=max_tasks, max_seconds=max_seconds, check=check_plus_one, submit=submit,
        )  # fmt: skip
    finally:
        await socket_flow.stop()
    return result("throughput", round(stats.rate, 1), "tasks/s", "higher", in_flight=64, **stats.as_extra())


#: Set up before the event loop starts, torn down after it ends.
AROUND_LOOP: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
    "socketflow_latency": (preload_socket_flow, stop_socket_flow),
    "socketflow_throughput_64": (preload_socket_flow, stop_socket_flow),
}


async def host_calibration(quick: bool) -> dict[str, Any]:
    """What a wake-up and a spin cost on this host (``python -m aqueduct calibrate``), and the
    spin budget a 1-step flow would choose: aqueduct-rs only."""
    from aqueduct import calibrate

    costs = calibrate.measure(rounds=scaled(quick, 300, 2000))
    return result("wake_p50", round(costs["wake_p50_us"], 2), "us", "lower", **costs)


# A CPU-bound process beside the benchmark: one core of a small host taken by somebody else, as
# in production, where a flow shares its machine. It also changes what a wake-up costs (a busy
# vCPU does not halt), which is what these variants show.
BURNER = "+burner"
BURNED = ("latency_1step", "throughput_1step_64", "throughput_2step_64", "payload_16mb_2step", "host_calibration")


def start_burner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)


def stop_burner(burner: subprocess.Popen) -> None:
    burner.kill()
    burner.wait()


SCENARIOS: dict[str, Callable[[bool], Awaitable[dict[str, Any]]]] = {
    fn.__name__: fn
    for fn in (
        latency_1step,
        throughput_1step_64,
        throughput_1step_64_nometrics,
        throughput_1step_256,
        throughput_2step_64,
        throughput_2step_256,
        payload_1mb_2step,
        payload_16mb_2step,
        payload_1mb_2step_shared,
        payload_16mb_2step_shared,
        payload_16mb_2step_work,
        batching_t0,
        batching_t10ms,
        cpu_2ms_nprocs2,
        ppe_cpu_2ms,
        start_stop,
        idle_cpu,
        soak_memory,
        socketflow_latency,
        socketflow_throughput_64,
        selftest_raise,
        selftest_hang,
        host_calibration,
    )
}
for _name in BURNED:
    SCENARIOS[_name + BURNER] = SCENARIOS[_name]


def implementation_info() -> dict[str, Any]:
    """Where the imported aqueduct comes from (to tell implementations apart)."""
    import importlib.metadata

    import aqueduct

    version = getattr(aqueduct, "__version__", None)
    for dist in ("aqueduct", "aqueduct-rs"):
        try:
            version = f"{dist} {importlib.metadata.version(dist)}"
            break
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"module": getattr(aqueduct, "__file__", None), "version": version, "python": sys.version.split()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", help="scenario name (see --list)")
    parser.add_argument("--quick", action="store_true", help="shorter run, for smoke testing")
    parser.add_argument("--list", action="store_true", help="print the scenario names and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    if args.scenario not in SCENARIOS:
        parser.error(f"unknown scenario {args.scenario!r}; choose from: {', '.join(SCENARIOS)}")

    t0 = time.perf_counter()
    setup, teardown = AROUND_LOOP.get(args.scenario.removesuffix(BURNER), (lambda: None, lambda: None))
    burner = start_burner() if args.scenario.endswith(BURNER) else None
    setup()
    try:
        outcome = asyncio.run(SCENARIOS[args.scenario](args.quick))
    finally:
        teardown()
        if burner is not None:
            stop_burner(burner)
    outcome = {
        "scenario": args.scenario,
        **outcome,
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - t0, 3),
        "impl": implementation_info(),
    }
    # The orchestrator reads the last line of stdout.
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
