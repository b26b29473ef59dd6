"""Fused bias + activation + gain + clamp, as called by the StyleGAN network sources.

`impl='cuda'` (the default) runs the compiled plugin (bias_act.cpp on the CPU, bias_act_cuda.cu
on CUDA) when it builds, else the pure-PyTorch reference `_bias_act_ref`; `impl='ref'` always
runs the reference. The plugin's gradients are its own kernels, to second order.
"""

import numpy as np
import torch
import torch.nn.functional as F

from . import _plugins


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

def _plugin(with_cuda=None):
    return _plugins.load('bias_act_plugin', 'bias_act.cpp', 'bias_act_cuda.cu',
                         ['bias_act_math.h', 'bias_act_cuda.h', 'cuda_common.cuh'], with_cuda)


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
    if impl == 'cuda' and x.numel() > 0 and x.device.type in ('cpu', 'cuda') and x.is_floating_point():
        plugin = _plugin()
        if plugin is not None and (x.device.type == 'cpu' or hasattr(plugin, 'bias_act_cuda')):
            if b is not None:
                assert isinstance(b, torch.Tensor) and b.ndim == 1
                assert -x.ndim <= dim < x.ndim and b.shape[0] == x.shape[dim]
                b = b.to(x.dtype)  # Like the reference: a float32 bias cannot promote x.
            dim %= max(x.ndim, 1)
            p = _Params(plugin, dim, act, spec, alpha, gain, clamp)
            if x.device.type == 'cpu' and x.dtype not in (torch.float32, torch.float64):
                b32 = None if b is None else b.float()
                return _BiasAct.apply(x.float(), b32, p).to(x.dtype)  # The CPU kernel computes in float32.
            return _BiasAct.apply(x, b, p)
    return _bias_act_ref(x, b, dim, spec, alpha, gain, clamp)

# ----------------------------------------------------------------------------
# The plugin path.


class _Params:
    def __init__(self, plugin, dim, act, spec, alpha, gain, clamp):
        self.plugin, self.dim, self.act, self.spec = plugin, dim, act, spec
        self.alpha, self.gain, self.clamp = alpha, gain, clamp
        # What the gradient reads: z = x + b for swish, y for the others (and clamped linear).
        self.ref = spec.ref or ('y' if clamp >= 0 else '')


