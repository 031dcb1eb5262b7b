"""Names and containers shared by the metrics modules (the vocabulary of aqueduct 1.15): the
``IExtendable`` and ``IMetricsItems`` interfaces and the ``MetricsItems`` list of samples."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Iterable, List, Tuple

MAIN_PROCESS = 'main_process'
AQUEDUCT = 'aqueduct'


class MetricsTypes(Enum):
    """What a :class:`~aqueduct.metrics.collect.Collector` may collect (``collectible_metrics``)."""

    TASK_TIMERS = 'task_timers'
    QUEUE_SIZE = 'queue_size'


class IExtendable(ABC):
    """Something that merges another object of its own kind into itself."""

    @abstractmethod
    def extend(self, obj: Any) -> None: ...


class IMetricsItems(IExtendable):
    """A metric family as ``(name, value)`` pairs."""

    @property
    @abstractmethod
    def items(self) -> Iterable[Tuple[str, Any]]: ...


class MetricsItems(IMetricsItems):
    """``(name, value)`` pairs of one metric family for one export period."""

    def __init__(self, items: List[Tuple[str, Any]] | None = None):
        self._items: List[Tuple[str, Any]] = items or []

    @property
    def items(self) -> List[Tuple[str, Any]]:
        return self._items

    def add(self, name: str, value: Any) -> None:
        self._items.append((name, value))

    def add_items(self, items: Iterable[Tuple[str, Any]]) -> None:
        self._items.extend(items)

    def extend(self, other: IMetricsItems) -> None:
        self._items.extend(other.items)

    def __len__(self) -> int:
        return len(self._items)
