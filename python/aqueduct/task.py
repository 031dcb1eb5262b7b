"""``BaseTask``: the unit of work, and the object results are written back into."""

from __future__ import annotations

from random import getrandbits
from time import monotonic
from typing import Any, Optional, Set

DEFAULT_PRIORITY = 0


class BaseTask:
    """Subclass it with the fields your handlers read and write.

    ``await flow.process(task)`` sends the task through the steps and writes the fields the
    handlers set back into this same object (:meth:`update`).
    """

    task_id: str = ''
    priority: int = DEFAULT_PRIORITY
    expiration_time: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task_id = new_task_id()
        self.priority = DEFAULT_PRIORITY
        self.expiration_time = None

    def __repr__(self) -> str:
        fields = ', '.join(f'{k}={v!r}' for k, v in self.__dict__.items() if not k.startswith('_'))
        return f'<{type(self).__name__} {fields}>'

    __str__ = __repr__

    def set_timeout(self, timeout_sec: float) -> None:
        """The task expires ``timeout_sec`` seconds from now (``process`` sets it)."""
        self.expiration_time = monotonic() + timeout_sec

    def set_priority(self, priority: int) -> None:
        """Higher is served first; must be below the flow's ``queue_priorities``."""
        self.priority = priority

    def is_expired(self) -> bool:
        return self.expiration_time is not None and monotonic() >= self.expiration_time

    def update(self, source_task: BaseTask, excluded_fields: Set[str] | None = None) -> None:
        """Copies the fields of ``source_task`` (a processed copy of this task) into this one.

        The bookkeeping fields of ``BaseTask`` itself (``task_id``, ``priority``,
        ``expiration_time``) are not copied, nor are ``excluded_fields``.
        """
        self.update_from_state(source_task.__dict__, excluded_fields)

    def update_from_state(self, state: dict, excluded_fields: Optional[Set[str]] = None) -> None:
        """:meth:`update` from the fields of a processed copy, given as its ``__dict__``."""
        immutable = _BASE_FIELDS if not excluded_fields else _BASE_FIELDS | set(excluded_fields)
        for field, value in state.items():
            if field not in immutable:
                setattr(self, field, value)


def new_task_id() -> str:
    """A random (version 4) UUID string, like ``str(uuid.uuid4())``.

    Drawn from ``random`` rather than ``os.urandom``: a task id needs uniqueness, not secrecy,
    and this avoids a system call per task. The ``random`` module reseeds itself in every forked
    child, so processes never share a sequence.
    """
    h = '%032x' % ((getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET)
    return f'{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}'


# Version 4 in bits 76-79 and the RFC 4122 variant (0b10) in bits 62-63.
_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID4_SET = (0x4 << 76) | (0x2 << 62)

_BASE_FIELDS = frozenset({'task_id', 'priority', 'expiration_time', 'metrics'})


class StopTask(BaseTask):
    """Kept for compatibility with code that imports it; the engine stops workers itself."""
