"""Metrics as aqueduct 1.15 exposed them: its modules and names, ``Collector`` options, when
gauges are sent, ``handle_time.total`` and ``task.metrics``."""

from __future__ import annotations

import asyncio
import importlib
import time

import pytest
from aqueduct import BaseTask, Flow, FlowStep
from aqueduct.exceptions import FlowError
from aqueduct.metrics import Collector, IExtendable, IMetricsItems, MetricsItems, MetricsTypes
from aqueduct.metrics.collect import AqueductMetricsStorage, TasksStats
from aqueduct.metrics.manager import MetricsManager, get_metrics_manager
from aqueduct.metrics.processes import ProcessesStats
from aqueduct.metrics.queue import TaskMetricsQueue
from aqueduct.metrics.task import TaskMetrics, TasksMetricsStorage
from aqueduct.metrics.timer import Timer, TransferTimer, timeit

from .fake_statsd import FakeStatsD
from .handlers import Add, Nap, OwnTimings, RaiseOdd, Task

# The timing tests read clocks and sample counts, not worker behaviour: one start method is enough.
fork_only = pytest.mark.parametrize('start_method', ['fork'])


# ---------------------------------------------------------------- names and modules


@pytest.mark.parametrize(
    ('module', 'names'),
    [
        ('aqueduct.metrics', ['IExtendable', 'IMetricsItems', 'MetricsItems', 'MetricsTypes', 'Collector']),
        ('aqueduct.metrics.base', ['IExtendable', 'IMetricsItems', 'MetricsItems', 'MAIN_PROCESS', 'AQUEDUCT']),
        ('aqueduct.metrics.collect', ['AqueductMetricsStorage', 'Collector', 'TasksStats', 'ProcessesStats']),
        ('aqueduct.metrics.manager', ['MetricsManager', 'get_metrics_manager']),
        ('aqueduct.metrics.processes', ['ProcessesStats']),
        ('aqueduct.metrics.queue', ['TaskMetricsQueue']),
        ('aqueduct.metrics.task', ['TaskMetrics', 'TasksMetricsStorage']),
        ('aqueduct.metrics.timer', ['Timer', 'TransferTimer', 'timeit']),
    ],
)
def test_the_modules_and_names_of_1_15_import(module, names):
    mod = importlib.import_module(module)
    assert all(hasattr(mod, name) for name in names)


def test_the_interfaces_are_abstract_and_implemented():
    with pytest.raises(TypeError):
        IMetricsItems()
    for cls in (MetricsItems, TasksStats, ProcessesStats):
        assert issubclass(cls, IMetricsItems) and issubclass(cls, IExtendable)
    assert issubclass(AqueductMetricsStorage, TasksMetricsStorage)
    assert issubclass(TaskMetrics, TasksMetricsStorage)


@pytest.mark.parametrize(
    'build', [TaskMetricsQueue, MetricsManager, get_metrics_manager], ids=['queue', 'manager', 'get_manager']
)
def test_the_internals_of_1_15s_engine_say_what_replaces_them(build):
    with pytest.raises(NotImplementedError, match='metrics_exporter'):
        build()


def test_stats_take_1_15s_positional_order():
    stats = TasksStats(1, 2, 3)
    assert (stats.cancel, stats.timeout, stats.complete, stats.error) == (1, 2, 3, 0)
    assert [name for name, _ in stats.items][:3] == ['cancel', 'timeout', 'complete']
    procs = ProcessesStats(4, 5)
    assert (procs.dead, procs.running, procs.restarted) == (4, 5, 0)
    procs.add_dead_process()
    procs.add_running_process()
    procs.extend(ProcessesStats(restarted=1))
    assert (procs.dead, procs.running, procs.restarted) == (5, 6, 1)


def test_timers_and_task_metrics():
    with timeit() as timer:
        time.sleep(0.002)
    assert isinstance(timer, Timer) and 0.002 <= timer.seconds < 1
    assert Timer().seconds is None
    assert TransferTimer('a').transfer_from == 'a'
    metrics = TaskMetrics()
    with pytest.raises(RuntimeError, match='start_transfer_timer'):
        metrics.stop_transfer_timer('b')
    metrics.start_transfer_timer('main_process')
    metrics.stop_transfer_timer('step1_A', priority=2)
    metrics.save_task_size(100, 'step1_A')
    assert [name for name, _ in metrics.transfer_times.items] == ['p_2_from_main_process_to_step1_A']
    assert metrics.task_sizes.items == [('from_main_process_to_step1_A', 100)]


