"""Bias, upsample, leaky ReLU, clamp and downsample in one call (StyleGAN3 layers).

Only the pure-PyTorch reference path exists; `impl` is accepted for API compatibility.
"""

import numpy as np
import torch

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
