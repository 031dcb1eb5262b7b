"""The image-classification pipeline of the other examples as a model server: the engine's own
HTTP front (:mod:`aqueduct.http`) parses and answers HTTP in Rust threads, and the handlers, in
worker processes, are all the Python there is.

    POST /classify   body: a .npy image (H x W x 3 uint8)  ->  {"top5": [[class, probability], ...]}
                     anything else -> 400 {"error": ...}
    GET  /healthz    200 when the flow is ready and shared memory has room (503 otherwise)
    GET  /metrics    Prometheus

Run it with ``make example-http`` (127.0.0.1:8083), that is::

    python -m aqueduct serve service:build_flow --http 127.0.0.1:8083 --route /classify=0

from this directory; SIGTERM or Ctrl-C drains the requests under way and stops.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aqueduct import Flow, FlowStep  # noqa: E402
from aqueduct.http import Request  # noqa: E402
from pipeline import Classifier, Preprocess  # noqa: E402


class DecodeUpload(Preprocess):
    """Step 1: the upload is the request body; one that is not an image is answered 400 here."""

    def handle(self, *tasks: Request) -> None:
        for task in tasks:
            task.image = task.body
            task.body = b''  # not carried to the next step
            try:
                super().handle(task)
            except ValueError as exc:
                task.status = 400
                task.response = {'error': f'not an H x W x 3 uint8 .npy image: {exc}'}
            task.image = None


class Classify(Classifier):
    """Step 2: the model, on batches of up to 16; its answer is the response."""

    def handle(self, *tasks: Request) -> None:
        super().handle(*tasks)
        for task in tasks:
            task.response = {'top5': task.top5, 'served_by': os.getpid()}


def build_flow() -> Flow:
    return Flow(
        FlowStep(DecodeUpload()),
        # Requests that step 1 already answered (400) leave the flow there.
        FlowStep(Classify(), batch_size=16, batch_timeout=0.002, handle_condition=_decoded),
    )


def _decoded(task: Request) -> bool:
    return task.status == 200
