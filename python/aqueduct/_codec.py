"""How a task crosses a process boundary: pickled state plus out-of-band buffers in the pool.

Two things keep this cheap.

**State, not objects.** A task is usually an instance of a plain ``BaseTask`` subclass whose
whole state is its ``__dict__``. Pickling such an object makes ``pickle`` write, and the other
side resolve, a reference to the class on every crossing, which profiling showed to be a fifth
of the main process's work per task. For those classes the wire form is
``(module, qualname, state)``: the class is looked up once per process and cached, and the
caller's task is updated straight from the state. Any other task (custom ``__reduce__``,
``__getstate__``, ``__setstate__`` of its own, ``__slots__``) is pickled whole. (``BaseTask``'s own
``__getstate__``/``__setstate__`` are for pickles made outside the flow, see
:mod:`aqueduct.shm.mixin`; the codec writes the state itself.)

**No pickle for plain values.** When that state holds nothing but ``None``, ``bool``, ``int``,
``float``, ``str``, small ``bytes`` and tuples, lists and dicts of them (the common tiny task),
the engine writes it in a compact form of its own (``_core.encode_state``, documented in the
bindings' ``codec.rs``): a fraction of what setting up a pickler and an unpickler costs per
task, and decoding it constructs no object of anyone's class. Anything else in the state falls
back to pickling, and so does an object reached twice (its identity is kept), so the choice
does not change what arrives (a string under 64 bytes reached twice arrives as two equal ones).

**Buffers by reference.** Pickle protocol 5 hands contiguous buffers (numpy arrays,
``bytearray``) to a callback instead of copying them into the stream. One that already lives in
the pool (an array received from another step, a shared field) travels as a new reference;
any other at or above the threshold (:func:`aqueduct.shm.threshold`) is copied in once. The
receiver gets the buffers back as ``ShmBuffer`` objects and numpy rebuilds its arrays as views
on them: no copy between steps, none on the way back. Large ``bytes`` fields travel the same
way (and are copied out on arrival, ``bytes`` being immutable). Shared values
(:class:`aqueduct.shm.base.SharedValue`) are pickled as out-of-band buffers only here, while
:data:`aqueduct.shm._portable.codec` says so; anywhere else they pickle as descriptors.
"""

from __future__ import annotations

import copyreg
import importlib
import pickle
from typing import Any, Dict, List, Optional, Tuple

from . import _core, shm
from .shm import _portable
from .shm.mixin import SharedFieldsMixin

_dumps = pickle.dumps
_loads = pickle.loads
_PickleBuffer = pickle.PickleBuffer
_encode_state = _core.encode_state
_decode_state = _core.decode_state
#: The first byte of a body in the compact form (a pickle's is 0x80).
COMPACT_BODY = _core.COMPACT_BODY
COMPACT_PREFIX = bytes([COMPACT_BODY])

#: wire key -> class
_classes: Dict[Tuple[str, str], type] = {}


#: ``__getstate__``/``__setstate__`` that leave a class plain: the default ones, and the mixin's,
#: which only matter to pickles made outside the flow.
_STATE_GETTERS = (object.__getstate__, SharedFieldsMixin.__getstate__)
_STATE_SETTERS = (None, SharedFieldsMixin.__setstate__)
#: Kinds of shared values whose field travels as a marker and is rebuilt from the shared memory.
_MARKED_KINDS = frozenset({'bytes', 'bytearray'})


class _WireKeys(dict):
    """class -> its wire key ``(module, qualname)``, or None when it needs full pickling; worked
    out once per class (``_wire_keys[cls]``: no call per task)."""

    def __missing__(self, cls: type):
        plain = (
            cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ in _STATE_GETTERS
            and getattr(cls, '__setstate__', None) in _STATE_SETTERS
            and '__slots__' not in cls.__dict__
            and all('__slots__' not in base.__dict__ for base in cls.__mro__[1:-1])
            and cls not in copyreg.dispatch_table
            and '<locals>' not in cls.__qualname__
        )
        key = self[cls] = (cls.__module__, cls.__qualname__) if plain else None
        if key is not None:
            _classes.setdefault(key, cls)
        return key


_wire_keys = _WireKeys()


class _OutOfBandBytes:
    """Pickles a large ``bytes`` value as an out-of-band buffer."""

    __slots__ = ('value',)

    def __init__(self, value: bytes):
        self.value = value

    def __reduce_ex__(self, protocol):
        return (bytes, (_PickleBuffer(self.value),))


class FromShared:
    """Stands in a pickled state for a shared ``bytes``/``bytearray`` field,
    whose value the receiver rebuilds from the field's shared memory (see ``task.py``)."""

    __slots__ = ()

    def __reduce__(self):
        return (_from_shared, ())


FROM_SHARED = FromShared()


def _from_shared() -> FromShared:
    return FROM_SHARED


def _state_for_wire(state: dict, big: int) -> dict:
    """The state to pickle: shared non-array fields replaced by markers, large ``bytes``
    wrapped to go out of band. Returns ``state`` itself when nothing needs replacing."""
    shared = state.get('_shared_fields')
    for value in state.values():
        if value.__class__ is bytes and len(value) >= big:
            break
    else:
        if not shared:
            return state
    out = None
    for name, value in state.items():
        if value.__class__ is bytes and len(value) >= big:
            if out is None:
                out = dict(state)
            out[name] = _OutOfBandBytes(value)
    if shared:
        for name, sv in shared.items():
            if getattr(sv, 'kind', None) in _MARKED_KINDS and name in state:
                if out is None:
                    out = dict(state)
                out[name] = FROM_SHARED
    return state if out is None else out