# ---------------------------------------------------------------- Collector


def test_collector_options():
    assert Collector().collectible_metrics == list(MetricsTypes)
    only = Collector(['queue_size'], qsize_collect_period=0.25)
    assert only.is_collectible(MetricsTypes.QUEUE_SIZE) and not only.is_collectible(MetricsTypes.TASK_TIMERS)
    assert only.qsize_collect_period == 0.25
    with pytest.raises(ValueError):
        Collector(['queue_sizes'])
    for bad in (0, -1, 'often', True):
        with pytest.raises(ValueError, match='qsize_collect_period'):
            Collector(qsize_collect_period=bad)
    with pytest.raises(TypeError, match='metrics_collector'):
        Flow(Add(), metrics_collector=object())


async def test_collector_gathers_until_extracted():
    class Sized:
        def qsize(self):
            return 3

    collector = Collector(qsize_collect_period=0.01)
    collector.add_tasks_stats(TasksStats(complete=2))
    collector.add_memory_usage(MetricsItems([('all_memory_usage', 10)]))
    collecting = asyncio.ensure_future(collector.collect_qsize({Sized(): 'q'}))
    await asyncio.sleep(0.035)
    collecting.cancel()
    first = collector.extract_metrics()
    assert first.tasks_stats.complete == 2 and first.memory_usage.items == [('all_memory_usage', 10)]
    # How many samples fit in the window depends on the machine's load: at least the first.
    assert len(first.queue_sizes) >= 1 and set(first.queue_sizes.items) == {('q', 3)}
    assert collector.extract_metrics().tasks_stats.complete == 0
    await asyncio.sleep(0)


@fork_only
@pytest.mark.parametrize(
    ('collectible', 'timers', 'queues'),
    [([], False, False), ([MetricsTypes.QUEUE_SIZE], False, True), (['task_timers'], True, False)],
)
async def test_collectible_metrics_choose_what_is_exported(make_flow, collectible, timers, queues):
    statsd = FakeStatsD()
    exporter = statsd.exporter(export_period=0.02)
    flow = make_flow(FlowStep(Nap(), batch_size=2), metrics_collector=Collector(collectible), metrics_exporter=exporter)
    await asyncio.gather(*(flow.process(Task(i)) for i in range(4)))
    await statsd.exported()
    assert flow.need_collect_task_timers is timers
    sent = statsd.names('timing') | statsd.names('count')
    families = {'handle_time', 'transfer_time', 'task_size', 'batch_time', 'batch_size'}
    assert {name.split('.')[1] for name in sent} >= ({'qsize'} if queues else set()) | {'tasks', 'memory_usage'}
    assert bool(families & {name.split('.')[1] for name in sent}) is timers
    assert any(name.startswith('aqueduct.qsize.') for name in sent) is queues
    assert sum(statsd.calls[('count', 'aqueduct.tasks.complete')]) == 4, 'task counts are always collected'


def test_disabled_metrics_collect_no_task_timers():
    assert not Flow(Add(), metrics_enabled=False).need_collect_task_timers
    assert Flow(Add()).need_collect_task_timers


# ---------------------------------------------------------------- gauges


@fork_only
async def test_gauges_are_sent_once_per_collection_not_once_per_export(make_flow):
    statsd = FakeStatsD()
    flow = make_flow(Add(), FlowStep(Add(), nprocs=2), metrics_exporter=statsd.exporter(export_period=0.01))
    await flow.process(Task(1))
    await statsd.exported(20)  # 0.2 s at least: twenty exports, one collection of each gauge
    await flow.stop(graceful=False)
    assert statsd.rounds >= 20
    for name in (
        'aqueduct.qsize.from_main_process_to_step1_Add',
        'aqueduct.qsize.from_step2_Add_to_main_process',
        'aqueduct.memory_usage.step0_Add',
        'aqueduct.memory_usage.step1_Add_nprocs_sum',
        'aqueduct.memory_usage.all_memory_usage',
        'aqueduct.processes.running',
    ):
        assert statsd.sent(name) == 1, name
    assert statsd.sent('aqueduct.memory_usage.step1_Add') == 2, 'one line per worker'
    assert statsd.calls[('count', 'aqueduct.processes.running')] == [3]


