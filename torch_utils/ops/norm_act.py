"""GroupNorm, SiLU and dropout in one CPU kernel (norm_act.cpp), optionally followed by a
convolution whose input is recomputed in the backward pass instead of kept.

    h = drop(silu(group_norm(x, num_groups, weight, bias, eps)))    (silu only if act)
    drop(v) = v * (keep * scale)                                    (keep=None: no dropout)

(the multiply equals where(keep, v * scale, 0) for finite v; a dropped inf or NaN gives NaN)
Denormals (below 1.2e-38) are flushed to 0 inside the kernel, which Intel cores need for speed.

The kernel reads x in its dtype (float32 or bfloat16) and writes h in `out_dtype`, so under
bf16 autocast the UNets' activations go from one convolution to the next with no float32
copies in between; the arithmetic is float32 (float64 for float64 tensors, used by the
gradient checks). Its backward pass takes x, the statistics and the mask only.

`available(x)` says whether the kernel applies (a dense CPU tensor, NCHW or channels last, in
a supported dtype; the plugin built; not inside torch.compile); h keeps x's layout. Callers
fall back to torch's ops otherwise. The dropout mask is the caller's (a bool tensor of x's
shape and strides), so the random stream is the caller's too.
"""

import torch

from . import _plugins

_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _plugin():
    return _plugins.load('norm_act_plugin', 'norm_act.cpp', None, [], with_cuda=False)


def _compiling():
    is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', None)
    return is_compiling is not None and is_compiling()


def _channels_last(x):
    """Whether x is dense NHWC (and not also NCHW, as [N, C, 1, 1] tensors are)."""
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def plugin_ready():
    """Whether the kernel is built (or loads from the cache); builds it on first call."""
    return _plugin() is not None


def available(x, out_dtype=None):
    """Whether norm_act/norm_act_conv run the kernel for input x (else callers use torch ops)."""
    out_dtype = out_dtype or x.dtype
    if x.device.type != 'cpu' or x.ndim < 2 or x.numel() == 0 or not (x.is_contiguous() or _channels_last(x)):
        return False
    if x.dtype not in _DTYPES or out_dtype not in _DTYPES or (torch.float64 in (x.dtype, out_dtype) and x.dtype != out_dtype):
        return False
    return not _compiling() and plugin_ready()


def _shape(x, num_groups):
    N, C = x.shape[0], x.shape[1]
    return N, C, x.numel() // (N * C), num_groups


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(x, weight, bias, num_groups, eps, act, keep, scale, out_dtype, stats=None):
    """h (and the statistics, computed unless given)."""
    shape = _shape(x, num_groups)
    sd = _stat_dtype(x.dtype)
    w, b = weight.detach().to(sd).contiguous(), bias.detach().to(sd).contiguous()
    if stats is None:
        mean, rstd = torch.empty([shape[0] * num_groups], dtype=sd), torch.empty([shape[0] * num_groups], dtype=sd)
    else:
        mean, rstd = stats
    out = torch.empty_like(x, dtype=out_dtype)  # x's layout
    _plugin().norm_act_forward(_plugins.dtype_code(x.dtype), _plugins.dtype_code(out_dtype), out.data_ptr(),
        mean.data_ptr(), rstd.data_ptr(), x.data_ptr(), w.data_ptr(), b.data_ptr(),
        0 if keep is None else keep.data_ptr(), *shape, float(eps), int(act), float(scale), stats is not None,
        _channels_last(x))
    return out, (mean, rstd)


def _backward(grad_h, x, weight, bias, stats, num_groups, act, keep, scale, need_x):
    """(grad_x or None, grad_weight, grad_bias) in the dtypes of x, weight and bias."""
    shape = _shape(x, num_groups)
    sd = _stat_dtype(x.dtype)
    w, b = weight.detach().to(sd).contiguous(), bias.detach().to(sd).contiguous()
    grad_h = grad_h.contiguous(memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
    grad_x = torch.empty_like(x) if need_x else None
    grad_w, grad_b = torch.empty([shape[1]], dtype=torch.float64), torch.empty([shape[1]], dtype=torch.float64)
    mean, rstd = stats
    _plugin().norm_act_backward(_plugins.dtype_code(x.dtype), _plugins.dtype_code(grad_h.dtype),
        0 if grad_x is None else grad_x.data_ptr(), grad_w.data_ptr(), grad_b.data_ptr(), grad_h.data_ptr(),
        x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), w.data_ptr(), b.data_ptr(),
        0 if keep is None else keep.data_ptr(), *shape, int(act), float(scale), _channels_last(x))
    return grad_x, grad_w.to(weight.dtype), grad_b.to(bias.dtype)


