"""The ninja build machinery (torch_utils.custom_ops) on a tiny dedicated extension.

A plain CPython module compiles in about a second, so every test can afford its own cache
directory. The compiler is a wrapper script that logs each compile (`-c`) to a file, which is
how "no compiler call" and "built once" are checked.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from torch_utils import custom_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = textwrap.dedent('''\
    #include <Python.h>
    #define CAT_(a, b) a##b
    #define CAT(a, b) CAT_(a, b)
    #define STR_(a) #a
    #define STR(a) STR_(a)
    static PyObject* value(PyObject*, PyObject*) { return PyLong_FromLong(VALUE); }
    static PyMethodDef methods[] = {{"value", value, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), NULL, -1, methods};
    PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
    ''')

# Run in a child: load the tiny op, print JSON with its value (None: fell back) and timing.
CHILD = textwrap.dedent('''\
    import json, sys, time, warnings
    sys.path.insert(0, {root!r})
    from torch_utils import custom_ops
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        t0 = time.perf_counter()
        module = custom_ops.get_plugin('tiny', ['tiny.cpp'], source_dir={src!r})
        seconds = time.perf_counter() - t0
    print(json.dumps(dict(value=module.value() if module else None, seconds=seconds,
                          warnings=[str(w.message) for w in caught if 'custom op' in str(w.message)])))
    ''')


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A source dir with tiny.cpp (VALUE 1), a private cache, and a logging compiler."""
    src = tmp_path / 'src'
    src.mkdir()
    (src / 'tiny.cpp').write_text(TINY.replace('VALUE', '1'))
    log = tmp_path / 'cxx.log'
    cxx = tmp_path / 'cxx'
    cxx.write_text(f'#!/bin/sh\ncase " $* " in *" -c "*) echo "$$" >> {log} ;; esac\nexec c++ "$@"\n')
    cxx.chmod(0o755)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'cache'))
    monkeypatch.setenv('CXX', str(cxx))
    monkeypatch.setenv('DI_CUSTOM_OPS', 'auto')
    monkeypatch.setenv('DI_CUSTOM_OPS_VERBOSITY', 'brief')
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    monkeypatch.setattr(custom_ops, '_loaded', {})
    return dict(src=src, log=log, cache=tmp_path / 'cache', tmp=tmp_path)


def compiles(env):
    return len(env['log'].read_text().split()) if env['log'].exists() else 0


def child(env, extra_env=None):
    script = CHILD.format(root=ROOT, src=str(env['src']))
    return subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, **(extra_env or {})))


