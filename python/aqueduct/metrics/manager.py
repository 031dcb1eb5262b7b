"""``MetricsManager`` and ``get_metrics_manager``: importable for code written for aqueduct
1.15, where they ran a flow's collect and export loops. A flow here runs those itself from
``Flow(metrics_collector=..., metrics_exporter=...)``, so there is nothing to manage."""

from __future__ import annotations

from typing import Any, NoReturn

_REPLACEMENT = (
    'a flow collects and exports its metrics itself: pass Flow(metrics_collector=Collector(...), '
    'metrics_exporter=...) instead of building a MetricsManager'
)


class MetricsManager:
    def __init__(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(_REPLACEMENT)

    # 1.15's methods, so that code naming them still imports and reads; unreachable, since no
    # instance can be made.
    def start(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(_REPLACEMENT)

    def stop(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(_REPLACEMENT)


def get_metrics_manager(*args: Any, **kwargs: Any) -> NoReturn:
    raise NotImplementedError(_REPLACEMENT)