def _check_keep(keep, x):
    if keep is not None:
        assert keep.dtype == torch.bool and keep.shape == x.shape and keep.stride() == x.stride(), \
            'keep: a bool mask of x.shape in x\'s layout'


class _NormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, act, keep, scale, out_dtype):  # pylint: disable=arguments-differ
        h, stats = _forward(x, weight, bias, num_groups, eps, act, keep, scale, out_dtype)
        ctx.save_for_backward(x, weight, bias, *stats, keep)
        ctx.config = (num_groups, act, scale)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):  # pylint: disable=arguments-differ
        x, weight, bias, mean, rstd, keep = ctx.saved_tensors
        num_groups, act, scale = ctx.config
        grad_x, grad_w, grad_b = _backward(grad_h, x, weight, bias, (mean, rstd), num_groups, act, keep, scale,
            ctx.needs_input_grad[0])
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class _NormActConv(torch.autograd.Function):
    """conv2d(h, conv_weight) keeping x, the statistics and the mask; h is recomputed (one kernel
    pass) in the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv_weight, conv_bias, num_groups, eps, act, keep, scale, padding):  # pylint: disable=arguments-differ
        h, stats = _forward(x, weight, bias, num_groups, eps, act, keep, scale, conv_weight.dtype)
        ctx.save_for_backward(x, weight, bias, conv_weight, *stats, keep)
        ctx.config = (num_groups, eps, act, scale, padding, conv_bias is not None)
        with torch.autocast('cpu', enabled=False):  # h is already in the convolution's dtype.
            return torch.nn.functional.conv2d(h, conv_weight, conv_bias, padding=padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # pylint: disable=arguments-differ
        x, weight, bias, conv_weight, mean, rstd, keep = ctx.saved_tensors
        num_groups, eps, act, scale, padding, has_conv_bias = ctx.config
        need_x, need_w, need_b, need_cw, need_cb = ctx.needs_input_grad[:5]
        need_norm = need_x or need_w or need_b
        h, _ = _forward(x, weight, bias, num_groups, eps, act, keep, scale, conv_weight.dtype, stats=(mean, rstd))
        grad_h, grad_cw, grad_cb = torch.ops.aten.convolution_backward(grad.to(conv_weight.dtype), h, conv_weight,
            [conv_weight.shape[0]] if has_conv_bias else None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
            [need_norm, need_cw, need_cb and has_conv_bias])
        del h
        grad_x = grad_w = grad_b = None
        if need_norm:
            grad_x, grad_w, grad_b = _backward(grad_h, x, weight, bias, (mean, rstd), num_groups, act, keep, scale, need_x)
        return grad_x, grad_w, grad_b, grad_cw, grad_cb, None, None, None, None, None, None


def norm_act(x, weight, bias, num_groups, eps=1e-5, act=True, keep=None, scale=1.0, out_dtype=None):
    """h = drop(silu(group_norm(x))) in out_dtype (default: x's); requires available(x)."""
    _check_keep(keep, x)
    return _NormAct.apply(x, weight, bias, num_groups, eps, act, keep, scale, out_dtype or x.dtype)


def norm_act_conv(x, weight, bias, conv_weight, conv_bias=None, num_groups=32, eps=1e-5, act=True, keep=None,
        scale=1.0, padding=0):
    """conv2d(norm_act(x), conv_weight, conv_bias, padding=padding) in conv_weight's dtype, with h
    recomputed in the backward pass; requires available(x, conv_weight.dtype)."""
    _check_keep(keep, x)
    if not torch.is_grad_enabled():
        h, _ = _forward(x, weight, bias, num_groups, eps, act, keep, scale, conv_weight.dtype)
        with torch.autocast('cpu', enabled=False):
            return torch.nn.functional.conv2d(h, conv_weight, conv_bias, padding=padding)
    return _NormActConv.apply(x, weight, bias, conv_weight, conv_bias, num_groups, eps, act, keep, scale, padding)
