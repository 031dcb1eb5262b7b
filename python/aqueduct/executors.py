"""Where a step's batches run, when not in the flow's own worker processes.

A step runs in local worker processes unless it is given an executor:
``FlowStep(Model(), nprocs=4, executor=SomeExecutor())``. Each of the step's ``nprocs`` slots is
then served by the executor instead of a process: the flow hands it an :class:`ExecutorWorker`
per slot, whose ``endpoint`` is the slot's end of the engine's rings in this process. The
executor's worker takes batches from it (``recv``), runs the handler wherever it likes (a thread,
a remote actor), and answers every task through it, the same protocol a worker process speaks
(:func:`aqueduct._worker.serve` implements it for a handler in this process).

Everything the engine does for a worker process it does for an executor's worker: batches are
formed, priorities and deadlines applied, batches sent ahead can be taken back until the worker
begins them, outcomes reach each caller exactly once, and when the worker stops serving (it
calls ``exited()``, from any thread) the tasks it held fail with ``WorkerDiedError``, those it
never began go back to the queue, and a replacement is started under the flow's
``RestartPolicy``. An executor's worker acts as this process in the shared-memory pool.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

from . import _core
from .handler import BaseTaskHandler

#: Per later step: ``(step index, handle_condition, handler class name)``.
Routes = List[Tuple[int, Callable[[Any], bool], str]]


@dataclass(frozen=True)
class ExecutorWorker:
    """One slot of a step, for its executor to serve."""

    #: The slot's index in the flow (stable across replacements).
    slot: int
    #: The step's name (``step1_Model``) and handler.
    step_name: str
    handler: BaseTaskHandler
    #: The later steps' conditions, which decide where each result goes next.
    routes: Routes
    #: The slot's end of the rings: ``ready()``, ``recv()``, ``send_result()``, ``finish_batch()``.
    endpoint: _core.Worker
    #: Call, from any thread, once the worker has stopped serving (done, crashed or killed).
    exited: Callable[[], None]


class Executor(abc.ABC):
    """Serves the slots of the steps it is given to."""

    @abc.abstractmethod
    def start_worker(self, worker: ExecutorWorker) -> None:
        """Starts serving ``worker``'s slot: run ``on_start``, report ``ready()``, then answer
        batches until ``recv()`` returns ``None`` (the flow stops the slot), then ``exited()``.
        Called once per slot, and again for each replacement."""

    def stop_worker(self, slot: int, hard: bool) -> None:  # noqa: B027 (optional to override)
        """A hard stop: the worker should end as soon as it can, abandoning its batch (its tasks
        have been failed already). A graceful stop needs nothing: ``recv()`` returns ``None``."""

    def close(self) -> None:  # noqa: B027 (optional to override)
        """The flow stopped: release what the executor holds."""


__all__ = ['Executor', 'ExecutorWorker']
