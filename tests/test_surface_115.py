"""Every public module and name of aqueduct 1.15 imports from ours.

The list is not written by hand: it is read from 1.15's own source distribution (fetched from
PyPI by ``make setup`` into ``.venv/reference/``), so a name 1.15 has and we lack fails here.
Public means: a module of the package, and in it every top-level class, function and assigned
name not starting with ``_`` (plus what a package's ``__init__`` imports), and the public
methods of each class. Where a name is an internal of 1.15's engine it may be an object that
raises a clear error when used (``docs/migrating.md`` says which); it must still import.
"""

from __future__ import annotations

import ast
import importlib
import os
import tarfile
from pathlib import Path

import pytest

_DEFAULT_REFERENCE = Path(__file__).parent.parent / '.venv' / 'reference' / 'aqueduct-1.15.0.tar.gz'
REFERENCE = Path(os.environ.get('AQUEDUCT_115_SDIST', _DEFAULT_REFERENCE))


def _public_surface(sdist: Path) -> dict[str, dict[str, list[str]]]:
    """module -> {name: [public members if a class]} of the package in ``sdist``."""
    surface: dict[str, dict[str, list[str]]] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split('/')
            if len(parts) < 3 or parts[1] != 'aqueduct' or not member.name.endswith('.py'):
                continue
            module = '.'.join(parts[1:])[: -len('.py')].removesuffix('.__init__')
            is_package = parts[-1] == '__init__.py'
            tree = ast.parse(tar.extractfile(member).read())
            names: dict[str, list[str]] = {}
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    names[node.name] = sorted(
                        item.name
                        for item in node.body
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith('_')
                    )
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names[node.name] = []
                elif isinstance(node, ast.Assign):
                    names.update((t.id, []) for t in node.targets if isinstance(t, ast.Name))
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names[node.target.id] = []
                elif isinstance(node, ast.ImportFrom) and is_package:
                    names.update((a.asname or a.name, []) for a in node.names if a.name != '*')
            surface[module] = {n: m for n, m in names.items() if not n.startswith('_')}
    return surface


@pytest.fixture(scope='module')
def surface() -> dict[str, dict[str, list[str]]]:
    assert REFERENCE.exists(), f'{REFERENCE} is missing: `make setup` downloads aqueduct 1.15.0 from PyPI'
    found = _public_surface(REFERENCE)
    assert len(found) > 30 and 'aqueduct.flow' in found, 'the reference looks like aqueduct 1.15'
    return found


def test_every_public_module_and_name_of_1_15_imports(surface):
    missing = []
    for module, names in sorted(surface.items()):
        try:
            ours = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f'module {module}: {exc}')
            continue
        for name, members in sorted(names.items()):
            if not hasattr(ours, name):
                missing.append(f'{module}.{name}')
                continue
            obj = getattr(ours, name)
            if isinstance(obj, type):
                missing += [f'{module}.{name}.{m}' for m in members if not hasattr(obj, m)]
    assert not missing, f'{len(missing)} public names of aqueduct 1.15 are missing:\n' + '\n'.join(missing)
