"""The ``aqueduct`` logger.

As in aqueduct 1.15: a logger named ``aqueduct`` that writes to stderr with the pid in each line,
and :func:`replace_logger` to route everything into an application's own logger.
"""

import logging
import sys

LOGGER_NAME = 'aqueduct'

log = logging.getLogger(LOGGER_NAME)
log.setLevel(logging.DEBUG)
#: The format of every line, and the stderr handler that writes them (1.15's names: code that
#: reformats or removes aqueduct's own handler refers to them).
formatter = logging.Formatter('[%(asctime)s] %(levelname)s [Flow] [pid:%(process)d] %(message)s')
ch = logging.StreamHandler(sys.stderr)
ch.setFormatter(formatter)
log.addHandler(ch)


def replace_logger(logger: logging.Logger) -> None:
    """Makes ``aqueduct.logger.log`` behave as ``logger``: same name, level, handlers, parent."""
    log.name = logger.name
    log.level = logger.level
    log.parent = logger.parent
    log.propagate = logger.propagate
    log.handlers = logger.handlers
    log.disabled = logger.disabled
