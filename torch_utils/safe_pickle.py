"""Load NVlabs-format network pickles without running anything from the file.

Strategy (the default everywhere in this toolkit):
  1. Unpickle with a restricted unpickler that resolves only an allow-list of globals (tensor
     and array rebuilders, OrderedDict, torch containers, EasyDict). Persistent objects become
     inert `PickledObject` records of (class_name, module_src, state); their embedded source is
     never executed. Tensor storages are read with `torch.load(weights_only=True)`.
  2. Rebuild each record whose class we know as our own class: construct it from the recorded
     `init_args`/`init_kwargs`, then load the recorded parameters and buffers into it. Our
     classes use the NVlabs attribute paths, so the names line up one to one.
  3. A record whose class we do not know becomes an `UnknownPersistentObject`: it names the
     class and refuses to be used, so the rest of the pickle (e.g. `data['ema']` beside an
     unknown `augment_pipe`) still loads.

With `allow_code=True` the pickle is loaded the NVlabs way instead: its embedded source runs
against our `torch_utils` and `dnnlib` (see `torch_utils.persistence`).
"""

import _compat_pickle
import codecs
import collections
import importlib
import io
import pickle
import sys

import numpy as np
import torch

import dnnlib
from torch_utils import persistence

# Modules whose persistent classes the safe loader can rebuild, each with the text that a
# pickled module source must contain for its classes to apply (None: any source). They are
# imported on first use, so that torch_utils does not import the network code at start-up.
KNOWN_CLASS_MODULES = {
    'training.networks_edm': None,
    'training.networks_mlp': None,
    'training.networks_generators': None,
    'training.loss': None,
    'training.conv_discriminator': None,
    # StyleGAN3's networks_stylegan3.py reuses these class names but has no SynthesisBlock.
    'training.networks_stylegan2': 'class SynthesisBlock',
    # StyleGAN3 -t/-r (NVlabs' training/networks_stylegan3.py, or ours).
    'training.networks_stylegan3': 'class SynthesisInput',
    # EDM2 (NVlabs' training/networks_edm2.py and training/encoders.py, or ours); its generic
    # class names (UNet, Block, Precond) apply only to sources that define these classes.
    'training.networks_edm2': 'class MPConv',
    'training.encoders_edm2': 'class StabilityVAEEncoder',
    # diffusers UNets/VAEs wrapped as EDM denoisers (diffusers itself is imported lazily).
    'training.networks_diffusers': 'class DiffusersDenoiser',
}

ALLOW_CODE_HINT = 'pass --allow-pickle-code (allow_code=True) only if you trust the file'

class UnsafePickleError(pickle.UnpicklingError):
    """The pickle needs something that the safe loader will not do."""

#----------------------------------------------------------------------------
# Registry of classes that may be rebuilt.

_known_classes = dict()     # class_name -> list of (source_marker, class)
_imported_modules = set()   # KNOWN_CLASS_MODULES already registered

def register_class(cls, name=None, source_marker=None):
    """Let the safe loader rebuild pickled objects called `name` as instances of `cls`.

    `source_marker`, if given, must occur in the pickled module source; it tells apart
    classes that share a name across code bases (StyleGAN2's and StyleGAN3's `Generator`).
    """
    name = name or getattr(cls, '_orig_class_name', cls.__name__)
    entries = _known_classes.setdefault(name, [])
    entries[:] = [(m, c) for m, c in entries if m != source_marker]
    entries.append((source_marker, cls))
    return cls

def _import_known_modules():
    for module_name, marker in KNOWN_CLASS_MODULES.items():
        if module_name in _imported_modules:
            continue
        module = importlib.import_module(module_name)
        for value in list(vars(module).values()):
            if persistence.is_persistent(value) and value.__module__ == module_name:
                register_class(value, source_marker=marker)
        _imported_modules.add(module_name)

def find_known_class(class_name, module_src=''):
    """Our class for a pickled (class_name, module_src), or None."""
    _import_known_modules()
    for marker, cls in reversed(_known_classes.get(class_name, [])):
        if marker is None or marker in module_src:
            return cls
    return None

