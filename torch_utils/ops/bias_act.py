"""Fused bias + activation + gain + clamp, as called by the StyleGAN network sources.

Only a pure-PyTorch path exists; it runs for every device and every `impl`.
"""

import numpy as np
import torch
import torch.nn.functional as F


class _AttrDict(dict):
    """A dict whose keys can also be read as attributes (like dnnlib.EasyDict).

    Kept local so this module does not import dnnlib.
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _spec(func, def_alpha, def_gain, cuda_idx, ref, has_2nd_grad):
    return _AttrDict(func=func, def_alpha=def_alpha, def_gain=def_gain, cuda_idx=cuda_idx,
                     ref=ref, has_2nd_grad=has_2nd_grad)


# `func(x, alpha)`: only lrelu uses alpha. `ref` and `cuda_idx` describe the CUDA kernel's
# interface (which tensor its gradient needs: '' none, 'x' input, 'y' output).
activation_funcs = {
    'linear':   _spec(lambda x, alpha: x,                          0,   1,          1, '',  False),
    'relu':     _spec(lambda x, alpha: F.relu(x),                  0,   np.sqrt(2), 2, 'y', False),
    'lrelu':    _spec(lambda x, alpha: F.leaky_relu(x, alpha),     0.2, np.sqrt(2), 3, 'y', False),
    'tanh':     _spec(lambda x, alpha: torch.tanh(x),              0,   1,          4, 'y', True),
    'sigmoid':  _spec(lambda x, alpha: torch.sigmoid(x),           0,   1,          5, 'y', True),
    'elu':      _spec(lambda x, alpha: F.elu(x),                   0,   1,          6, 'y', True),
    'selu':     _spec(lambda x, alpha: F.selu(x),                  0,   1,          7, 'y', True),
    'softplus': _spec(lambda x, alpha: F.softplus(x),              0,   1,          8, 'y', True),
    'swish':    _spec(lambda x, alpha: torch.sigmoid(x) * x,       0,   np.sqrt(2), 9, 'x', True),
}

# Hook for a compiled kernel. When set, it is called as
# `_plugin(x, b, dim, act, alpha, gain, clamp)` (alpha/gain/clamp already resolved to floats,
# clamp=-1 meaning "off") for CUDA tensors with impl='cuda'. None: always use `_bias_act_ref`.
_plugin = None


def bias_act(x, b=None, dim=1, act='linear', alpha=None, gain=None, clamp=None, impl='cuda'):
    """Return `clamp(act(x + b, alpha) * gain, -clamp, clamp)`, in the dtype of `x`.

    `b` is 1-D and added along dimension `dim`. `alpha`/`gain` default to the activation's
    `def_alpha`/`def_gain`; `clamp=None` disables clamping.
    """
    assert isinstance(x, torch.Tensor)
    assert impl in ('ref', 'cuda')
    spec = activation_funcs[act]
    alpha = float(spec.def_alpha if alpha is None else alpha)
    gain = float(spec.def_gain if gain is None else gain)
    assert clamp is None or clamp >= 0, 'clamp must be None or non-negative'
    clamp = -1.0 if clamp is None else float(clamp)  # -1: no clamping.
    if _plugin is not None and impl == 'cuda' and x.device.type == 'cuda':
        return _plugin(x, b, dim, act, alpha, gain, clamp)
    return _bias_act_ref(x, b, dim, spec, alpha, gain, clamp)


def _bias_act_ref(x, b, dim, spec, alpha, gain, clamp):
    if b is not None:
        assert isinstance(b, torch.Tensor) and b.ndim == 1
        assert -x.ndim <= dim < x.ndim and b.shape[0] == x.shape[dim]
        dim %= x.ndim
        # Cast so a float32 bias cannot promote a half-precision activation.
        x = x + b.to(x.dtype).reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = spec.func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x
