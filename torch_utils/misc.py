"""Small helpers shared by the networks, the losses and the training loop.

The network sources embedded in NVlabs pickles call `constant`, `assert_shape`,
`profiled_function` and `suppress_tracer_warnings`; the training code uses the rest.
"""

import contextlib
import functools
import re
import types
import warnings

import numpy as np
import torch

# ----------------------------------------------------------------------------
# Constants and shape checks.

_constant_cache = dict()


def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """Return `value` as a tensor, optionally broadcast to `shape`.

    Results are cached, so the same (value, shape, dtype, device, format) gives back the
    same tensor object: callers must not modify it in place.
    """
    value = np.asarray(value)
    shape = None if shape is None else tuple(shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device('cpu') if device is None else torch.device(device)
    memory_format = torch.contiguous_format if memory_format is None else memory_format

    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor = tensor.expand(torch.broadcast_shapes(tensor.shape, shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor


def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    """`constant(value)` with `ref`'s dtype and device unless given (used by EDM2's sources)."""
    dtype = ref.dtype if dtype is None else dtype
    device = ref.device if device is None else device
    return constant(value, shape=shape, dtype=dtype, device=device, memory_format=memory_format)


@contextlib.contextmanager
def suppress_tracer_warnings():
    """Ignore `torch.jit.TracerWarning` inside the block (shape checks trigger them)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        yield


def assert_shape(tensor, ref_shape):
    """Check `tensor.shape` against `ref_shape`, where None matches any size.

    While tracing, sizes may be tensors; those are checked with `torch._assert` so the
    check is recorded in the graph instead of being baked in as a constant.
    """
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, '
                             f'expected {len(ref_shape)} (shape {list(tensor.shape)} vs {list(ref_shape)})')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            continue
        if isinstance(size, torch.Tensor) or isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                same = torch.equal(torch.as_tensor(size), torch.as_tensor(ref_size))
                torch._assert(same, f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size} '
                                 f'(shape {list(tensor.shape)} vs {list(ref_shape)})')


def profiled_function(fn):
    """Decorator: show calls of `fn` under its own name in the autograd profiler."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    return wrapper

# ----------------------------------------------------------------------------
# Parameters, buffers and distributed training.


def named_params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy every parameter and buffer of `dst_module` that `src_module` has under the same name.

    Values are copied in place, so `dst_module` keeps its own devices, dtypes and `requires_grad`.
    """
    assert isinstance(src_module, torch.nn.Module)
    assert isinstance(dst_module, torch.nn.Module)
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        src = src_tensors.get(name)
        if src is None:
            if require_all:
                raise AssertionError(f'copy_params_and_buffers: source has no tensor named {name!r}')
            continue
        if src.shape != tensor.shape:
            raise AssertionError(f'copy_params_and_buffers: {name!r} has shape {list(src.shape)} '
                                 f'in the source but {list(tensor.shape)} in the destination')
        tensor.copy_(src.detach())


@contextlib.contextmanager
def ddp_sync(module, sync):
    """Skip the gradient all-reduce of a DDP module inside the block unless `sync`."""
    assert isinstance(module, torch.nn.Module)
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def check_ddp_consistency(module, ignore_regex=None):
    """Assert that every rank holds the same parameters and buffers as rank 0.

    Names are matched as `<ClassName>.<param path>` against `ignore_regex` (re.fullmatch).
    NaNs compare equal to each other. Does nothing unless torch.distributed is initialized.
    """
    assert isinstance(module, torch.nn.Module)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        assert torch.equal(tensor, other), f'{fullname} differs between ranks'

# ----------------------------------------------------------------------------
# Endless data sampling.


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices, split between ranks.

    The global stream walks a shuffled index order round and round. After each step the
    index just visited swaps places with a random one among the `window_size * len(dataset)`
    positions ending at it (never wrapping past the start). Only visited positions change,
    so every lap is a permutation, yet the order keeps changing from lap to lap.
    Rank r takes stream items r, r + num_replicas, r + 2*num_replicas, ...
    """

    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, window_size=0.5):
        assert len(dataset) > 0
        assert num_replicas > 0
        assert 0 <= rank < num_replicas
        assert 0 <= window_size <= 1
        super().__init__()
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size

    def __iter__(self):
        order = np.arange(len(self.dataset))
        rng = np.random.RandomState(self.seed)
        window = 0
        if self.shuffle:
            rng.shuffle(order)
            window = int(np.rint(order.size * self.window_size))
        step = 0
        while True:
            pos = step % order.size
            if step % self.num_replicas == self.rank:
                yield int(order[pos])
            if window >= 2:
                other = rng.randint(max(pos - window + 1, 0), pos + 1)
                order[pos], order[other] = order[other], order[pos]
            step += 1

# ----------------------------------------------------------------------------
# Module summary.


def _tensor_outputs(outputs):
    outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    return [t for t in outputs if isinstance(t, torch.Tensor)]


def _record_calls(module, inputs, max_nesting):
    """Run `module(*inputs)` and list the (submodule, tensor outputs) of each call, innermost first."""
    calls = []
    depth = [0]

    def enter(_mod, _inputs):
        depth[0] += 1

    def leave(mod, _inputs, outputs):
        depth[0] -= 1
        if depth[0] <= max_nesting:
            calls.append(types.SimpleNamespace(mod=mod, outputs=_tensor_outputs(outputs)))

    hooks = [m.register_forward_pre_hook(enter) for m in module.modules()]
    hooks += [m.register_forward_hook(leave) for m in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, calls


def _format_table(rows):
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    """Print one row per submodule call: name, parameter and buffer counts, output shapes and dtypes.

    Each parameter, buffer and output tensor is counted at the innermost call that owns it.
    With `skip_redundant`, calls that add none of these are left out. Returns the outputs.
    """
    assert isinstance(module, torch.nn.Module)
    assert not isinstance(module, torch.jit.ScriptModule)
    assert isinstance(inputs, (tuple, list))
    outputs, calls = _record_calls(module, inputs, max_nesting)

    seen = set()

    def new(tensors):
        fresh = [t for t in tensors if id(t) not in seen]
        seen.update(id(t) for t in fresh)
        return fresh

    for call in calls:
        call.params = new(call.mod.parameters())
        call.buffers = new(call.mod.buffers())
        call.outputs = new(call.outputs)
    if skip_redundant:
        calls = [c for c in calls if c.params or c.buffers or c.outputs]

    names = {mod: name for name, mod in module.named_modules()}
    names[module] = '<top-level>'
    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'],
            ['---', '---', '---', '---', '---']]
    for call in calls:
        shapes = [str(list(t.shape)) for t in call.outputs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in call.outputs] or ['-']
        n_params = sum(t.numel() for t in call.params)
        n_buffers = sum(t.numel() for t in call.buffers)
        rows.append([names.get(call.mod, '?'), str(n_params) if n_params else '-',
                     str(n_buffers) if n_buffers else '-', shapes[0], dtypes[0]])
        rows += [['', '', '', shape, dtype] for shape, dtype in zip(shapes[1:], dtypes[1:])]
    total_params = sum(t.numel() for t in module.parameters())
    total_buffers = sum(t.numel() for t in module.buffers())
    rows += [['---', '---', '---', '---', '---'], ['Total', str(total_params), str(total_buffers), '', '']]
    print(_format_table(rows))
    print()
    return outputs