#----------------------------------------------------------------------------
# Step 1: the restricted unpickler.

class PickledObject:
    """What a persistent object of a pickle becomes before it is rebuilt: data, no code."""
    def __init__(self, meta):
        self.class_name = meta.get('class_name')
        self.module_src = meta.get('module_src', '')
        self.version = meta.get('version')
        self.type = meta.get('type')
        self.state = meta.get('state') or {}

    def __repr__(self):
        return f'<PickledObject {self.class_name}>'

    def __reduce__(self):
        # Pickled again exactly as it was read, so a refined snapshot carries an object we
        # could not rebuild (e.g. an ADA augment_pipe) on, byte for byte in its fields.
        meta = dict(type=self.type, version=self.version, module_src=self.module_src,
            class_name=self.class_name, state=self.state)
        return (persistence._reconstruct_persistent_obj, (meta,)) # pylint: disable=protected-access

    def __deepcopy__(self, memo):
        return self # immutable data

def _record_persistent_obj(meta):
    return PickledObject(meta)

def _load_storage_from_bytes(b):
    # torch's own rebuilder calls torch.load(weights_only=False), which could run code.
    return torch.load(io.BytesIO(b), weights_only=True, map_location='cpu')

def _allowed_globals():
    table = {
        ('torch_utils.persistence', '_reconstruct_persistent_obj'): _record_persistent_obj,
        ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes,
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
        ('dnnlib', 'EasyDict'): dnnlib.EasyDict,
        ('builtins', 'set'): set,
        ('builtins', 'frozenset'): frozenset,
        ('builtins', 'slice'): slice,
        ('_codecs', 'encode'): codecs.encode, # bytes in protocol-2 pickles
        ('numpy', 'dtype'): np.dtype,
        ('numpy', 'ndarray'): np.ndarray,
        ('torch', 'device'): torch.device,
        ('torch', 'Size'): torch.Size,
    }
    for name in ['_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_parameter',
            '_rebuild_parameter_with_state']:
        if hasattr(torch._utils, name):
            table[('torch._utils', name)] = getattr(torch._utils, name)
    for name in ['ModuleDict', 'ModuleList', 'Sequential']:
        table[('torch.nn.modules.container', name)] = getattr(torch.nn, name)
    # numpy 1.x pickles say numpy.core, numpy 2.x pickles say numpy._core.
    np_multiarray = np.array([]).__reduce__()[0].__module__ # the live multiarray module's name
    multiarray = importlib.import_module(np_multiarray)
    for prefix in ['numpy.core.multiarray', 'numpy._core.multiarray']:
        table[(prefix, 'scalar')] = multiarray.scalar
        table[(prefix, '_reconstruct')] = multiarray._reconstruct
    return table

class _RestrictedUnpickler(pickle.Unpickler):
    _table = None

    def find_class(self, module, name):
        if _RestrictedUnpickler._table is None:
            _RestrictedUnpickler._table = _allowed_globals()
        # Python-2-era names (protocol < 3), mapped as pickle's own find_class does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        obj = self._table.get((module, name))
        if obj is None and module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None:
            raise UnsafePickleError(f"pickle refers to '{module}.{name}', which the safe loader "
                f"does not allow; {ALLOW_CODE_HINT}")
        return obj

#----------------------------------------------------------------------------
# Steps 2 and 3: rebuild records as our classes.

class UnknownPersistentObject:
    """Stands in for a pickled object of a class we cannot rebuild safely; refuses to be used."""
    def __init__(self, record):
        self.__dict__['class_name'] = record.class_name
        self.__dict__['record'] = record

    def _refuse(self, *_args, **_kwargs):
        raise UnsafePickleError(f"the pickle's '{self.class_name}' is a class the safe loader "
            f"does not know; {ALLOW_CODE_HINT}")

    __call__ = _refuse

    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        self._refuse()

    def __repr__(self):
        return f'<UnknownPersistentObject {self.class_name}>'

    def __reduce__(self):
        return self.record.__reduce__()

    def __deepcopy__(self, memo):
        return self