@fork_only
async def test_queue_sizes_follow_qsize_collect_period(make_flow):
    statsd = FakeStatsD()
    collector = Collector(qsize_collect_period=0.1)
    flow = make_flow(Add(), metrics_collector=collector, metrics_exporter=statsd.exporter(export_period=0.5))
    started = time.monotonic()
    await asyncio.sleep(0.55)
    await flow.stop(graceful=False)
    elapsed = time.monotonic() - started
    sent = statsd.sent('aqueduct.qsize.from_main_process_to_step1_Add')
    # One at start and one per period: several per export, as 1.15 sends them.
    # At start and then per period; a loaded machine may run the timers late, never early.
    assert 2 <= sent <= int(elapsed / 0.1) + 1
    assert statsd.sent('aqueduct.processes.running') == 1


# ---------------------------------------------------------------- handle_time.total


@fork_only
async def test_handle_time_total_is_each_completed_task_end_to_end(make_flow):
    statsd = FakeStatsD()
    flow = make_flow(Nap(), RaiseOdd(), metrics_exporter=statsd.exporter(export_period=0.02))
    await asyncio.gather(*(flow.process(Task(2 * i)) for i in range(3)))
    with pytest.raises(FlowError):
        await flow.process(Task(1))
    with pytest.raises(FlowError, match='[Tt]imeout'):
        await flow.process(Task(0), timeout_sec=0.002)
    await statsd.exported()
    totals = statsd.calls[('timing', 'aqueduct.handle_time.total')]
    assert len(totals) == 3, 'only tasks that complete, as in 1.15'
    steps = statsd.calls[('timing', 'aqueduct.handle_time.step1_Nap')]
    assert min(totals) >= min(steps) >= 10, 'milliseconds, every step included'


@fork_only
async def test_handle_time_total_is_sampled_per_period(make_flow):
    statsd = FakeStatsD()
    flow = make_flow(FlowStep(Add(), batch_size=50), metrics_exporter=statsd.exporter(export_period=30))
    await asyncio.gather(*(flow.process(Task(i)) for i in range(300)))
    await flow.stop(graceful=False)  # the last period is exported on stop
    assert len(statsd.calls[('timing', 'aqueduct.handle_time.total')]) == 64
    assert sum(statsd.calls[('count', 'aqueduct.tasks.complete')]) == 300


@fork_only
async def test_no_handle_time_total_without_task_timers(make_flow):
    statsd = FakeStatsD()
    exporter = statsd.exporter(export_period=0.02)
    flow = make_flow(Add(), metrics_collector=Collector([MetricsTypes.QUEUE_SIZE]), metrics_exporter=exporter)
    await flow.process(Task(1))
    await statsd.exported()
    assert not statsd.calls[('timing', 'aqueduct.handle_time.total')]


# ---------------------------------------------------------------- task.metrics


def test_task_metrics_is_made_on_first_use():
    assert BaseTask.metrics is None, "1.15's class attribute"
    task = Task(1)
    assert 'metrics' not in vars(task), 'nothing extra travels to the workers'
    assert isinstance(task.metrics, TaskMetrics)
    assert task.metrics is task.metrics
    task.metrics = None
    assert task.metrics is None


async def test_samples_a_handler_adds_to_task_metrics_are_exported(make_flow):
    statsd = FakeStatsD()
    flow = make_flow(OwnTimings(), metrics_exporter=statsd.exporter(export_period=0.02))
    tasks = [Task(i) for i in range(3)]
    await asyncio.gather(*(flow.process(t) for t in tasks))
    await statsd.exported()
    assert statsd.calls[('timing', 'aqueduct.handle_time.decode')] == [250.0] * 3
    assert [t.result for t in tasks] == [0, 1, 2]
    # As in 1.15, the processed copy's metrics are not written back into the caller's task.
    assert all('metrics' not in vars(t) for t in tasks)