def result(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_second_process_loads_the_cache_without_compiling(env):
    first, err = result(child(env))
    assert first['value'] == 1 and compiles(env) == 1 and 'building tiny' in err
    second, err = result(child(env))
    assert second['value'] == 1 and 'building' not in err
    assert compiles(env) == 1, 'the cached module must load without a compiler call'
    assert second['seconds'] < 1.0, second  # A dlopen, not a ninja run (which takes seconds).
    # Nothing but the published module directory is left behind.
    assert sorted(p.name.split('_')[0] for p in env['cache'].iterdir()) == ['tiny']


def test_two_processes_started_together_build_once(env):
    procs = [child(env), child(env)]
    values = [result(p)[0]['value'] for p in procs]
    assert values == [1, 1] and compiles(env) == 1


def test_torchrun_local_rank_0_builds_and_the_others_wait(env):
    rank1 = child(env, dict(LOCAL_RANK='1'))  # Starts first, yet must not build.
    time.sleep(1.0)
    rank0 = child(env, dict(LOCAL_RANK='0'))
    (r1, err1), (r0, err0) = result(rank1), result(rank0)
    assert r1['value'] == r0['value'] == 1 and compiles(env) == 1
    assert 'building' in err0 and 'building' not in err1


def test_stale_lock_of_a_killed_build_is_broken(env, monkeypatch):
    monkeypatch.setenv('DI_CUSTOM_OPS_LOCK_TIMEOUT', '5')
    key = custom_ops.build_key('tiny', [str(env['src'] / 'tiny.cpp')], [], [], [], [], False)
    lock_path = env['cache'] / f'tiny_{key[:12]}.lock'
    env['cache'].mkdir()
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''\
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from torch_utils.custom_ops import FileLock
        FileLock({str(lock_path)!r}).acquire()
        print('locked', flush=True)
        time.sleep(600)
        ''')], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    holder.kill()  # Like a build killed mid-way: the lock file stays.
    holder.wait()
    assert lock_path.exists()
    t0 = time.time()
    module = custom_ops.get_plugin('tiny', ['tiny.cpp'], source_dir=str(env['src']))
    assert module is not None and module.value() == 1
    assert time.time() - t0 < 5 + 30, 'waited past the lock timeout'
    assert not lock_path.exists()


def test_lock_staleness_rules(tmp_path):
    path = str(tmp_path / 'x.lock')
    # Another host's lock: only its age counts.
    with open(path, 'w') as f:
        json.dump(dict(pid=os.getpid(), host='elsewhere', time=0, token='t'), f)
    with pytest.raises(TimeoutError):
        custom_ops.FileLock(path, timeout=30, max_wait=0.3).acquire()  # Fresh: wait, then give up.
    old = time.time() - 60
    os.utime(path, (old, old))
    lock = custom_ops.FileLock(path, timeout=0.4, max_wait=5)
    assert lock.acquire() is False  # Older than the timeout: broken at once.
    assert json.load(open(path))['token'] == lock.token
    # A held lock stays fresh through its heartbeat, however long the build takes.
    lock2 = custom_ops.FileLock(path, timeout=0.4, max_wait=0.0)
    time.sleep(0.8)
    with pytest.raises(TimeoutError):
        lock2.acquire()
    lock.release()
    assert not os.path.exists(path)
    # A live PID on this host: not stale.
    with open(path, 'w') as f:
        json.dump(dict(pid=os.getpid(), host=socket.gethostname(), time=0, token='t'), f)
    assert not custom_ops.FileLock(path, timeout=30).is_stale(json.load(open(path)) | {'mtime': time.time()})


def test_broken_compiler_warns_once_and_falls_back(env, monkeypatch):
    monkeypatch.setenv('CXX', 'false')
    with pytest.warns(RuntimeWarning) as caught:
        assert custom_ops.get_plugin('tiny', ['tiny.cpp'], source_dir=str(env['src'])) is None
        assert custom_ops.get_plugin('tiny', ['tiny.cpp'], source_dir=str(env['src'])) is None
    messages = [str(w.message) for w in caught if 'custom op' in str(w.message)]
    assert len(messages) == 1, messages
    assert 'custom op tiny' in messages[0] and 'compiler does not run' in messages[0]
    log = messages[0].split('log: ')[1].split(';')[0]
    assert os.path.isfile(log)
    monkeypatch.setenv('CXX', 'no-such-compiler')
    with pytest.warns(RuntimeWarning, match='compiler missing'):
        custom_ops.get_plugin('tiny', ['tiny.cpp'], source_dir=str(env['src']))
    monkeypatch.setenv('DI_CUSTOM_OPS', 'require')
    monkeypatch.setattr(custom_ops, '_loaded', {})
    with pytest.raises(custom_ops.PluginBuildError, match='compiler missing'):
        custom_ops.get_plugin('tiny', ['tiny.cpp'], source_dir=str(env['src']))
    monkeypatch.setenv('DI_CUSTOM_OPS', 'ref')
    assert custom_ops.get_plugin('tiny', ['tiny.cpp'], source_dir=str(env['src'])) is None


def test_compile_error_is_named(env):
    (env['src'] / 'tiny.cpp').write_text(TINY.replace('VALUE', 'undeclared_name'))
    with pytest.warns(RuntimeWarning, match=r'custom op tiny: compile error: .*undeclared_name.*; log: '):
        assert custom_ops.get_plugin('tiny', ['tiny.cpp'], source_dir=str(env['src'])) is None


def test_real_ops_with_a_broken_compiler_match_the_reference(tmp_path):
    script = textwrap.dedent(f'''\
        import sys, warnings, torch
        sys.path.insert(0, {ROOT!r})
        from torch_utils.ops import bias_act, upfirdn2d
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            x, b, f = torch.randn(2, 3, 8, 8), torch.randn(3), upfirdn2d.setup_filter([1, 3, 3, 1])
            y1 = bias_act.bias_act(x, b, act='lrelu', clamp=0.5), upfirdn2d.upsample2d(x, f)
            y2 = bias_act.bias_act(x, b, act='lrelu', clamp=0.5), upfirdn2d.upsample2d(x, f)
        ref = bias_act.bias_act(x, b, act='lrelu', clamp=0.5, impl='ref'), upfirdn2d.upsample2d(x, f, impl='ref')
        ours = [str(w.message) for w in caught if 'custom op' in str(w.message)]
        assert len(ours) == 2 and 'bias_act_plugin' in ours[0] and 'upfirdn2d_plugin' in ours[1], ours
        assert all(torch.equal(a, r) and torch.equal(b, r) for a, b, r in zip(y1, y2, ref))
        print('ok')
        ''')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, CXX='false', TORCH_EXTENSIONS_DIR=str(tmp_path), DI_CUSTOM_OPS='auto'))
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr


def test_changed_source_or_environment_rebuilds(env, monkeypatch):
    assert custom_ops.get_plugin('tiny', ['tiny.cpp'], source_dir=str(env['src'])).value() == 1
    (env['src'] / 'tiny.cpp').write_text(TINY.replace('VALUE', '2'))
    assert custom_ops.get_plugin('tiny', ['tiny.cpp'], source_dir=str(env['src'])).value() == 2
    assert compiles(env) == 2
    assert len([p for p in env['cache'].iterdir() if p.is_dir()]) == 2  # Both versions stay cached.

    args = ('tiny', [str(env['src'] / 'tiny.cpp')], [], ['-O3'], [], [], False)
    key = custom_ops.build_key(*args)
    for module, name, value in [(torch, '__version__', torch.__version__ + '.other'),
                                (torch.version, 'cuda', '99.0'), (sys, 'version', sys.version + ' other')]:
        with monkeypatch.context() as m:
            m.setattr(module, name, value)
            assert custom_ops.build_key(*args) != key, name
    assert custom_ops.build_key(*args) == key
    assert custom_ops.build_key('tiny', args[1], [], ['-O2'], [], [], False) != key
    monkeypatch.setenv('CXX', 'g++')
    assert custom_ops.build_key(*args) != key