def _module_tree_items(state, prefix=''):
    """Yield (path, kind, name, value) for every tensor and module flag in a pickled module tree.

    `state` is the __dict__ of a pickled nn.Module: a record's state, or the __dict__ of a real
    torch container (ModuleDict) whose children are records again.
    """
    yield prefix, 'training', None, state.get('training', True)
    non_persistent = state.get('_non_persistent_buffers_set') or set()
    for name, value in (state.get('_parameters') or {}).items():
        if value is not None:
            yield prefix, 'param', name, value
    for name, value in (state.get('_buffers') or {}).items():
        if value is not None and name not in non_persistent:
            yield prefix, 'buffer', name, value
    for name, child in (state.get('_modules') or {}).items():
        if child is None:
            continue
        child_state = child.state if isinstance(child, PickledObject) else child.__dict__
        yield from _module_tree_items(child_state, f'{prefix}{name}.')

def _rebuild(record, memo):
    cls = find_known_class(record.class_name, record.module_src)
    if cls is None:
        return UnknownPersistentObject(record)
    args = _rebuild_all(record.state.get('_init_args') or (), memo)
    kwargs = _rebuild_all(record.state.get('_init_kwargs') or {}, memo)
    try:
        with torch.random.fork_rng(devices=[]): # constructing must not disturb the caller's RNG
            obj = cls(*args, **kwargs)
    except (TypeError, ValueError) as e: # arguments our class does not take, or cannot build
        raise UnsafePickleError(f"pickled '{record.class_name}' has constructor arguments our "
            f"implementation does not accept ({_first_line(e)}); {ALLOW_CODE_HINT}") from None
    if not isinstance(obj, torch.nn.Module):
        # A plain object (EDMLoss, say) keeps its pickled attributes, as NVlabs loading does;
        # they passed the restricted unpickler, so they are data.
        obj.__dict__.update(_rebuild_all(dict(record.state), memo))
        return obj

    tensors, flags = dict(), dict()
    for path, kind, name, value in _module_tree_items(record.state):
        if kind == 'training':
            flags[path.rstrip('.')] = bool(value)
        else:
            tensors[path + name] = value
    own = obj.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong_shape:
        problems = [f'{label}: {", ".join(keys[:5])}{" ..." if len(keys) > 5 else ""}'
            for label, keys in [('missing', missing), ('unexpected', unexpected),
                                ('wrong shape', wrong_shape)] if keys]
        raise UnsafePickleError(f"pickled '{record.class_name}' does not match our "
            f"implementation ({'; '.join(problems)}); {ALLOW_CODE_HINT}")
    obj.load_state_dict(tensors, strict=True)
    for path, module in obj.named_modules():
        if path in flags:
            module.training = flags[path]
    for name, param in obj.named_parameters():
        if isinstance(tensors.get(name), torch.nn.Parameter):
            param.requires_grad_(tensors[name].requires_grad)
    return obj

