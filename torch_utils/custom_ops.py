"""Build and load the compiled ops (`torch_utils/ops/*.cpp|*.cu`) with ninja, safely.

`get_plugin(name, sources, headers)` returns the compiled Python module, or None when the build
is impossible or failed (after one warning naming the op, the reason and the log file), in
which case the caller runs its reference path. What it guards against:

* A cache serving another environment: the build directory is named by a hash of the sources,
  the headers, the Python, torch and CUDA versions, the compiler (path, size, mtime), the
  flags, the CPU's instruction set (we build with -march=native) and, for CUDA, nvcc and the
  GPU architectures.
* Hanging on a stale lock: the lock file records its holder's host and PID and is kept fresh
  by a heartbeat; a waiter breaks it when the PID is gone or the heartbeat is older than
  `DI_CUSTOM_OPS_LOCK_TIMEOUT` seconds (default 60).
* Half-written caches: every build runs in a private temporary directory that is renamed into
  place when complete, so a reader sees a complete module or none. The lock only saves work;
  two concurrent builds would still be correct.
* Ranks building the same op: under torchrun, local rank 0 builds and the other ranks wait on
  its lock, then load its result (or take over its failure without building).

Environment:
  DI_CUSTOM_OPS            auto (default): use a plugin when it builds; ref: never build, always
                           the reference path; require: raise instead of falling back
                           (benchmarks).
  DI_CUSTOM_OPS_VERBOSITY  none | brief (default: one line per build) | full (compiler output).
  TORCH_EXTENSIONS_DIR     cache root (default: the dnnlib cache, ~/.cache/dnnlib/torch_extensions).
  MAX_JOBS                 parallel compile jobs (read by torch.utils.cpp_extension).
"""

import glob
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings

import torch

verbosity = os.environ.get('DI_CUSTOM_OPS_VERBOSITY', 'brief')
_loaded = dict()  # (name, key) -> module or None, so one process builds and warns once per op.


class PluginBuildError(RuntimeError):
    """Raised instead of falling back when DI_CUSTOM_OPS=require."""


def mode():
    value = os.environ.get('DI_CUSTOM_OPS', 'auto').strip().lower() or 'auto'
    if value not in ('auto', 'ref', 'require'):
        raise ValueError(f'DI_CUSTOM_OPS must be auto, ref or require, not {value!r}')
    return value


def cache_root():
    root = os.environ.get('TORCH_EXTENSIONS_DIR')
    if not root:
        import dnnlib  # pylint: disable=import-outside-toplevel
        root = dnnlib.make_cache_dir_path('torch_extensions')
    return root

# ----------------------------------------------------------------------------
# The cache key.


def _tool_id(command):
    """Identify a compiler without running it: resolved path, size and mtime."""
    exe = command.split()[0] if command else ''
    path = shutil.which(exe)
    if path is None:
        return f'{command}: missing'
    st = os.stat(os.path.realpath(path))
    return f'{command}: {os.path.realpath(path)} {st.st_size} {st.st_mtime_ns}'


def _cpu_id():
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    return line.strip()
    except OSError:
        pass
    return platform.processor()


def _nvcc_path():
    from torch.utils import cpp_extension  # pylint: disable=import-outside-toplevel
    home = cpp_extension.CUDA_HOME
    return os.path.join(home, 'bin', 'nvcc') if home else None


def _cuda_archs():
    archs = os.environ.get('TORCH_CUDA_ARCH_LIST')
    if archs:
        return archs
    if torch.cuda.is_available():
        return ' '.join(sorted({'%d.%d' % torch.cuda.get_device_capability(i)
                                for i in range(torch.cuda.device_count())}))
    return 'none'


