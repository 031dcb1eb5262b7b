"""What the web integrations share: the start timeout, stopping with the flows, ``/healthz``, and
the policy for untrusted request bodies (how large, how slow, what each refusal answers).

Both integrations read a request body through :func:`share_request_body` (the limits) and answer
its errors with :func:`http_error` (the status codes), so aiohttp and FastAPI services refuse the
same things the same way. ``docs/security.md`` describes the policy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import traceback
from typing import Any, Dict, List, Optional, Tuple, Union

from .. import shm
from ..exceptions import (
    LengthRequiredError,
    PayloadLengthError,
    PayloadTimeoutError,
    PayloadTooLargeError,
    SharedMemoryExhaustedError,
)
from ..logger import log
from ..task import DEFAULT_MAX_PAYLOAD, BaseTask, HasReadany

FLOW_START_TIMEOUT_NAME = 'FLOW_START_TIMEOUT'
FLOW_START_TIMEOUT_DEFAULT = 300.0

#: The errors of reading an untrusted body or placing a payload that :func:`http_error` answers.
PAYLOAD_ERRORS = (PayloadTooLargeError, PayloadLengthError, PayloadTimeoutError, SharedMemoryExhaustedError)
#: The body size limit where the framework has none of its own (FastAPI, Starlette): aiohttp's
#: default ``client_max_size``, 1 MiB.
MAX_BODY_SIZE_DEFAULT = DEFAULT_MAX_PAYLOAD
#: Seconds a request body may take to arrive whole once its headers are in: a client that
#: trickles its body holds its shared memory no longer than this.
BODY_TIMEOUT_DEFAULT = 60.0
#: ``/healthz`` answers 503 (not ready) once this share of the shared-memory pool is in use:
#: a balancer then sends new requests elsewhere before they start failing with 503 one by one.
SHM_NOT_READY_RATIO = 0.9
#: The ``Retry-After`` (seconds) of a 503 for a full pool: in-flight tasks free their memory as
#: they finish, and stalled uploads within ``BODY_TIMEOUT_DEFAULT``.
RETRY_AFTER_SECONDS = 5


def get_start_timeout() -> Optional[float]:
    """``FLOW_START_TIMEOUT`` seconds (default 300); ``<= 0`` means no timeout."""
    try:
        timeout = float(os.environ.get(FLOW_START_TIMEOUT_NAME, FLOW_START_TIMEOUT_DEFAULT))
    except ValueError:
        timeout = FLOW_START_TIMEOUT_DEFAULT
    return None if timeout <= 0 else timeout


async def exit_when_stopped(flows: dict) -> None:
    """Stops this server process (SIGTERM) once any flow has stopped for good: a service whose
    pipeline is gone must not keep accepting requests."""
    waits = {asyncio.ensure_future(flow.wait_stopped()): name for name, flow in flows.items()}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    name = waits[next(iter(done))]
    log.error('Flow %s is not running, application will be stopped', name)
    os.kill(os.getpid(), signal.SIGTERM)


def health_payload(flows: dict) -> tuple:
    """``(status, body)`` for a ``/healthz`` route: 200 when every flow is ready and the
    shared-memory pool is less than ``SHM_NOT_READY_RATIO`` full, else 503. The body has each
    flow's ``health()`` under its name, and the pool's figures under ``shared_memory``."""
    report: Dict[str, Any] = {name: flow.health() for name, flow in flows.items()}
    pool = shm.pressure()
    pool['ready'] = pool['ratio'] < SHM_NOT_READY_RATIO
    pool['not_ready_ratio'] = SHM_NOT_READY_RATIO
    ready = pool['ready'] and all(r['ready'] for r in report.values())
    report['shared_memory'] = pool
    return (200 if ready else 503), report


def body_size_limit(client_max_size: Optional[int]) -> Optional[int]:
    """The limit on a request body: the app's own (aiohttp's ``client_max_size``, where ``0``
    means none, as aiohttp reads it), else :data:`MAX_BODY_SIZE_DEFAULT`. ``None``: no limit but
    the pool's capacity."""
    if client_max_size is None:
        return MAX_BODY_SIZE_DEFAULT
    return client_max_size or None


async def share_request_body(
    task: BaseTask,
    field_name: str,
    content: HasReadany,
    content_length: Union[int, str, None],
    client_max_size: Optional[int],
    timeout: Optional[float] = BODY_TIMEOUT_DEFAULT,
) -> None:
    """Reads an untrusted request body into shared memory as ``task.<field_name>``: it must
    declare its size (``Content-Length``), at most :func:`body_size_limit`, and arrive whole
    within ``timeout`` seconds. Nothing is reserved for a refused body, and the memory of one that
    fails half-way is freed at once (see ``BaseTask.share_value_with_data``)."""
    if content_length is None or content_length == '':
        raise LengthRequiredError('send the body with a Content-Length')
    try:
        size = int(content_length)
    except ValueError:
        raise PayloadLengthError(f'Content-Length is not a number of bytes: {content_length!r}') from None
    max_size = body_size_limit(client_max_size)
    await task.share_value_with_data(field_name, content, size, max_size=max_size, timeout=timeout)


def http_error(exc: BaseException, status: Optional[int] = None) -> Optional[Tuple[int, str, Dict[str, str]]]:
    """``(status, message, headers)`` to answer for an error of reading a body or placing a
    payload; for another error, ``status`` with the error's text, or ``None`` without one (the
    service decides)."""
    answer = _payload_answer(exc)
    if answer is None and status is not None:
        answer = status, str(exc), {}
    return answer


def drop_frames(exc: BaseException) -> None:
    """Clears the variables of the finished frames ``exc`` (and its causes) went through.

    An error from a flow is often in a reference cycle (a frame that re-raised it holds it), and
    its traceback holds the request handler's frames, hence the task and the task's shared
    memory: a request answered with an error would keep its body in the pool until the cyclic GC
    ran. Cleared, the task goes when the handler returns, as after a success.
    """
    seen = set()
    pending: List[Optional[BaseException]] = [exc]
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        pending += [err.__cause__, err.__context__]


def _payload_answer(exc: BaseException) -> Optional[Tuple[int, str, Dict[str, str]]]:
    if isinstance(exc, LengthRequiredError):
        return 411, str(exc), {}
    if isinstance(exc, PayloadTooLargeError):
        return 413, str(exc), {}
    if isinstance(exc, PayloadTimeoutError):
        return 408, str(exc), {'Connection': 'close'}
    if isinstance(exc, PayloadLengthError):
        return 400, str(exc), {'Connection': 'close'}
    if isinstance(exc, SharedMemoryExhaustedError):
        return 503, 'the service is out of shared memory for payloads; retry later', {
            'Retry-After': str(RETRY_AFTER_SECONDS)
        }
    return None
