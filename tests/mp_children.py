"""Targets of the ``multiprocessing`` children in ``test_shm_pickle.py`` (importable by name, so
that ``spawn`` children can run them)."""

from __future__ import annotations


def write_first_element(q_in, q_out) -> None:
    """Gets a task, sets ``task.arr[0]`` in place, reports what it got, then sends the task back."""
    task = q_in.get()
    task.arr[0] = 7
    q_out.put((type(task).__name__, sorted(task._shared_fields)))
    q_in.get()  # the parent checked the change
    q_out.put(task)
    q_in.get()  # the parent checked the task that came back
    del task


def write_shared_array(q_in, q_out) -> None:
    """Gets an ``NPArraySharedData`` and a value, writes the value in place."""
    shared, value = q_in.get()
    shared.get_data()[0] = value
    q_out.put(None)
    q_in.get()
    del shared


def send_back_and_return(q_in, q_out) -> None:
    """Gets a task, changes it in place, puts it back and returns as soon as it is sent.

    ``Queue.put`` only hands the object to a feeder thread, which pickles it later; the child
    waits for that (``close`` + ``join_thread``) before it returns, since the exit hooks that
    release what it holds in the pool may otherwise run before the task is pickled (see
    docs/migrating.md)."""
    task = q_in.get()
    task.arr[4] = 3
    q_out.put(task)
    q_out.close()
    q_out.join_thread()
