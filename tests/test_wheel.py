"""The built wheel installs and runs where there is no Rust toolchain.

``make test`` passes the wheel it built (``AQUEDUCT_WHEEL``); without one the test is skipped.
It makes a fresh virtualenv from this interpreter, installs the wheel with no index (it needs
nothing else) and with no ``cargo`` or ``rustc`` on PATH, and runs there, outside the repository,
the example of the Fundamentals page: the copy in ``test_seed_examples.py``, and the page itself
when it is found (``AQUEDUCT_SEED``, else ``../shared/seed/fundamentals.rst`` beside the repo).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEEL = os.environ.get('AQUEDUCT_WHEEL')
RUST_TOOLS = ('cargo', 'rustc', 'rustup')

pytestmark = pytest.mark.skipif(not WHEEL, reason='no wheel given: `make test` builds one and sets AQUEDUCT_WHEEL')


def run(args: List[str], env: Dict[str, str], cwd: Path, timeout: float) -> str:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{args} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}'
    return proc.stdout


def without_rust(venv: Path) -> Dict[str, str]:
    """This environment with the venv's bin first on PATH, and no directory that holds a Rust
    tool (``~/.cargo/bin``, or wherever ``cargo`` is), nor any Rust or virtualenv variable."""
    dirs = [d for d in os.environ.get('PATH', '').split(os.pathsep) if d]
    cargo_bin = os.path.join(os.path.expanduser('~'), '.cargo', 'bin')
    kept = [
        d
        for d in dirs
        if os.path.abspath(d) != cargo_bin and not any(shutil.which(tool, path=d) for tool in RUST_TOOLS)
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(('CARGO', 'RUSTUP', 'RUSTC', 'RUST_', 'PYTHON', 'PIP_', 'MATURIN'))
        and k not in ('VIRTUAL_ENV', 'AQUEDUCT_WHEEL')
    }
    env['PATH'] = os.pathsep.join([str(venv / 'bin'), *kept])
    env['PIP_NO_INDEX'] = '1'  # nothing comes from the network: the wheel has no dependencies
    env['PIP_DISABLE_PIP_VERSION_CHECK'] = '1'
    return env


def seed_page() -> Optional[Path]:
    given = os.environ.get('AQUEDUCT_SEED')
    if given:
        return Path(given)
    page = REPO.parent / 'shared' / 'seed' / 'fundamentals.rst'
    return page if page.is_file() else None


def code_blocks(rst: str) -> List[str]:
    """The bodies of the page's ``.. code-block:: python`` directives, dedented."""
    blocks = []
    for match in re.finditer(r'^\.\. code-block:: python\n((?:\n|[ \t]+.*\n)+)', rst, re.MULTILINE):
        blocks.append(textwrap.dedent(match.group(1)).strip('\n') + '\n')
    return blocks


def seed_module(rst: str) -> str:
    """A module made of the page's task and handler examples as printed (the page leaves
    ``MyModel`` to the reader, and annotates ``handle`` with its prose name ``Task``)."""
    blocks = code_blocks(rst)
    task = [b for b in blocks if 'class MyTask(BaseTask)' in b and 'number: int' in b]
    handler = [b for b in blocks if 'class SumHandler(BaseTaskHandler)' in b]
    assert task and handler, 'the Fundamentals page no longer has its MyTask and SumHandler examples'
    header = textwrap.dedent(
        '''\
        from __future__ import annotations

        from typing import Optional

        from aqueduct import BaseTask, BaseTaskHandler


        class MyModel:
            def process(self, number):
                return number * 10

        '''
    )
    return header + '\n' + task[0] + '\n\n' + handler[0]


DRIVER = '''\
import asyncio
import sys

import aqueduct
from aqueduct import Flow, FlowStep

import {module} as example


async def main(method):
    flow = Flow(FlowStep(example.SumHandler(), nprocs=2, batch_size=4), mp_start_method=method)
    flow.start(timeout=60)
    try:
        tasks = [example.MyTask(i) for i in range(20)]
        await asyncio.gather(*(flow.process(task) for task in tasks))
        assert [task.result for task in tasks] == [i * 10 for i in range(20)], [t.result for t in tasks]
    finally:
        await flow.stop()


if __name__ == '__main__':
    assert 'site-packages' in aqueduct.__file__, aqueduct.__file__
    for method in ('fork', 'spawn'):
        asyncio.run(main(method))
        print('{module}', method, 'ok')
'''


@pytest.mark.timeout(300)
def test_the_wheel_installs_without_rust_and_runs_the_fundamentals_example(tmp_path):
    wheel = Path(WHEEL).resolve()
    assert wheel.is_file(), wheel
    venv = tmp_path / 'venv'
    run([sys.executable, '-m', 'venv', str(venv)], dict(os.environ), tmp_path, timeout=120)
    env = without_rust(venv)
    python = str(venv / 'bin' / 'python')

    # Nothing Rust is reachable from inside the new environment.
    found = run([python, '-c', f'import shutil; print([shutil.which(t) for t in {RUST_TOOLS!r}])'], env, tmp_path, 30)
    assert found.strip() == str([None] * len(RUST_TOOLS)), found

    run([python, '-m', 'pip', 'install', '--no-index', '--only-binary', ':all:', str(wheel)], env, tmp_path, 120)
    info = run([python, '-m', 'pip', 'show', '-f', 'aqueduct-rs'], env, tmp_path, 60)
    assert '_core.abi3.so' in info, info

    app = tmp_path / 'app'  # outside the repository: only the installed package can be imported
    app.mkdir()
    shutil.copy(HERE / 'test_seed_examples.py', app / 'seed_copy.py')
    modules = ['seed_copy']
    page = seed_page()
    if page is not None:
        (app / 'seed_page.py').write_text(seed_module(page.read_text()))
        modules.append('seed_page')
    for module in modules:
        (app / f'run_{module}.py').write_text(DRIVER.format(module=module))
        out = run([python, f'run_{module}.py'], env, app, timeout=120)
        assert out.split('\n')[:2] == [f'{module} fork ok', f'{module} spawn ok'], out
