"""``BaseTask``: the unit of work, and the object results are written back into.

Shared fields (``share_value``, ``share_value_with_data``) come from its base class,
:class:`aqueduct.shm.mixin.SharedFieldsMixin`, as in aqueduct 1.15.
"""

from __future__ import annotations

from time import monotonic
from typing import Any, Dict, Optional, Set

from . import _core
from .shm.base import SharedValue
from .shm.mixin import DEFAULT_MAX_PAYLOAD, HasReadany, SharedFieldsMixin

# Kept importable from here, where they were defined before ``aqueduct.shm`` became a package.
__all__ = ['DEFAULT_MAX_PAYLOAD', 'BaseTask', 'HasReadany', 'SharedFieldsMixin', 'SharedValue', 'StopTask']

DEFAULT_PRIORITY = 0


class _TaskMetricsField:
    """``task.metrics``: aqueduct 1.15's per-task :class:`~aqueduct.metrics.task.TaskMetrics`,
    made on first use, so a task that never touches it carries nothing more to the workers.
    Samples a handler adds to it are exported when the task completes; on the class it reads
    ``None``, as 1.15's class attribute did."""

    def __get__(self, task: Optional[BaseTask], owner: Optional[type] = None) -> Any:
        if task is None:
            return None
        from .metrics.task import TaskMetrics

        # Into the instance dict: later reads find it there, without this descriptor.
        metrics = task.__dict__['metrics'] = TaskMetrics()
        return metrics


class BaseTask(SharedFieldsMixin):
    """Subclass it with the fields your handlers read and write.

    ``await flow.process(task)`` sends the task through the steps and writes the fields the
    handlers set back into this same object (:meth:`update`).
    """

    task_id: str = ''
    priority: int = DEFAULT_PRIORITY
    expiration_time: Optional[float] = None
    metrics = _TaskMetricsField()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs or _has_later_init[type(self)]:
            super().__init__(*args, **kwargs)
        # else the next __init__ is object's, which does nothing: a call saved per task.
        # Straight into the instance dict: these are never shared fields, and `__setattr__`
        # would cost a Python call each.
        own = self.__dict__
        own['task_id'] = new_task_id()
        own['priority'] = DEFAULT_PRIORITY
        own['expiration_time'] = None

    def __repr__(self) -> str:
        fields = ', '.join(f'{k}={v!r}' for k, v in self.__dict__.items() if not k.startswith('_'))
        return f'<{type(self).__name__} {fields}>'

    __str__ = __repr__

    def set_timeout(self, timeout_sec: float) -> None:
        """The task expires ``timeout_sec`` seconds from now (``process`` sets it)."""
        self.__dict__['expiration_time'] = monotonic() + timeout_sec

    def set_priority(self, priority: int) -> None:
        """Higher is served first; one past the flow's ``queue_priorities`` levels is served at the
        highest (as in aqueduct 1.15)."""
        self.priority = priority

    def is_expired(self) -> bool:
        return self.expiration_time is not None and monotonic() >= self.expiration_time

    # ---------------------------------------------------------------- results

    def update(self, source_task: BaseTask, excluded_fields: Optional[Set[str]] = None) -> None:
        """Copies the fields of ``source_task`` (a processed copy of this task) into this one.

        The bookkeeping fields of ``BaseTask`` itself (``task_id``, ``priority``,
        ``expiration_time``) are not copied, nor are ``excluded_fields``. A shared field that
        still lives in the same shared memory keeps this task's object (which already shows any
        in-place change).
        """
        state = source_task.__dict__
        slots = _slot_names(type(source_task))
        if slots:
            # Fields in ``__slots__`` live outside ``__dict__``: without this their results
            # would be silently lost.
            state = dict(state)
            for name in slots:
                try:
                    state[name] = getattr(source_task, name)
                except AttributeError:  # a slot never assigned
                    pass
        self.update_from_state(state, excluded_fields)

    def update_from_state(self, state: Dict[str, Any], excluded_fields: Optional[Set[str]] = None) -> None:
        """:meth:`update` from the fields of a processed copy, given as its ``__dict__``."""
        immutable = BASE_FIELDS if not excluded_fields else BASE_FIELDS | set(excluded_fields)
        theirs = state.get('_shared_fields')
        mine = self.__dict__.get('_shared_fields')
        if not theirs and not mine:
            # Straight into the instance dict, except for names the class defines as data
            # descriptors (properties with setters), which must go through `setattr`.
            own = self.__dict__
            special = _data_descriptors(type(self))
            for field, value in state.items():
                if field not in immutable:
                    if field in special:
                        setattr(self, field, value)
                    else:
                        own[field] = value
            return
        from ._codec import FromShared

        # As in aqueduct 1.15, a field this task shares is never overwritten by the processed
        # copy: it is the same shared memory, already showing any in-place change. A field the
        # handlers shared is taken as they left it, and shared here too.
        theirs = theirs or {}
        mine = dict(mine or {})
        own = self.__dict__
        for field, value in state.items():
            if field in immutable or field == '_shared_fields' or field in mine:
                continue
            if field in theirs:
                mine[field] = theirs[field]
                own[field] = theirs[field].value() if value.__class__ is FromShared else value
            elif value.__class__ is not FromShared:
                setattr(self, field, value)
        own['_shared_fields'] = mine


