"""The wire form of tasks: plain tasks travel as their state (in the engine's compact form when
every value is a plain one, pickled otherwise), others are pickled whole."""

from __future__ import annotations

import enum
import math
import pickle
import struct
import subprocess
import sys

import pytest
from aqueduct import BaseTask, _core, shm
from aqueduct._codec import COMPACT_BODY, decode, decode_state, encode
from aqueduct.flow import apply_result
from aqueduct.task import BASE_FIELDS
from hypothesis import given, settings
from hypothesis import strategies as st

from .handlers import Task


class WithGetState(BaseTask):
    def __init__(self):
        super().__init__()
        self.secret = 'drop me'
        self.kept = 1

    def __getstate__(self):
        state = self.__dict__.copy()
        del state['secret']
        return state


class Slotted(BaseTask):
    __slots__ = ('extra',)


class Outer:
    class Nested(BaseTask):
        pass


def test_a_plain_task_travels_as_its_state():
    task = Task(5, label='x')
    data, bufs = encode(task)
    assert bufs == []
    assert data[0] == COMPACT_BODY, 'plain values take the compact form'
    assert _core.decode_state(data)[:2] == (Task.__module__, 'Task')
    copy = decode(data, bufs)
    assert type(copy) is Task and copy.__dict__ == task.__dict__ and copy is not task
    done, state = decode_state(data, bufs)
    assert done is None and state == task.__dict__


def test_custom_pickling_is_respected():
    task = WithGetState()
    copy = decode(*encode(task))
    assert type(copy) is WithGetState
    assert not hasattr(copy, 'secret') and copy.kept == 1
    done, state = decode_state(*encode(task))
    assert state is None and done.kept == 1


def test_slots_and_nested_classes():
    s = Slotted()
    s.extra = 3
    assert decode(*encode(s)).extra == 3
    n = Outer.Nested()
    assert type(decode(*encode(n))) is Outer.Nested


def test_an_unpicklable_task_fails_with_pickling_error():
    task = Task(1)
    task.handle = open  # builtins pickle by reference; a lambda does not
    assert decode(*encode(task)).handle is open
    task.fn = lambda: 1
    with pytest.raises((pickle.PicklingError, AttributeError)):
        encode(task)


class Level(enum.IntEnum):
    LOW = 1


class Name(str):
    pass


