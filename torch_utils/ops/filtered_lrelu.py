"""Bias, upsample, leaky ReLU, clamp and downsample in one call (StyleGAN3 layers).

On CUDA with `impl='cuda'` (the default) a fused kernel (filtered_lrelu_cuda.cu) runs the
forward pass without writing the upsampled image; its gradient composes the upfirdn2d
plugin with a per-pixel sign/clamp byte. Elsewhere the reference composition runs, on the
bias_act and upfirdn2d plugins unless `impl='ref'`.
"""

import numpy as np
import torch

from . import _plugins
from . import upfirdn2d as _upfirdn2d_mod
from .bias_act import bias_act
from .upfirdn2d import _get_filter_size, _parse_padding, upfirdn2d


def filtered_lrelu(x, fu=None, fd=None, b=None, up=1, down=1, padding=0, gain=np.sqrt(2), slope=0.2,
                   clamp=None, flip_filter=False, impl='cuda'):
    """Return `upfirdn2d(clamp(lrelu(upfirdn2d(x + b, fu, up, padding)) * gain), fd, down)`.

    `fu`/`fd`: upsampling/downsampling filters (None, 1-D separable or 2-D float32);
    `padding` (int, [x, y] or [x0, x1, y0, y1]) applies to the upsampled image; the
    upsampling filter gets gain `up**2` to make up for the inserted zeros.
    """
    assert isinstance(x, torch.Tensor) and x.ndim == 4
    assert impl in ('ref', 'cuda')
    assert isinstance(up, int) and up >= 1
    assert isinstance(down, int) and down >= 1
    assert b is None or (isinstance(b, torch.Tensor) and b.ndim == 1 and b.shape[0] == x.shape[1])
    gain, slope = float(gain), float(slope)
    assert gain > 0, 'gain must be positive'
    assert slope >= 0, 'slope must be non-negative'
    assert clamp is None or float(clamp) >= 0, 'clamp must be None or non-negative'
    x0, x1, y0, y1 = _parse_padding(padding)
    out_size = _output_size(x, fu, fd, up, down, (x0, x1, y0, y1))

    if impl == 'cuda' and x.device.type == 'cuda' and x.is_floating_point():
        plugin, ud_plugin = _plugin(), _upfirdn2d_mod._plugin()
        if plugin is not None and ud_plugin is not None and hasattr(plugin, 'filtered_lrelu_cuda'):
            q = _Params(plugin, ud_plugin, up, down, (x0, x1, y0, y1), gain, slope,
                        -1.0 if clamp is None else float(clamp), bool(flip_filter))
            y = _FilteredLrelu.apply(x, None if b is None else b.to(x.dtype), _taps(fu, x), _taps(fd, x), q)
            assert tuple(y.shape[2:]) == out_size
            return y

    x = bias_act(x, b, impl=impl)
    x = upfirdn2d(x, fu, up=up, padding=[x0, x1, y0, y1], gain=up ** 2, flip_filter=flip_filter, impl=impl)
    x = bias_act(x, act='lrelu', alpha=slope, gain=gain, clamp=clamp, impl=impl)
    x = upfirdn2d(x, fd, down=down, flip_filter=flip_filter, impl=impl)
    assert tuple(x.shape[2:]) == out_size
    return x


def _output_size(x, fu, fd, up, down, pads):
    """(height, width) of the result."""
    x0, x1, y0, y1 = pads
    fu_w, fu_h = _get_filter_size(fu)
    fd_w, fd_h = _get_filter_size(fd)
    width = (x.shape[3] * up + x0 + x1 - (fu_w - 1) - (fd_w - 1) + (down - 1)) // down
    height = (x.shape[2] * up + y0 + y1 - (fu_h - 1) - (fd_h - 1) + (down - 1)) // down
    return height, width


# ----------------------------------------------------------------------------
# The CUDA plugin path.