class _LaterInits(dict):
    """task class -> whether a class after ``BaseTask`` in its MRO (a mixin) defines
    ``__init__``, which ``BaseTask.__init__`` must then call (cooperative inheritance)."""

    def __missing__(self, cls: type) -> bool:
        mro = cls.__mro__
        later = mro[mro.index(BaseTask) + 1 : -1]
        found = self[cls] = any('__init__' in vars(klass) for klass in later)
        return found


_has_later_init = _LaterInits()


class _PlainUpdates(dict):
    """task class -> whether ``process()`` may write a result's fields straight into the
    caller's task: the class keeps ``BaseTask``'s ``update`` and ``update_from_state`` and
    defines no data descriptor (a property with a setter must be assigned through)."""

    def __missing__(self, cls: type) -> bool:
        plain = self[cls] = (
            getattr(cls, 'update', None) is BaseTask.update
            and getattr(cls, 'update_from_state', None) is BaseTask.update_from_state
            and not _data_descriptors(cls)
        )
        return plain


plain_update = _PlainUpdates()


_descriptor_cache: Dict[type, frozenset] = {}


_slot_cache: Dict[type, tuple] = {}


def _slot_names(cls: type) -> tuple:
    """Attribute names of the ``__slots__`` a task class and its bases declare."""
    names = _slot_cache.get(cls)
    if names is None:
        found = []
        for klass in cls.__mro__:
            declared = klass.__dict__.get('__slots__', ())
            for name in (declared,) if isinstance(declared, str) else declared:
                if name in ('__dict__', '__weakref__'):
                    continue
                if name.startswith('__') and not name.endswith('__'):
                    name = f'_{klass.__name__.lstrip("_")}{name}'  # private names are mangled
                found.append(name)
        names = _slot_cache[cls] = tuple(found)
    return names


def _data_descriptors(cls: type) -> frozenset:
    """Names of the data descriptors (e.g. properties) a task class defines."""
    names = _descriptor_cache.get(cls)
    if names is None:
        names = frozenset(
            name
            for klass in cls.__mro__
            for name, attr in vars(klass).items()
            if hasattr(type(attr), '__set__') and not name.startswith('__')
        )
        _descriptor_cache[cls] = names
    return names


#: ``new_task_id()``: a random (version 4) UUID string, like ``str(uuid.uuid4())``, made by the
#: engine from kernel randomness, fresh in every forked process (``aqueduct_core::ids``).
new_task_id = _core.new_task_id

#: The bookkeeping fields of ``BaseTask`` a result never overwrites.
BASE_FIELDS = frozenset({'task_id', 'priority', 'expiration_time', 'metrics'})


class StopTask(BaseTask):
    """Kept for compatibility with code that imports it; the engine stops workers itself."""
