"""The house's floors: imports only look down (dnnlib -> torch_utils -> training -> metrics ->
refine -> the CLIs). Checked on the source text, imports inside functions included."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = ['dnnlib', 'torch_utils', 'training', 'metrics', 'refine']
CLIS = ['refine.py', 'generate.py', 'fid.py', 'train.py', 'dataset_tool.py', 'demo.py']

def imported_tops(path):
    """Top-level names of every module a file imports (absolute imports)."""
    tree = ast.parse(open(path, encoding='utf-8').read(), filename=path)
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split('.')[0])
    return tops

def package_files(package):
    for folder, _dirs, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith('.py'):
                yield os.path.join(folder, name)

@pytest.mark.parametrize('floor', FLOORS)
def test_imports_only_look_down(floor):
    # refine.py shares its name with the refine package: within refine/ that name is the floor itself.
    above = (set(FLOORS[FLOORS.index(floor) + 1:]) | {os.path.splitext(c)[0] for c in CLIS} | {'bench', 'tests'}) - {floor}
    bad = {os.path.relpath(path, ROOT): sorted(imported_tops(path) & above) for path in package_files(floor)}
    assert not {path: names for path, names in bad.items() if names}

def test_the_check_can_fail(tmp_path):
    path = tmp_path / 'upward.py'
    path.write_text('def f():\n    from refine import loop\n')
    assert 'refine' in imported_tops(path)

def test_every_floor_is_a_package_the_wheel_ships():
    # setup.cfg's `packages = find:` skips folders without __init__.py: `import training` from an
    # installed toolkit would fail (and NVlabs pickles name training.* modules).
    import setuptools # pylint: disable=import-outside-toplevel
    found = setuptools.find_packages(ROOT, include=[f'{f}*' for f in FLOORS])
    assert set(FLOORS) <= set(found), found
