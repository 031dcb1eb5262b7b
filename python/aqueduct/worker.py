"""aqueduct 1.15's ``aqueduct.worker``: its ``Worker`` read tasks from multiprocessing queues,
batched them and put the results on the next step's queue. Here the engine (Rust, in the main
process) batches and routes, and each worker process runs :mod:`aqueduct._worker`'s loop over
shared-memory rings, so ``Worker`` can be imported but not used.
"""

from ._compat import removed_class

#: 1.15's bound on re-reading a queue that falsely reported itself empty; the rings here have no
#: such false emptiness.
MAX_SPIN_ITERATIONS = 1000

Worker = removed_class(
    __name__,
    'Worker',
    'the engine batches and routes tasks itself; configure batching with FlowStep(batch_size=, batch_timeout=) '
    'and routing with FlowStep(handle_condition=)',
    methods=('loop',),
)

__all__ = ['MAX_SPIN_ITERATIONS', 'Worker']