def _rebuild_all(obj, memo):
    """Replace every PickledObject inside plain containers by its rebuilt object.

    `memo` maps id(record) -> rebuilt object, so that a record referenced twice (a snapshot's
    'ema' that is also its G_ema's inner network) becomes one shared object, as in the pickle.
    """
    if isinstance(obj, PickledObject):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, _rebuild(obj, memo)) # keep obj alive: ids stay unique
        return memo[id(obj)][1]
    if isinstance(obj, dnnlib.EasyDict):
        return dnnlib.EasyDict({k: _rebuild_all(v, memo) for k, v in obj.items()})
    if isinstance(obj, dict):
        return type(obj)((k, _rebuild_all(v, memo)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuild_all(v, memo) for v in obj)
    return obj

#----------------------------------------------------------------------------

def load(file, allow_code=False):
    """Load an NVlabs-format pickle from a binary file object.

    Default: nothing from the file runs; known classes come back as our own classes, unknown
    ones as `UnknownPersistentObject`. With `allow_code=True`: the NVlabs way, executing the
    embedded sources against our torch_utils/dnnlib.
    """
    if allow_code:
        return persistence.load(file, allow_code=True)
    return _rebuild_all(_RestrictedUnpickler(file).load(), memo={})

def load_plain_data(file, encoding='ASCII'):
    """Unpickle plain data (numbers, strings, containers, numpy arrays, tensors) and nothing
    else: any other global, a __reduce__ payload included, is refused. `encoding='latin1'`
    reads numpy arrays pickled by Python 2."""
    return _RestrictedUnpickler(file, encoding=encoding).load()

def load_network_pkl(url_or_path, allow_code=False):
    """Open a path or URL (download cache as in dnnlib.util.open_url) and load it.

    A file that is not a complete pickle raises a one-line UnsafePickleError naming it. With
    `allow_code`, one warning line on stderr names the classes and functions whose code the
    file makes run.
    """
    with dnnlib.util.open_url(url_or_path, verbose=False) as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(b'PK\x03\x04'):
            raise UnsafePickleError(f'{url_or_path} is a torch.save archive (e.g. a training-state .pt), '
                'not a network pickle')
        try:
            if allow_code:
                names = code_in_pickle(f)
                f.seek(0)
                if names:
                    print(f"Warning: --allow-pickle-code: {url_or_path} runs its own code for "
                        f"{', '.join(names)}", file=sys.stderr, flush=True)
            return load(f, allow_code=allow_code)
        except persistence.PickleCodeRefused:
            raise
        except UnsafePickleError as e: # name the file, as the errors below do
            if str(url_or_path) in str(e):
                raise
            raise UnsafePickleError(f'{url_or_path}: {e}') from None
        except (EOFError, pickle.UnpicklingError) as e:
            raise UnsafePickleError(f'{url_or_path}: not a complete network pickle ({_first_line(e)})') from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            if allow_code:
                raise # the file's own code failed; its message says why
            raise UnsafePickleError(f'{url_or_path}: not a network pickle ({_first_line(e)})') from None

def _first_line(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__

class _Inert:
    """Stands in for every object while a pickle is only being scanned."""
    def __new__(cls, *_args, **_kwargs):
        return object.__new__(cls)
    def __init__(self, *_args, **_kwargs):
        pass
    def __call__(self, *_args, **_kwargs):
        return _Inert()
    def __setstate__(self, _state):
        pass
    def __setitem__(self, _key, _value):
        pass
    def append(self, _value):
        pass
    def extend(self, _values):
        pass

class _ScanningUnpickler(pickle.Unpickler):
    """Walks a pickle, builds nothing, and records what would run code when loaded for real."""

    def __init__(self, file):
        super().__init__(file)
        self.names = []

    def find_class(self, module, name):
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            def record(meta):
                if isinstance(meta, dict) and not persistence.is_known_source(meta.get('module_src')):
                    self.names.append(str(meta.get('class_name')))
                return _Inert()
            return record
        if _RestrictedUnpickler._table is None:
            _RestrictedUnpickler._table = _allowed_globals()
        if (module, name) not in _RestrictedUnpickler._table and not (module == 'torch' and name.endswith('Tensor')):
            self.names.append(f'{module}.{name}')
        return _Inert

def code_in_pickle(file):
    """Names of the embedded classes (with source not already imported here) and of the other
    globals whose code a pickle would run when loaded with code allowed; runs none of it."""
    scanner = _ScanningUnpickler(file)
    scanner.load()
    return list(dict.fromkeys(scanner.names))

def require_module(data, key, source='pickle'):
    """`data[key]` as a usable torch module, or a one-line error saying what is wrong."""
    if not isinstance(data, dict) or key not in data:
        keys = ', '.join(map(str, data.keys())) if isinstance(data, dict) else type(data).__name__
        raise UnsafePickleError(f"{source} has no '{key}' entry (it has: {keys})")
    value = data[key]
    if isinstance(value, UnknownPersistentObject):
        value._refuse()
    if not isinstance(value, torch.nn.Module):
        raise UnsafePickleError(f"{source}: '{key}' is a {type(value).__name__}, not a network")
    return value