def build_key(name, sources, headers, extra_cflags, extra_cuda_cflags, extra_ldflags, with_cuda):
    """Hex digest that changes whenever the built module could differ."""
    h = hashlib.sha256()
    for path in list(sources) + list(headers):
        with open(path, 'rb') as f:
            h.update(os.path.basename(path).encode() + b'\0' + f.read() + b'\0')
    env = dict(name=name, python=sys.version, cache_tag=sys.implementation.cache_tag,
               machine=platform.machine(), system=platform.system(),
               torch=torch.__version__, torch_git=getattr(torch.version, 'git_version', ''),
               torch_cuda=torch.version.cuda, cxx11_abi=bool(torch._C._GLIBCXX_USE_CXX11_ABI),
               cxx=_tool_id(os.environ.get('CXX', 'c++')), cflags=list(extra_cflags),
               ldflags=list(extra_ldflags), cpu=_cpu_id())
    if with_cuda:
        nvcc = _nvcc_path()
        env.update(nvcc=_tool_id(nvcc) if nvcc else 'missing', cuda_cflags=list(extra_cuda_cflags),
                   archs=_cuda_archs())
    h.update(json.dumps(env, sort_keys=True).encode())
    return h.hexdigest()

# ----------------------------------------------------------------------------
# The lock.


def lock_timeout():
    return float(os.environ.get('DI_CUSTOM_OPS_LOCK_TIMEOUT', '60'))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Exists, owned by someone else.
        return True
    return True


class FileLock:
    """An O_EXCL lock file with holder info and a heartbeat; stale ones are broken.

    `acquire()` returns True if it had to wait for another holder.
    """

    def __init__(self, path, timeout=None, max_wait=None, poll=0.05):
        self.path = path
        self.timeout = lock_timeout() if timeout is None else timeout
        self.max_wait = max_wait
        self.poll = poll
        self.token = uuid.uuid4().hex
        self._stop = None

    def _read(self):
        try:
            with open(self.path, encoding='utf-8') as f:
                info = json.load(f)
            info['mtime'] = os.stat(self.path).st_mtime
            return info
        except (OSError, ValueError):
            return None  # Gone, or being written: look again.

    def is_stale(self, info):
        if info.get('host') == socket.gethostname() and not _pid_alive(int(info.get('pid', -1))):
            return True
        return time.time() - info['mtime'] > self.timeout

    def _break(self, info):
        aside = f'{self.path}.broken.{os.getpid()}.{self.token}'
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside, encoding='utf-8') as f:
                mine = json.load(f).get('token') == info.get('token')
        except (OSError, ValueError):
            mine = True
        if not mine:  # Someone re-took it in between: give it back if nobody else has.
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        os.unlink(aside)
        if mine:
            _log('brief', f'custom_ops: broke stale lock {self.path} (pid {info.get("pid")})')

    def acquire(self):
        start = time.time()
        waited = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._read()
                if info is not None and self.is_stale(info):
                    self._break(info)
                    continue
                if self.max_wait is not None and time.time() - start > self.max_wait:
                    raise TimeoutError(f'waited {self.max_wait:.0f} s for {self.path}') from None
                waited = True
                time.sleep(self.poll)
                continue
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                json.dump(dict(pid=os.getpid(), host=socket.gethostname(), time=time.time(), token=self.token), f)
            break
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True).start()
        return waited

    def _heartbeat(self, stop):
        while not stop.wait(max(self.timeout / 4, 0.01)):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self):
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        info = self._read()
        if info is not None and info.get('token') == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

# ----------------------------------------------------------------------------
# Building and loading.


def _log(level, message):
    levels = ('none', 'brief', 'full')
    if levels.index(verbosity if verbosity in levels else 'brief') >= levels.index(level):
        print(message, file=sys.stderr, flush=True)


