"""The NVlabs network-pickle format (version 6), written and read by our own code.

A class decorated with `@persistent_class` pickles its instances together with the full
source text of the module that defines it, so that a pickle can be loaded later without
the original code base. On disk every such instance becomes a call

    torch_utils.persistence._reconstruct_persistent_obj(
        dict(type='class', version=6, module_src=..., class_name=..., state=...))

which is the one custom global that NVlabs EDM / StyleGAN2-ADA / StyleGAN3 pickles need.
Pickles written here load in those code bases and theirs load here.

Executing embedded source is what that format asks for, and it runs arbitrary code. Here it
happens only when
  * the source is already known: it is the text of a module imported in this process (our own
    networks, which is also how `copy.deepcopy` of a persistent object works), or
  * the caller allowed it (`allow_code_execution()`, `load(..., allow_code=True)`, the CLI flag
    `--allow-pickle-code`, or the environment variable TORCH_UTILS_ALLOW_PICKLE_CODE=1).
Otherwise `_reconstruct_persistent_obj` refuses with `PickleCodeRefused`. The safe way to load
a network pickle, which runs nothing from the file, is `torch_utils.safe_pickle`.
"""

import contextlib
import copy
import inspect
import io
import os
import pickle
import sys
import threading
import types
import uuid

import numpy as np
import torch

import dnnlib

_version = 6                    # Pickle format version; the same in every NVlabs code base.
_decorators = set()             # Every Decorator class made by persistent_class().
_import_hooks = []              # Functions meta -> meta run before a pickled object is rebuilt.
_module_to_src_dict = dict()    # module -> source text
_src_to_module_dict = dict()    # source text -> module
_allow_code = threading.local() # Depth of active allow_code_execution() blocks, per thread.

ALLOW_CODE_ENV = 'TORCH_UTILS_ALLOW_PICKLE_CODE'

class PickleCodeRefused(pickle.UnpicklingError):
    """Raised instead of executing source code embedded in a pickle without permission."""

#----------------------------------------------------------------------------

def persistent_class(orig_class):
    """Class decorator: instances pickle with their module's source (see module docstring).

    Also records the constructor arguments as `init_args` / `init_kwargs`, which is what lets
    a loader that runs no embedded code rebuild the object as one of our own classes.
    """
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class

    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            # A class may set _record_init_args = False and record its own (smaller) init
            # arguments in its constructor, e.g. to refer to a submodule instead of copying it.
            record = getattr(self, '_record_init_args', True)
            # Copy before the constructor runs, in case it mutates what it was given.
            init_args = copy.deepcopy(args) if record else None
            init_kwargs = copy.deepcopy(kwargs) if record else None
            super().__init__(*args, **kwargs)
            if record or not hasattr(self, '_init_args'):
                self._init_args = init_args
                self._init_kwargs = init_kwargs
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self):
            assert self._init_args is not None, 'constructor arguments were not recorded'
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            assert self._init_kwargs is not None, 'constructor arguments were not recorded'
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                # Key order matters for byte-level parity with NVlabs pickles.
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                    class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _decorators.add(Decorator)
    return Decorator

def is_persistent(obj):
    """True if `obj` is a persistent class or an instance of one."""
    try:
        if obj in _decorators:
            return True
    except TypeError: # unhashable
        pass
    return type(obj) in _decorators

def import_hook(hook):
    """Register `hook(meta) -> meta`, run on every pickled object before it is rebuilt.

    A hook may rewrite `meta.module_src`, `meta.class_name` or `meta.state`, for example to
    patch an old source file. It must return the (possibly modified) meta.
    """
    assert callable(hook)
    _import_hooks.append(hook)

#----------------------------------------------------------------------------
# Permission to execute embedded source.

@contextlib.contextmanager
def allow_code_execution():
    """Within this block, unpickling may execute source code embedded in pickles."""
    _allow_code.depth = getattr(_allow_code, 'depth', 0) + 1
    try:
        yield
    finally:
        _allow_code.depth -= 1

def code_execution_allowed():
    return getattr(_allow_code, 'depth', 0) > 0 or os.environ.get(ALLOW_CODE_ENV, '') == '1'

