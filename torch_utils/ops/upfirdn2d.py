"""Upsample, FIR-filter and downsample 2-D images (`upfirdn2d`) and its wrappers.

Per channel of an NCHW tensor: insert `up-1` zeros after every pixel, pad (negative
padding crops), convolve with the filter (true convolution unless `flip_filter`), and
keep every `down`-th pixel. A 1-D filter is separable: it runs along W, then along H.

`impl='cuda'` (the default) runs the compiled polyphase plugin (upfirdn2d.cpp on the CPU,
upfirdn2d_cuda.cu on CUDA) when it builds, else the pure-PyTorch reference `_upfirdn2d_ref`;
`impl='ref'` always runs the reference. The gradient is the transposed op, itself an
upfirdn2d, so the plugin path is differentiable to any order.
"""

import operator

import torch
import torch.nn.functional as F

from . import _plugins

# ----------------------------------------------------------------------------
# Argument parsing.


def _parse_scaling(scaling):
    """int or [sx, sy] -> (sx, sy)."""
    if not isinstance(scaling, (list, tuple)):
        scaling = [scaling, scaling]
    assert len(scaling) == 2, 'scaling must be an int or [x, y]'
    sx, sy = (operator.index(s) for s in scaling)
    assert sx >= 1 and sy >= 1
    return sx, sy


def _parse_padding(padding):
    """int, [px, py] or [x0, x1, y0, y1] -> (x0, x1, y0, y1)."""
    if not isinstance(padding, (list, tuple)):
        padding = [padding, padding]
    if len(padding) == 2:
        px, py = padding
        padding = [px, px, py, py]
    assert len(padding) == 4, 'padding must be an int, [x, y] or [x0, x1, y0, y1]'
    return tuple(operator.index(p) for p in padding)


def _get_filter_size(f):
    """(width, height) of a filter; None is the 1x1 identity."""
    if f is None:
        return 1, 1
    assert isinstance(f, torch.Tensor) and f.ndim in (1, 2)
    return int(f.shape[-1]), int(f.shape[0])

# ----------------------------------------------------------------------------
# Filter construction.


def setup_filter(f, device=torch.device('cpu'), normalize=True, flip_filter=False, gain=1, separable=None):
    """Turn filter taps into the float32 tensor that `upfirdn2d` expects.

    A 1-D filter stays 1-D (separable) if `separable`, or by default when it has at
    least 8 taps; otherwise it becomes the outer product with itself. The result is
    normalized to sum 1, optionally flipped, and scaled by `gain**(ndim/2)` so that the
    whole 2-D filtering multiplies by `gain`.
    """
    f = torch.as_tensor(1 if f is None else f, dtype=torch.float32)
    assert f.ndim in (0, 1, 2) and f.numel() > 0
    if f.ndim == 0:
        f = f.reshape([1])
    if separable is None:
        separable = (f.ndim == 1 and f.numel() >= 8)
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    assert f.ndim == (1 if separable else 2)
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)

# ----------------------------------------------------------------------------
# The operation.