def _plugin(with_cuda=None):
    return _plugins.load('filtered_lrelu_plugin', 'filtered_lrelu.cpp', 'filtered_lrelu_cuda.cu',
                         ['filtered_lrelu_cuda.h', 'cuda_common.cuh'], with_cuda)


def _taps(f, x):
    """The 2-D float32 filter on x's device (a 1-D filter is separable: its outer product)."""
    if f is None:
        return torch.ones([1, 1], dtype=torch.float32, device=x.device)
    assert isinstance(f, torch.Tensor) and f.dtype == torch.float32 and not f.requires_grad
    f = f.to(x.device)
    return (torch.outer(f, f) if f.ndim == 1 else f).contiguous()


class _Params:
    def __init__(self, plugin, ud_plugin, up, down, pads, gain, slope, clamp, flip):
        self.plugin, self.ud_plugin, self.up, self.down, self.pads = plugin, ud_plugin, up, down, pads
        self.gain, self.slope, self.clamp, self.flip = gain, slope, clamp, flip


class _FilteredLrelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, fu, fd, q):  # pylint: disable=arguments-differ
        n, c, h, w = x.shape
        x0, x1, y0, y1 = q.pads
        th, tw = h * q.up + y0 + y1 - fu.shape[0] + 1, w * q.up + x0 + x1 - fu.shape[1] + 1
        oh, ow = (th - fd.shape[0]) // q.down + 1, (tw - fd.shape[1]) // q.down + 1
        assert th >= fd.shape[0] and tw >= fd.shape[1], 'padded image is smaller than the filters'
        x = x.contiguous()
        y = torch.empty([n, c, oh, ow], dtype=x.dtype, device=x.device)
        need_grad = any(ctx.needs_input_grad[:2])
        mask = torch.empty([n, c, th, tw], dtype=torch.uint8, device=x.device) if need_grad else None
        q.plugin.filtered_lrelu_cuda(
            y.data_ptr(), 0 if mask is None else mask.data_ptr(), x.data_ptr(), 0 if b is None else b.contiguous().data_ptr(),
            fu.data_ptr(), fd.data_ptr(), _plugins.dtype_code(x.dtype), n * c, c, h, w, fu.shape[0], fu.shape[1],
            fd.shape[0], fd.shape[1], q.up, q.down, x0, y0, th, tw, oh, ow, q.gain, q.slope, q.clamp, int(q.flip),
            _plugins.stream_of(x))
        ctx.save_for_backward(fu, fd, mask)
        ctx.q, ctx.hw = q, (h, w, th, tw, oh, ow)
        return y

    @staticmethod
    def backward(ctx, dy):  # pylint: disable=arguments-differ
        fu, fd, mask = ctx.saved_tensors
        q = ctx.q
        h, w, th, tw, oh, ow = ctx.hw
        P = _upfirdn2d_mod._Params  # pylint: disable=invalid-name
        # Through the downsampling, the activation (a fixed per-pixel factor) and the upsampling:
        # upfirdn2d plugin calls, so this gradient is itself differentiable in dy.
        down = P(q.ud_plugin, 1, 1, q.down, q.down, (0, 0, 0, 0), q.flip, 1.0)
        t = _upfirdn2d_mod._Upfirdn2d.apply(dy, fd, down.transposed((th, tw), (oh, ow), fd.shape[1], fd.shape[0]))
        lut = torch.tensor([q.gain * q.slope, q.gain, 0, 0], dtype=t.dtype, device=t.device)
        t = t * lut[mask.long()]
        up = P(q.ud_plugin, q.up, q.up, 1, 1, q.pads, q.flip, float(q.up ** 2))
        dx = _upfirdn2d_mod._Upfirdn2d.apply(t, fu, up.transposed((h, w), (th, tw), fu.shape[1], fu.shape[0]))
        db = dx.sum([0, 2, 3]) if ctx.needs_input_grad[1] else None
        return dx, db, None, None, None
