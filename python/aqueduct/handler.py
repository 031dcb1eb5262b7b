"""``BaseTaskHandler``: the base class of a step's processing code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .task import BaseTask

HandleConditionType = Callable[['BaseTask'], bool]


class BaseTaskHandler:
    """Subclass it and override :meth:`handle` (and :meth:`on_start` to load a model).

    One instance per step is created by the user in the main process; each worker process of the
    step gets its own copy (inherited with ``fork``, pickled with ``spawn``/``forkserver``), on
    which :meth:`on_start` runs once, in the worker.
    """

    @classmethod
    def get_step_name(cls, step_number: int) -> str:
        """``step{n}_{ClassName}``: the name used in logs and metrics."""
        return f'step{step_number}_{cls.__name__}'

    def on_start(self) -> None:
        """Runs once in each worker process before it takes tasks: load models here, so the
        main process does not hold their memory."""

    def handle(self, *tasks: BaseTask) -> None:
        """Processes a batch (``batch_size`` tasks at most). Write results into task fields."""
        raise NotImplementedError
