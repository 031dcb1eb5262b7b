"""Names and containers shared by the metrics modules (the vocabulary of aqueduct 1.15)."""

from __future__ import annotations

from enum import Enum
from typing import Any, List, Tuple

MAIN_PROCESS = 'main_process'
AQUEDUCT = 'aqueduct'


class MetricsTypes(Enum):
    TASK_TIMERS = 'task_timers'
    QUEUE_SIZE = 'queue_size'


class MetricsItems:
    """``(name, value)`` pairs of one metric family for one export period."""

    def __init__(self, items: List[Tuple[str, Any]] | None = None):
        self._items: List[Tuple[str, Any]] = items or []

    @property
    def items(self) -> List[Tuple[str, Any]]:
        return self._items

    def add(self, name: str, value: Any) -> None:
        self._items.append((name, value))

    def add_items(self, items: List[Tuple[str, Any]]) -> None:
        self._items.extend(items)

    def extend(self, other: MetricsItems) -> None:
        self._items.extend(other.items)

    def __len__(self) -> int:
        return len(self._items)
