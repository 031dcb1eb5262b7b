"""Metrics as aqueduct 1.15 exposed them: its modules and names, and ``Collector`` options."""

from __future__ import annotations

import asyncio
import importlib
import time

import pytest
from aqueduct.metrics import Collector, IExtendable, IMetricsItems, MetricsItems, MetricsTypes
from aqueduct.metrics.collect import AqueductMetricsStorage, TasksStats
from aqueduct.metrics.manager import MetricsManager, get_metrics_manager
from aqueduct.metrics.processes import ProcessesStats
from aqueduct.metrics.queue import TaskMetricsQueue
from aqueduct.metrics.task import TaskMetrics, TasksMetricsStorage
from aqueduct.metrics.timer import Timer, TransferTimer, timeit

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
    assert 3 <= len(first.queue_sizes) <= 5 and set(first.queue_sizes.items) == {('q', 3)}
    assert collector.extract_metrics().tasks_stats.complete == 0
    await asyncio.sleep(0)