def _layout(x, dim, has_bias):
    """(memory format, [outer, C, inner]) of the dense layout that the kernel runs on."""
    if (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
        fmt = torch.channels_last
        if has_bias and dim == 1:
            return fmt, (x.shape[0] * x.shape[2] * x.shape[3], x.shape[1], 1)
    else:
        fmt = torch.contiguous_format
        if has_bias:
            outer = int(np.prod(x.shape[:dim], dtype=np.int64))
            return fmt, (outer, x.shape[dim], int(np.prod(x.shape[dim + 1:], dtype=np.int64)))
    if has_bias:  # channels_last with the bias on another dim: run on a contiguous copy.
        return _layout(x.contiguous(), dim, has_bias)
    return fmt, (1, 1, x.numel())


def _run(mode, p, view, d=None, dy=None, r=None, b=None, want_sum=False):
    """One kernel call on dense tensors of the same layout; returns (out, per-channel sums)."""
    x0 = r if mode == 0 else d
    out = torch.empty_like(x0)
    outer, C, inner = view
    addr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    if x0.device.type == 'cpu':
        colsum = torch.empty([C], dtype=torch.float64) if want_sum else None
        p.plugin.bias_act_cpu(mode, _plugins.dtype_code(x0.dtype), p.spec.cuda_idx, out.data_ptr(), addr(colsum),
                              addr(d), addr(dy), addr(r), addr(b), outer, C, inner, p.alpha, p.gain, p.clamp)
        return out, (None if colsum is None else colsum.to(x0.dtype))
    p.plugin.bias_act_cuda(mode, _plugins.dtype_code(x0.dtype), p.spec.cuda_idx, out.data_ptr(), addr(d), addr(dy),
                           addr(r), addr(b), outer, C, inner, p.alpha, p.gain, p.clamp, _plugins.stream_of(x0))
    if not want_sum:
        return out, None
    return out, _channel_sum(out, p.dim).to(x0.dtype)


def _channel_sum(t, dim):
    dims = [i for i in range(t.ndim) if i != dim]
    return t.sum(dims, dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype)


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, p):  # pylint: disable=arguments-differ
        fmt, view = _layout(x, p.dim, b is not None)
        y, _ = _run(0, p, view, r=x.contiguous(memory_format=fmt), b=None if b is None else b.contiguous())
        ctx.p, ctx.fmt, ctx.view = p, fmt, view
        # The inputs themselves, not dense copies: second-order gradients must reach them.
        ctx.save_for_backward(x if p.ref == 'x' else None, b if p.ref == 'x' else None, y if p.ref == 'y' else None)
        return y

    @staticmethod
    def backward(ctx, dy):  # pylint: disable=arguments-differ
        x, b, y = ctx.saved_tensors
        p = ctx.p
        need_x, need_b = ctx.needs_input_grad[:2]
        if p.ref == '':  # Unclamped linear: the gradient is a constant factor.
            dx = dy * p.gain if p.gain != 1 else dy
            db = _channel_sum(dx, p.dim).to(dx.dtype) if need_b else None
            return dx, db, None
        dx, db = _BiasActGrad.apply(dy, x, b, y, p, ctx.fmt, ctx.view, need_b)
        return (dx if need_x else None), (db if need_b else None), None


class _BiasActGrad(torch.autograd.Function):
    """dx = dy * g(ref) and its bias sum; differentiable again (has_2nd_grad activations)."""

    @staticmethod
    def forward(ctx, dy, x, b, y, p, fmt, view, want_db):  # pylint: disable=arguments-differ
        dy = dy.contiguous(memory_format=fmt)
        r = (x if p.ref == 'x' else y).contiguous(memory_format=fmt)
        dx, db = _run(1, p, view, d=dy, r=r, b=None if b is None else b.contiguous(), want_sum=want_db)
        ctx.p, ctx.fmt, ctx.view = p, fmt, view
        ctx.save_for_backward(dy, x, b, y)
        if db is None:
            db = torch.empty([0], dtype=dx.dtype, device=dx.device)
        return dx, db

    @staticmethod
    def backward(ctx, ddx, ddb):  # pylint: disable=arguments-differ
        dy, x, b, y = ctx.saved_tensors
        p = ctx.p
        d = ddx
        if ddb is not None and ddb.numel():  # db = sum(dx): its gradient spreads over every element.
            shape = [-1 if i == p.dim else 1 for i in range(dy.ndim)]
            d = ddb.reshape(shape).expand(dy.shape) if d is None else d + ddb.reshape(shape)
        if d is None:
            return (None,) * 8
        d = d.contiguous(memory_format=ctx.fmt)
        d_dy = d_x = d_b = d_y = None
        if ctx.needs_input_grad[0]:
            d_dy = _BiasActGrad.apply(d, x, b, y, p, ctx.fmt, ctx.view, False)[0]
        if p.spec.has_2nd_grad and any(ctx.needs_input_grad[1:4]):
            r = (x if p.ref == 'x' else y).contiguous(memory_format=ctx.fmt)
            d_r, _ = _run(2, p, ctx.view, d=d, dy=dy.contiguous(memory_format=ctx.fmt), r=r,
                          b=None if b is None else b.contiguous())
            if p.ref == 'x':
                d_x = d_r
                d_b = _channel_sum(d_r, p.dim).to(d_r.dtype) if b is not None else None
            else:
                d_y = d_r
        return d_dy, d_x, d_b, d_y, None, None, None, None

# ----------------------------------------------------------------------------
# The reference path.


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
