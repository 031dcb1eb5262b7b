"""An image-classification-style pipeline shared by the example services.

Step 1 decodes the uploaded image (a ``.npy`` file of an ``H x W x 3`` uint8 array) and
preprocesses it with numpy: average-pools it down to 32 x 32 and normalizes it. Step 2 is the
"model": a fixed random linear layer over the 3,072 features (1,000 classes), run on batches of
up to 16 images, then softmax and top 5. Both steps are real CPU work, of the kind a service
runs around a model.

The module uses only aqueduct's public API, so the same service runs on aqueduct 1.15.
"""

from __future__ import annotations

import io
from typing import List, Optional

import numpy as np
from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep

SIDE = 32
CLASSES = 1000


class ImageTask(BaseTask):
    def __init__(self, image: Optional[bytes] = None):
        super().__init__()
        self.image = image
        self.pixels: Optional[np.ndarray] = None
        self.top5: Optional[List[List[float]]] = None


def decode(image) -> np.ndarray:
    array = np.load(io.BytesIO(bytes(image)), allow_pickle=False)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f'expected an H x W x 3 uint8 image, got {array.dtype} {array.shape}')
    return array


class Preprocess(BaseTaskHandler):
    def handle(self, *tasks: ImageTask) -> None:
        for task in tasks:
            img = decode(task.image)
            h, w = (img.shape[0] // SIDE) * SIDE, (img.shape[1] // SIDE) * SIDE
            pooled = img[:h, :w].reshape(SIDE, h // SIDE, SIDE, w // SIDE, 3).mean(axis=(1, 3))
            task.pixels = ((pooled - 127.5) / 127.5).astype(np.float32).ravel()


class Classifier(BaseTaskHandler):
    def __init__(self) -> None:
        self.weights: Optional[np.ndarray] = None

    def on_start(self) -> None:
        rng = np.random.default_rng(42)
        self.weights = rng.standard_normal((SIDE * SIDE * 3, CLASSES), dtype=np.float32) / 50

    def handle(self, *tasks: ImageTask) -> None:
        batch = np.stack([t.pixels for t in tasks])
        logits = batch @ self.weights
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        best = np.argsort(-probs, axis=1)[:, :5]
        for task, classes, p in zip(tasks, best, probs, strict=True):
            task.top5 = [[int(c), round(float(p[c]), 5)] for c in classes]
            task.pixels = None


def build_flow() -> Flow:
    return Flow(
        FlowStep(Preprocess()),
        FlowStep(Classifier(), batch_size=16, batch_timeout=0.002),
    )


async def run(flow, task: ImageTask, timeout_sec: float = 10.0) -> None:
    """Sends ``task`` through ``flow``: a ``Flow`` (one web process) or a ``SocketFlow`` (a flow
    shared by several web processes), whose ``process`` takes a list as in aqueduct 1.15."""
    if isinstance(flow, Flow):
        await flow.process(task, timeout_sec=timeout_sec)
    else:
        await flow.process([task], timeout_sec=timeout_sec)


def sample_image(height: int = 256, width: int = 256, seed: int = 0) -> bytes:
    """A ``.npy`` upload, as a client would send it."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.save(buf, rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return buf.getvalue()
