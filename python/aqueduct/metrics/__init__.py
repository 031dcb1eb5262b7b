"""Metrics: StatsD export with aqueduct 1.15's names, Prometheus exposition, and the snapshot
both are built from.

Workers record into shared memory and the hub into the main process, with no per-task message;
every ``export_period`` the flow turns a snapshot into an :class:`AqueductMetricsStorage` and
hands it to the exporter. See :mod:`aqueduct.metrics.prometheus` for ``/metrics``.
"""

from .base import AQUEDUCT, MAIN_PROCESS, IExtendable, IMetricsItems, MetricsItems, MetricsTypes
from .collect import AqueductMetricsStorage, Collector, ProcessesStats, TasksStats
from .export import DummyExporter, Exporter, StatsDBuffer, ToStatsDMetricsExporter

__all__ = [
    'AQUEDUCT',
    'MAIN_PROCESS',
    'AqueductMetricsStorage',
    'Collector',
    'DummyExporter',
    'Exporter',
    'IExtendable',
    'IMetricsItems',
    'MetricsItems',
    'MetricsTypes',
    'ProcessesStats',
    'StatsDBuffer',
    'TasksStats',
    'ToStatsDMetricsExporter',
]
