"""How a task crosses a process boundary.

A task is usually an instance of a plain ``BaseTask`` subclass whose whole state is its
``__dict__``. Pickling such an object makes ``pickle`` write, and the other side resolve, a
reference to the class (module import lookup and attribute walk) on every crossing, which
profiling showed to be a fifth of the main process's work per task. For those classes the wire
form is ``(module, qualname, state_dict)``: the class is looked up once per process and cached,
and the caller's task is updated straight from the state dict. Any other task (custom
``__reduce__``/``__getstate__``/``__setstate__``, ``__slots__``) is pickled whole, unchanged.
"""

from __future__ import annotations

import copyreg
import importlib
import pickle
from typing import Any, Dict, Tuple

_dumps = pickle.dumps
_loads = pickle.loads

#: class -> its wire key, or None when it needs full pickling
_plain: Dict[type, Any] = {}
#: wire key -> class
_classes: Dict[Tuple[str, str], type] = {}


def _wire_key(cls: type):
    key = _plain.get(cls, _plain)
    if key is not _plain:
        return key
    plain = (
        cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is object.__getstate__
        and getattr(cls, '__setstate__', None) is None
        and '__slots__' not in cls.__dict__
        and all('__slots__' not in base.__dict__ for base in cls.__mro__[1:-1])
        and cls not in copyreg.dispatch_table
        and '<locals>' not in cls.__qualname__
    )
    key = (cls.__module__, cls.__qualname__) if plain else None
    _plain[cls] = key
    if key is not None:
        _classes.setdefault(key, cls)
    return key


def encode(task: Any) -> bytes:
    """The bytes that carry ``task`` to another process."""
    key = _wire_key(type(task))
    if key is None:
        return _dumps(task, 5)
    return _dumps((key[0], key[1], task.__dict__), 5)


def _resolve(module: str, qualname: str) -> type:
    cls = _classes.get((module, qualname))
    if cls is None:
        obj: Any = importlib.import_module(module)
        for part in qualname.split('.'):
            obj = getattr(obj, part)
        cls = _classes.setdefault((module, qualname), obj)
    return cls


def decode(data) -> Any:
    """The task object carried by ``data`` (a new instance)."""
    obj = _loads(data)
    if obj.__class__ is tuple:
        module, qualname, state = obj
        cls = _resolve(module, qualname)
        task = cls.__new__(cls)
        task.__dict__.update(state)
        return task
    return obj


def decode_state(data) -> Tuple[Any, Dict[str, Any]]:
    """``(task, None)`` or ``(None, state)``: the caller updates its own task from the state
    without building a second object."""
    obj = _loads(data)
    if obj.__class__ is tuple:
        return None, obj[2]
    return obj, None
