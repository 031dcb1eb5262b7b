"""The wire form of tasks: plain tasks travel as their state, others are pickled whole."""

from __future__ import annotations

import pickle

import pytest
from aqueduct import BaseTask
from aqueduct._codec import decode, decode_state, encode

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
    assert pickle.loads(data)[:2] == (Task.__module__, 'Task')
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