def _buffer_placer(pool: Any, big: int, bufs: List[Any]):
    """The pickler's ``buffer_callback``: large buffers go to the pool, into ``bufs``."""

    def place(pb: pickle.PickleBuffer) -> bool:
        nonlocal pool
        raw = pb.raw()
        if pool is None:
            pool = shm.pool()
        # Memory already in the pool (a shared field, an array received from another step)
        # always travels by reference; other buffers only from the threshold up.
        buf = pool.locate(raw)
        if buf is None:
            if raw.nbytes < big:
                return True
            buf = pool.alloc(raw.nbytes)
            memoryview(buf)[:] = raw
        bufs.append(buf)
        return False

    return place


def encode(task: Any, pool: Any = None) -> Tuple[bytes, List[Any]]:
    """The pickled task and its out-of-band buffers (``ShmBuffer``s in ``pool``, default the
    process's, each owning a reference that passes to the message when it is sent)."""
    big = shm._threshold
    key = _wire_keys[type(task)]
    if key is not None:
        body = _encode_state(key[0], key[1], task.__dict__, big)
        if body is not None:
            return body, []
    bufs: List[Any] = []
    place = _buffer_placer(pool, big, bufs)

    if key is not None:
        state = _state_for_wire(task.__dict__, big)
        if not state.get('_shared_fields'):
            return _dumps((key[0], key[1], state), 5, buffer_callback=place), bufs
    # Shared values in there: they must pickle as out-of-band buffers (see `_portable`).
    wire = _portable.codec
    previous = getattr(wire, 'on', False)
    wire.on = True
    try:
        if key is None:
            return _dumps(task, 5, buffer_callback=place), bufs
        return _dumps((key[0], key[1], state), 5, buffer_callback=place), bufs
    finally:
        wire.on = previous


def encode_value(value: Any) -> Tuple[bytes, List[Any]]:
    """A partial result of a stream: any picklable value, its large buffers (numpy arrays) in
    the pool as a task's are. Wrapped in a list, so that no value reads as a task's state."""
    bufs: List[Any] = []
    return _dumps([value], 5, buffer_callback=_buffer_placer(None, shm._threshold, bufs)), bufs


def decode_value(data: bytes, bufs: Optional[List[Any]] = None) -> Any:
    """The value :func:`encode_value` wrote; for a part of an ``aqueduct.http.Request`` (written
    in the compact form by ``Request._part_state``), the chunk the HTTP front would send."""
    # `data` is bytes, or a view on the pool (`ShmBuffer`) for a large part.
    if memoryview(data)[:1] == COMPACT_PREFIX:
        from .http import _joined

        return _joined(_decode_state(bytes(data))[2]['reply_body'])
    return _loads(data, buffers=bufs)[0]


class _HttpClasses(dict):
    """class -> whether its tasks are HTTP requests (``aqueduct.http.Request``), whose parts and
    final state are written in the form the HTTP front reads (``_part_state``,
    ``_final_state``) rather than pickled. Worked out once per class."""

    def __missing__(self, cls: type) -> bool:
        from .http import Request

        found = self[cls] = issubclass(cls, Request)
        return found


http_classes = _HttpClasses()


def _resolve(module: str, qualname: str) -> type[object]:
    cls = _classes.get((module, qualname))
    if cls is None:
        obj: Any = importlib.import_module(module)
        for part in qualname.split('.'):
            obj = getattr(obj, part)
        cls = _classes.setdefault((module, qualname), obj)
    return cls


def decode(data, bufs: Optional[List[Any]] = None) -> Any:
    """The task object carried by ``data`` and its buffers (a new instance). ``data`` may be
    a compact body already decoded, ``(module, qualname, state)``: workers decode large ones
    as they receive them (``_core.Worker.recv``)."""
    if data.__class__ is tuple:
        module, qualname, state = data
        cls = _resolve(module, qualname)
        task = cls.__new__(cls)
        task.__dict__ = state
        return task
    if data and data[0] == COMPACT_BODY:
        module, qualname, state = _decode_state(data)
        cls = _resolve(module, qualname)
        task = cls.__new__(cls)
        task.__dict__ = state
        return task
    obj = _loads(data, buffers=bufs)
    if obj.__class__ is tuple:
        module, qualname, state = obj
        cls = _resolve(module, qualname)
        task = cls.__new__(cls)
        task.__dict__.update(state)
        shared = state.get('_shared_fields')
        if shared:
            for name, sv in shared.items():
                if state.get(name) is FROM_SHARED:
                    task.__dict__[name] = sv.value(received=True)
        return task
    return obj


def decode_state(data, bufs: Optional[List[Any]] = None) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """``(task, None)`` or ``(None, state)``: the caller updates its own task from the state
    (markers included) without building a second object."""
    if data and data[0] == COMPACT_BODY:
        return None, _decode_state(data)[2]
    obj = _loads(data, buffers=bufs)
    if obj.__class__ is tuple:
        return None, obj[2]
    return obj, None