def _import(module_name, path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _published(final_dir, module_name):
    path = os.path.join(final_dir, module_name + '.so')
    return path if os.path.isfile(path) else None


def _preflight(with_cuda):
    """Reasons the build cannot start, found without compiling (None: go ahead)."""
    from torch.utils import cpp_extension  # pylint: disable=import-outside-toplevel
    cxx = os.environ.get('CXX', 'c++')
    if shutil.which(cxx.split()[0] if cxx else '') is None:
        return f'compiler missing (CXX={cxx!r} not found)'
    if not cpp_extension.is_ninja_available():
        return 'ninja missing (pip install ninja)'
    if with_cuda:
        nvcc = _nvcc_path()
        if nvcc is None or not os.path.isfile(nvcc):
            return 'nvcc missing (set CUDA_HOME)'
        try:
            out = subprocess.run([nvcc, '--version'], capture_output=True, text=True, check=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            return f'nvcc does not run ({e})'
        found = re.search(r'release (\d+)\.(\d+)', out)
        if found and torch.version.cuda and found.group(1) != torch.version.cuda.split('.')[0]:
            return f'nvcc/torch CUDA mismatch (nvcc {found.group(1)}.{found.group(2)}, torch built with {torch.version.cuda})'
    return None


def _classify(log_text):
    """One-line reason from a build log."""
    found = re.search(r"Command '\[('[^']*'), '(?:--version|-v)'\]' returned non-zero", log_text)
    if found:
        return f'compiler does not run ({found.group(1)} --version fails)'
    for pattern, reason in [(r'nvcc fatal|unsupported GNU version|CUDA version', 'nvcc/CUDA problem'),
                            (r'cannot find -l|undefined reference|undefined symbol', 'link error'),
                            (r'^(?!\[\d)(?!.*collect2).*\berror\b ?:', 'compile error')]:  # Not ninja's command lines.
        match = re.search(f'^.*(?:{pattern}).*$', log_text, re.MULTILINE)
        if match:
            return f'{reason}: {match.group(0).strip()[:200]}'
    lines = [line for line in log_text.strip().splitlines() if line.strip()]
    return 'build failed' + (f': {lines[-1].strip()[:200]}' if lines else '')


def _run_build(module_name, sources, build_dir, log_path, kwargs):
    """torch's ninja build in `build_dir`, its output going to `log_path`; returns the module."""
    from torch.utils import cpp_extension  # pylint: disable=import-outside-toplevel
    sys.stdout.flush()
    saved = os.dup(1)
    with open(log_path, 'ab') as log:
        os.dup2(log.fileno(), 1)  # ninja writes to fd 1 when verbose: keep all of it in the log.
        try:
            return cpp_extension.load(name=module_name, sources=sources, build_directory=build_dir,
                                      verbose=True, **kwargs)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _fail(name, reason, log_path):
    where = f'; log: {log_path}' if log_path else ''
    message = f'custom op {name}: {reason}{where}'
    if mode() == 'require':
        raise PluginBuildError(message)
    warnings.warn(message + '; using the reference path', RuntimeWarning, stacklevel=3)


def _local_rank():
    try:
        return int(os.environ.get('LOCAL_RANK', '0'))
    except ValueError:
        return 0


def get_plugin(module_name, sources, headers=None, source_dir=None, extra_cflags=None,
               extra_cuda_cflags=None, extra_ldflags=None, with_cuda=None, head_start=60.0, **build_kwargs):
    """Return the built module `module_name`, or None (reference path) after one warning.

    `sources`/`headers` are file names, relative to `source_dir` if given. The module is
    registered under `{module_name}_{key[:12]}`, so two versions can coexist in the cache.
    """
    headers = list(headers or [])
    if source_dir is not None:
        sources = [os.path.join(source_dir, s) for s in sources]
        headers = [os.path.join(source_dir, h) for h in headers]
    if with_cuda is None:
        with_cuda = any(s.endswith('.cu') for s in sources)
    extra_cflags = list(extra_cflags or [])
    extra_cuda_cflags = list(extra_cuda_cflags or [])
    extra_ldflags = list(extra_ldflags or [])
    if mode() == 'ref':
        return None

    key = build_key(module_name, sources, headers, extra_cflags, extra_cuda_cflags, extra_ldflags, with_cuda)
    if (module_name, key) in _loaded:
        return _loaded[(module_name, key)]
    full_name = f'{module_name}_{key[:12]}'
    root = cache_root()
    final_dir = os.path.join(root, full_name)
    failed_path = final_dir + '.failed'
    start = time.time()

    def load_published():
        so = _published(final_dir, full_name)
        if so is None:
            return None
        module = _import(full_name, so)
        _log('full', f'custom_ops: loaded {so}')
        return module

    try:
        module = load_published()  # The common case: no lock, no compiler.
    except ImportError as e:
        _loaded[(module_name, key)] = None
        _fail(module_name, f'cached module does not load ({e})', None)
        return None
    if module is not None:
        _loaded[(module_name, key)] = module
        return module

    os.makedirs(root, exist_ok=True)
    lock = FileLock(final_dir + '.lock')
    if _local_rank() > 0:  # Give local rank 0 time to take the lock, then wait on it.
        while (time.time() - start < head_start and not os.path.exists(lock.path)
               and _published(final_dir, full_name) is None):
            time.sleep(0.05)
    waited = lock.acquire() or _local_rank() > 0
    try:
        module = load_published()  # Built while we waited.
        if module is None and waited:
            try:
                with open(failed_path, encoding='utf-8') as f:
                    failure = json.load(f)
                if failure['time'] >= start - 1:  # The holder we waited for failed: do not repeat it.
                    _loaded[(module_name, key)] = None
                    _fail(module_name, failure['reason'], failure['log'])
                    return None
            except (OSError, ValueError, KeyError):
                pass
        if module is None:
            module = _build(module_name, full_name, sources, headers, root, final_dir, failed_path,
                            dict(extra_cflags=extra_cflags, extra_cuda_cflags=extra_cuda_cflags,
                                 extra_ldflags=extra_ldflags, with_cuda=with_cuda, **build_kwargs))
    finally:
        lock.release()
    _loaded[(module_name, key)] = module
    return module


def _build(module_name, full_name, sources, headers, root, final_dir, failed_path, kwargs):
    reason = _preflight(kwargs['with_cuda'])
    log_path = None
    if reason is None:
        tmp_dir = f'{final_dir}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}'
        os.makedirs(tmp_dir)
        for path in sources + headers:  # Build exactly the hashed files, side by side.
            shutil.copyfile(path, os.path.join(tmp_dir, os.path.basename(path)))
        log_path = os.path.join(tmp_dir, 'build.log')
        _log('brief', f'custom_ops: building {module_name} in {final_dir} ...')
        t0 = time.time()
        try:
            module = _run_build(full_name, [os.path.join(tmp_dir, os.path.basename(s)) for s in sources],
                                tmp_dir, log_path, kwargs)
        except Exception as e:  # pylint: disable=broad-except
            with open(log_path, 'a', encoding='utf-8') as log:
                log.write(f'\n{type(e).__name__}: {e}\n')
            with open(log_path, encoding='utf-8', errors='replace') as log:
                text = log.read()
            _log('full', text)
            failed_log = f'{final_dir}.{os.getpid()}.log'
            shutil.copyfile(log_path, failed_log)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            reason, log_path = _classify(text), failed_log
        else:
            for leftover in glob.glob(os.path.join(tmp_dir, '*.o')) + glob.glob(os.path.join(tmp_dir, '.ninja_*')):
                os.remove(leftover)  # The objects are not needed once linked.
            try:
                os.rename(tmp_dir, final_dir)  # Atomic publication.
            except OSError:  # Someone else published the same key first: theirs is identical.
                shutil.rmtree(tmp_dir, ignore_errors=True)
            module.__file__ = os.path.join(final_dir, full_name + '.so')  # Loaded before the rename.
            try:
                os.remove(failed_path)
            except FileNotFoundError:
                pass
            _log('brief', f'custom_ops: built {module_name} in {time.time() - t0:.1f} s')
            if verbosity == 'full':
                with open(os.path.join(final_dir, 'build.log'), encoding='utf-8', errors='replace') as log:
                    _log('full', log.read())
            return module
    tmp = f'{failed_path}.{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(dict(reason=reason, log=log_path, time=time.time(), pid=os.getpid()), f)
    os.replace(tmp, failed_path)
    _fail(module_name, reason, log_path)
    return None