def _same(a, b) -> bool:
    """Equal, of exactly the same types all the way down (``nan`` equal to itself)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):  # bit for bit: -0.0 is not 0.0, and nan is nan
        return struct.pack('<d', a) == struct.pack('<d', b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


PLAIN_VALUES = [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 0.0, -0.0, math.inf, -math.inf, math.nan, 1e-300,
    '', 'ascii', 'ünïcødé ✓ 🐍', b'', b'\x00\xff' * 10, (), (1, 'a', None), [], [1, [2, [3]]],
    {}, {'k': 1, 2: 'two', (1, 2): [3], None: 0.5, b'b': True},
]


@pytest.mark.parametrize('value', PLAIN_VALUES, ids=repr)
def test_plain_values_take_the_compact_form_and_come_back_the_same(value):
    task = Task(1, value=value)
    data, bufs = encode(task)
    assert data[0] == COMPACT_BODY and bufs == []
    assert _same(decode(data).value, value)
    assert _same(decode_state(data)[1]['value'], value)


NOT_PLAIN = {
    'a big int': 2**64,
    'an int subclass': Level.LOW,
    'a str subclass': Name('x'),
    'a lone surrogate': '\udcff',
    'a set': {1, 2},
    'an object': Outer(),
    'bytes from the threshold up': b'x' * (1 << 20),
    'nesting past 32': __import__('functools').reduce(lambda inner, _: [inner], range(40), 1),
}


@pytest.mark.parametrize('value', NOT_PLAIN.values(), ids=NOT_PLAIN.keys())
def test_other_values_are_pickled_and_keep_their_type(value):
    task = Task(1, value=value)
    data, bufs = encode(task)
    assert data[0] != COMPACT_BODY
    back = decode(data, bufs).value
    assert type(back) is type(value)
    if not isinstance(value, Outer):
        assert back == value


def test_a_container_reached_twice_or_a_cycle_is_pickled_to_keep_identity():
    shared = [1, 2]
    task = Task(1, a=shared, b={'again': shared})
    data, bufs = encode(task)
    assert data[0] != COMPACT_BODY
    back = decode(data, bufs)
    assert back.a is back.b['again']
    loop: list = []
    loop.append(loop)
    back = decode(*encode(Task(1, loop=loop))).loop
    assert back[0] is back


def test_a_task_with_a_non_string_attribute_name_is_pickled():
    task = Task(1)
    task.__dict__[1] = 'odd'
    data, bufs = encode(task)
    assert data[0] != COMPACT_BODY and decode(data, bufs).__dict__[1] == 'odd'


_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(max_size=64)
_keys = st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.tuples(st.integers(), st.text(max_size=4))
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=10), _values, max_size=6))
def test_any_state_comes_back_as_pickle_would_bring_it(fields):
    task = Task(1)
    task.__dict__.update(fields)
    data, bufs = encode(task)
    copy = decode(data, bufs)
    expected = pickle.loads(pickle.dumps(task.__dict__))
    assert _same(copy.__dict__, expected)


def _body(*parts: bytes) -> bytes:
    return bytes([COMPACT_BODY]) + b''.join(parts)


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack('<I', len(raw)) + raw


def _n(n: int) -> bytes:
    return struct.pack('<I', n)


def _one(value: bytes) -> bytes:
    """A body of one field, ``a``, with the given encoded value."""
    return _body(_s('m'), _s('Q'), _n(1), _s('a'), value)


INT, STR, LIST, DICT = b'\x03', b'\x05', b'\x08', b'\x09'
VALID = _body(_s('m'), _s('Q'), _n(2), _s('a'), INT + struct.pack('<q', 7), _s('b'), LIST + _n(1) + b'\x00')


def test_the_handwritten_body_decodes():
    assert _core.decode_state(VALID) == ('m', 'Q', {'a': 7, 'b': [None]})


MALFORMED = {
    'empty': b'',
    'a pickle': pickle.dumps({}),
    'an unknown tag': _one(b'\x63'),
    'invalid UTF-8': _body(_s('m'), _s('Q'), _n(1), _n(1) + b'\xff', b'\x00'),
    'a count past the end': _body(_s('m'), _s('Q'), _n(2**32 - 1)),
    'a list count past the end': _one(LIST + _n(2**31)),
    'a string length past the end': _one(STR + _n(2**32 - 1)),
    'bytes after the state': VALID + b'\x00',
    'an unhashable key': _one(DICT + _n(1) + LIST + _n(0) + b'\x00'),
    'nesting past 32': _one((LIST + _n(1)) * 40 + b'\x00'),
}


@pytest.mark.parametrize('body', MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_body_is_a_value_error(body):
    with pytest.raises(ValueError, match='malformed task body'):
        _core.decode_state(body)
    target = {'kept': 1}
    with pytest.raises(ValueError, match='malformed task body'):
        _core.decode_into(body, target, BASE_FIELDS)
    assert target == {'kept': 1}


def test_every_truncation_of_a_body_is_a_value_error_and_writes_nothing():
    data, _ = encode(Task(3, items=[1, 'two', {'three': (3.0, b'3')}], flag=True))
    for end in range(len(data)):
        target = {'kept': 1}
        with pytest.raises(ValueError, match='malformed task body'):
            _core.decode_into(data[:end], target, BASE_FIELDS)
        assert target == {'kept': 1}, f'a body cut at byte {end} wrote {target}'


def test_a_result_updates_the_callers_task_but_not_its_bookkeeping_fields():
    task = Task(1)
    done = Task(1)
    done.result, done.priority, done.extra = 2, 5, [1]
    apply_result(task, encode(done))
    assert (task.result, task.extra, task.priority) == (2, [1], 0)
    assert task.task_id != done.task_id


class CustomUpdate(BaseTask):
    """Overrides ``update``, as a 1.15 user may, to keep a field out of the results."""

    def __init__(self):
        super().__init__()
        self.result = None
        self.keep = 'mine'

    def update(self, source_task, excluded_fields=None):
        super().update(source_task, {'keep'})


def test_a_class_that_overrides_update_gets_its_results_through_it():
    task, done = CustomUpdate(), CustomUpdate()
    done.result, done.keep = 42, 'theirs'
    apply_result(task, encode(done))
    assert (task.result, task.keep) == (42, 'mine')


def test_bytes_at_the_threshold_travel_out_of_band():
    big = shm.threshold()
    data, bufs = encode(Task(1, blob=b'x' * (big - 1)))
    assert data[0] == COMPACT_BODY and bufs == []
    data, bufs = encode(Task(1, blob=b'x' * big))
    assert data[0] != COMPACT_BODY
    assert decode(data, bufs).blob == b'x' * big


def test_an_object_reached_twice_keeps_its_identity_and_the_body_stays_small():
    # Each level refers twice to the one below: written out in full it would double per level.
    nested: tuple = ()
    for _ in range(20):
        nested = (nested, nested)
    long_text = 'x' * 60_000
    for fields in ({'nested': nested}, {'texts': [long_text] * 1000}, {'blob': (b'y' * 1000, b'y' * 1000)}):
        task = Task(1, **fields)
        data, bufs = encode(task)
        assert len(data) < 2 * len(pickle.dumps(task.__dict__)) + 200, f'{list(fields)}: {len(data)} bytes'
    back = decode(*encode(Task(1, nested=nested))).nested
    assert back[0] is back[1]
    back = decode(*encode(Task(1, texts=[long_text, long_text]))).texts
    assert back[0] is back[1]


@pytest.mark.timeout(60)
def test_many_containers_encode_in_linear_time():
    # 300k rows: a quadratic check of which containers were seen would take minutes here.
    rows = [[i, i + 1] for i in range(300_000)]
    data, bufs = encode(Task(1, rows=rows))
    assert data[0] == COMPACT_BODY
    assert decode(data, bufs).rows == rows


def test_claimed_counts_do_not_reserve_memory_the_body_does_not_hold():
    # Nested lists each claiming (nearly) the whole body: reserving what they claim would take
    # gigabytes for a 10 MB body. Run apart, to read this process's peak memory alone.
    script = (
        'import resource, struct, sys\n'
        'from aqueduct import _core\n'
        's = lambda t: struct.pack("<I", len(t)) + t\n'
        'size = 10_000_000\n'
        'head = bytes([_core.COMPACT_BODY]) + s(b"m") + s(b"Q") + struct.pack("<I", 1) + s(b"a")\n'
        'body = head + (b"\\x08" + struct.pack("<I", size // 2)) * 32 + b"\\x63" * size\n'
        'before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n'
        'try:\n'
        '    _core.decode_state(body)\n'
        'except ValueError as exc:\n'
        '    print(exc)\n'
        'print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n'
    )
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=60, check=True)
    error, grown_mb = out.stdout.splitlines()
    assert 'malformed task body' in error
    assert int(grown_mb) < 100, f'decoding a 10 MB body grew the process by {grown_mb} MB'


def test_decoded_attribute_names_are_not_interned():
    # On Python 3.12 an interned string lives for ever: names from a stream of bodies must not be.
    known = sys.intern('zq_' + 'never_seen_name')
    body = _core.encode_state('m', 'Q', {'zq_never_seen_name': 1}, 1 << 20)
    (name,) = _core.decode_state(body)[2]
    assert name == known and name is not known