def _plugin(with_cuda=None):
    return _plugins.load('upfirdn2d_plugin', 'upfirdn2d.cpp', 'upfirdn2d_cuda.cu', ['upfirdn2d_cuda.h', 'cuda_common.cuh'],
                         with_cuda)


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Upsample by zero insertion, pad, FIR-filter and downsample each channel of `x`.

    `up`/`down` are an int or [x, y]; `padding` is an int, [x, y] or [x0, x1, y0, y1],
    relative to the upsampled image. `f` is a float32 filter from `setup_filter` (or None
    for identity), scaled here by `gain**(f.ndim/2)` per pass. The output width is
    `(W*up + x0 + x1 - fw) // down + 1`, likewise for the height.
    """
    assert isinstance(x, torch.Tensor)
    assert impl in ('ref', 'cuda')
    if impl == 'cuda' and x.device.type in ('cpu', 'cuda') and x.is_floating_point() and x.ndim == 4 and x.numel():
        plugin = _plugin()
        if plugin is not None and (x.device.type == 'cpu' or hasattr(plugin, 'upfirdn2d_cuda')):
            return _upfirdn2d_plugin(plugin, x, f, up, down, padding, flip_filter, gain)
    return _upfirdn2d_ref(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)

# ----------------------------------------------------------------------------
# The plugin path.


class _Params:
    def __init__(self, plugin, upx, upy, downx, downy, pads, flip, gain):
        self.plugin, self.upx, self.upy, self.downx, self.downy = plugin, upx, upy, downx, downy
        self.pads, self.flip, self.gain = pads, flip, gain

    def transposed(self, in_hw, out_hw, fw, fh):
        """The op whose output is the gradient of this one's input (1-D, per axis: the taps
        swap sides, so p0' = k - 1 - p0, and p1' is what makes the length come out right)."""
        (h, w), (oh, ow) = in_hw, out_hw
        x0, _, y0, _ = self.pads
        pads = (fw - 1 - x0, w * self.upx - ow * self.downx + x0 - self.upx + 1,
                fh - 1 - y0, h * self.upy - oh * self.downy + y0 - self.upy + 1)
        return _Params(self.plugin, self.downx, self.downy, self.upx, self.upy, pads, not self.flip, self.gain)


def _upfirdn2d_plugin(plugin, x, f, up, down, padding, flip_filter, gain):
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    assert isinstance(f, torch.Tensor) and f.ndim in (1, 2) and f.dtype == torch.float32
    assert not f.requires_grad
    upx, upy = _parse_scaling(up)
    downx, downy = _parse_scaling(down)
    q = _Params(plugin, upx, upy, downx, downy, _parse_padding(padding), bool(flip_filter), float(gain))
    if x.device.type == 'cpu' and x.dtype not in (torch.float32, torch.float64):
        return _Upfirdn2d.apply(x.float(), f, q).to(x.dtype)  # The CPU kernel computes in float32.
    return _Upfirdn2d.apply(x, f, q)


def _upfirdn2d_call(x, f, q):
    if x.device.type == 'cuda' and f.ndim == 1:  # The CUDA kernel takes 2-D taps: W, then H.
        x0, x1, y0, y1 = q.pads
        g = q.gain ** 0.5
        x = _upfirdn2d_call(x, f[None, :], _Params(q.plugin, q.upx, 1, q.downx, 1, (x0, x1, 0, 0), q.flip, g))
        return _upfirdn2d_call(x, f[:, None], _Params(q.plugin, 1, q.upy, 1, q.downy, (0, 0, y0, y1), q.flip, g))
    n, c, h, w = x.shape
    fw, fh = _get_filter_size(f)
    x0, x1, y0, y1 = q.pads
    assert h * q.upy + y0 + y1 >= fh and w * q.upx + x0 + x1 >= fw, 'padded image is smaller than the filter'
    oh = (h * q.upy + y0 + y1 - fh) // q.downy + 1
    ow = (w * q.upx + x0 + x1 - fw) // q.downx + 1
    x = x.contiguous()
    f = f.to(x.device).contiguous()
    y = torch.empty([n, c, oh, ow], dtype=x.dtype, device=x.device)
    args = (y.data_ptr(), x.data_ptr(), f.data_ptr(), _plugins.dtype_code(x.dtype), n * c, h, w, fh, fw,
            int(f.ndim == 1), q.upx, q.upy, q.downx, q.downy, x0, x1, y0, y1, oh, ow, int(q.flip), q.gain)
    if x.device.type == 'cpu':
        q.plugin.upfirdn2d_cpu(*args)
    else:
        q.plugin.upfirdn2d_cuda(*args, _plugins.stream_of(x))
    return y


class _Upfirdn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, q):  # pylint: disable=arguments-differ
        y = _upfirdn2d_call(x, f, q)
        ctx.save_for_backward(f)
        ctx.q, ctx.in_hw, ctx.out_hw = q, tuple(x.shape[2:]), tuple(y.shape[2:])
        return y

    @staticmethod
    def backward(ctx, dy):  # pylint: disable=arguments-differ
        (f,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        fw, fh = _get_filter_size(f)
        return _Upfirdn2d.apply(dy, f, ctx.q.transposed(ctx.in_hw, ctx.out_hw, fw, fh)), None, None

# ----------------------------------------------------------------------------
# The reference path.


def _zero_insert(x, upx, upy):
    """Insert upx-1 / upy-1 zeros after every pixel along W / H."""
    if upx == 1 and upy == 1:
        return x
    n, c, h, w = x.shape
    x = x.reshape(n, c, h, 1, w, 1)
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    return x.reshape(n, c, h * upy, w * upx)


def _upfirdn2d_ref(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    assert isinstance(x, torch.Tensor) and x.ndim == 4
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    assert isinstance(f, torch.Tensor) and f.ndim in (1, 2) and f.dtype == torch.float32
    assert not f.requires_grad
    c = x.shape[1]
    upx, upy = _parse_scaling(up)
    downx, downy = _parse_scaling(down)
    pads = _parse_padding(padding)
    fw, fh = _get_filter_size(f)

    x = _zero_insert(x, upx, upy)
    if any(pads):
        x = F.pad(x, list(pads))  # Negative entries crop.
    assert x.shape[2] >= fh and x.shape[3] >= fw, 'padded image is smaller than the filter'

    # Scale in at least float32, then match x. conv2d correlates, so flip for true convolution.
    f = (f.to(torch.promote_types(f.dtype, x.dtype)) * (gain ** (f.ndim / 2))).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))

    # One grouped (depthwise) convolution per pass, decimating through the stride: several
    # times faster than filtering n*c single-channel images.
    if f.ndim == 2:
        return F.conv2d(x, f[None, None].expand(c, 1, fh, fw).contiguous(), stride=[downy, downx], groups=c)
    x = F.conv2d(x, f[None, None, None, :].expand(c, 1, 1, fw).contiguous(), stride=[1, downx], groups=c)
    return F.conv2d(x, f[None, None, :, None].expand(c, 1, fh, 1).contiguous(), stride=[downy, 1], groups=c)

# ----------------------------------------------------------------------------
# Wrappers that pick the padding for the common cases.


def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Filter without changing the image size (plus `padding`)."""
    x0, x1, y0, y1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    pads = [x0 + fw // 2, x1 + (fw - 1) // 2, y0 + fh // 2, y1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=pads, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Upsample by `up`, keeping the image centred; the gain compensates the inserted zeros."""
    upx, upy = _parse_scaling(up)
    x0, x1, y0, y1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    pads = [x0 + (fw + upx - 1) // 2, x1 + (fw - upx) // 2,
            y0 + (fh + upy - 1) // 2, y1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=up, padding=pads, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Downsample by `down`, keeping the image centred."""
    downx, downy = _parse_scaling(down)
    x0, x1, y0, y1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    pads = [x0 + (fw - downx + 1) // 2, x1 + (fw - downx) // 2,
            y0 + (fh - downy + 1) // 2, y1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=down, padding=pads, flip_filter=flip_filter, gain=gain, impl=impl)
