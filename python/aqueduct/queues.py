"""aqueduct 1.15's ``aqueduct.queues``: the multiprocessing queue of each step, and the choice of
the next one by ``handle_condition``. Here the engine's queues live in shared memory and a
worker routes each result itself (the first later step whose ``handle_condition`` takes it), so
these names can be imported but not used.
"""

from ._compat import removed_class, removed_function

_ROUTING = (
    'queues are the engine\'s own; a task goes to the first later step whose FlowStep(handle_condition=) '
    'is true, else back to the caller'
)

FlowStepQueue = removed_class(__name__, 'FlowStepQueue', _ROUTING)
select_next_queue = removed_function(__name__, 'select_next_queue', _ROUTING)

__all__ = ['FlowStepQueue', 'select_next_queue']