#----------------------------------------------------------------------------
# Reading.

def _reconstruct_persistent_obj(meta):
    """Rebuild one persistent object from its meta dict (the global named in every pickle)."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None, 'an import hook returned None'

    assert meta.version == _version, f'unsupported persistent-object version {meta.version}'
    if meta.module_src not in _src_to_module_dict and not code_execution_allowed():
        raise PickleCodeRefused(f"pickle embeds source code for class '{meta.class_name}' and "
            f"would run it; load it with torch_utils.safe_pickle, or allow code execution "
            f"(--allow-pickle-code, allow_code=True, {ALLOW_CODE_ENV}=1) only for a file you trust")
    module = _src_to_module(meta.module_src)

    assert meta.type == 'class', f'unsupported persistent-object type {meta.type!r}'
    orig_class = module.__dict__[meta.class_name]
    decorator_class = persistent_class(orig_class)
    obj = decorator_class.__new__(decorator_class)
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj

def is_known_source(src):
    """True if `src` is the text of a module already imported here (loading it runs nothing new)."""
    return src in _src_to_module_dict

def _module_to_src(module):
    """Source text of a module, cached both ways so the module can be found from its source."""
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
    _src_to_module_dict.setdefault(src, module) # also on a hit: the reverse entry may have been dropped
    return src

def _src_to_module(src):
    """The module made from this exact source text, executing it once on first use."""
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        # Register before executing: persistent_class() looks the source up while it runs.
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        try:
            exec(src, module.__dict__) # pylint: disable=exec-used
        except BaseException as e:
            # Unregister the half-executed module, so that the next pickle with this source
            # tries again instead of finding a module without its classes.
            sys.modules.pop(module_name, None)
            _module_to_src_dict.pop(module, None)
            _src_to_module_dict.pop(src, None)
            if isinstance(e, ModuleNotFoundError) and e.name:
                top = e.name.split('.')[0]
                hint = 'which this toolkit does not provide' if top in ('dnnlib', 'torch_utils', 'training') \
                    else f'which is not installed here (pip install {top})'
                raise ImportError(f"code embedded in the pickle imports '{e.name}', {hint}",
                    name=e.name) from None
            if isinstance(e, ImportError):
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ImportError(f'code embedded in the pickle failed to import: {first}', name=e.name) from None
            raise
    return module

def load(file, allow_code=False):
    """Unpickle `file` (a binary file object).

    By default nothing from the file runs: this is `torch_utils.safe_pickle.load`, a restricted
    unpickler that rebuilds the classes it knows as our own. With `allow_code=True` the pickle
    is loaded the NVlabs way, by executing its embedded source (and any other global it names):
    only for files you trust.
    """
    if not allow_code:
        from torch_utils import safe_pickle # pylint: disable=import-outside-toplevel (it imports us)
        return safe_pickle.load(file)
    with allow_code_execution():
        return pickle.load(file)

#----------------------------------------------------------------------------
# Writing.

def _check_pickleable(obj):
    """Fail early, at construction, if an object's state could not be pickled later."""
    def recurse(obj):
        if isinstance(obj, (list, tuple, set)):
            return [recurse(x) for x in obj]
        if isinstance(obj, dict):
            return [[recurse(x), recurse(y)] for x, y in obj.items()]
        if isinstance(obj, (str, int, float, bool, bytes, bytearray, type(None))):
            return None # Python primitive types are pickleable.
        if isinstance(obj, (np.ndarray, np.generic, torch.Tensor, torch.dtype, torch.device)):
            return None # Tensors and arrays are pickleable.
        if is_persistent(obj):
            return None # Persistent objects are pickleable by construction.
        return obj
    with io.BytesIO() as f:
        pickle.dump(recurse(obj), f)

def save_network_pkl(data, path):
    """Pickle `data` (typically a dict of networks) to `path` atomically.

    The file appears under its final name only once it is complete, so an interrupted save
    never leaves a truncated snapshot behind and never destroys an existing one.
    """
    with dnnlib.util.atomic_path(path) as tmp_path:
        with open(tmp_path, 'wb') as f:
            pickle.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
