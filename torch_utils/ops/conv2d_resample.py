"""2-D convolution with optional FIR upsampling and downsampling around it.

Semantics (the "generic route"): pad once relative to the upsampled image, then

    x = upfirdn2d(x, f if up > 1 else None, up=up, padding=pads, gain=up**2)
    x = conv2d(x, w, groups)        # correlation; w flipped first if not flip_weight
    x = upfirdn2d(x, f, down=down)  # only if down > 1

where `pads` adds to `padding` what keeps the image centred for the given filter.
Because convolution and FIR filtering commute, the same result is computed more
cheaply by reordering the steps (see `conv2d_resample`).
"""

import torch

from . import conv2d_gradfix
from .upfirdn2d import _get_filter_size, _parse_padding, upfirdn2d


def _conv(x, w, stride=1, padding=0, groups=1, flip_weight=True):
    """conv2d; `flip_weight=False` turns the correlation into a true convolution."""
    if not flip_weight and (w.shape[2] > 1 or w.shape[3] > 1):
        w = w.flip([2, 3])
    return conv2d_gradfix.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def _resample_padding(padding, f, up, down):
    """Add the centring padding for `up` and `down` to `padding` -> [x0, x1, y0, y1]."""
    x0, x1, y0, y1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    if up > 1:
        x0, x1 = x0 + (fw + up - 1) // 2, x1 + (fw - up) // 2
        y0, y1 = y0 + (fh + up - 1) // 2, y1 + (fh - up) // 2
    if down > 1:
        x0, x1 = x0 + (fw - down + 1) // 2, x1 + (fw - down) // 2
        y0, y1 = y0 + (fh - down + 1) // 2, y1 + (fh - down) // 2
    return [x0, x1, y0, y1]


def _conv_transpose_up(x, w, up, pads, groups, flip_weight):
    """Zero-insert upsampling by `up` followed by convolution with `w`, as one transposed conv.

    Returns the result and the padding still to apply before the FIR filter.

    In 1-D, with true-convolution kernel k of size K: zero-insert, pad [p0, p1], then
    convolve with f and k (valid) equals conv_transpose(x, k, stride=up), whose output is
    the full convolution of the zero-inserted signal (without the trailing up-1 zeros),
    then padded by [p0 - (K-1), p1 + (up-1) - (K-1)] and convolved with f (valid).
    A symmetric crop in that padding is done by the transposed conv's own `padding`.
    """
    out_channels, in_per_group, kh, kw = w.shape
    if flip_weight:  # Correlation kernel -> true-convolution kernel.
        w = w.flip([2, 3])
    # [out, in/g, kh, kw] -> [in, out/g, kh, kw], the layout conv_transpose2d expects.
    w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)

    x0, x1, y0, y1 = pads
    x0, x1 = x0 - (kw - 1), x1 - (kw - up)
    y0, y1 = y0 - (kh - 1), y1 - (kh - up)
    cx = max(min(-x0, -x1), 0)
    cy = max(min(-y0, -y1), 0)
    x = conv2d_gradfix.conv_transpose2d(x, w, stride=up, padding=[cy, cx], groups=groups)
    return x, [x0 + cx, x1 + cx, y0 + cy, y1 + cy]


def _conv2d_resample_generic(x, w, f, up, down, pads, groups, flip_weight, flip_filter):
    """The defining composition, step by step."""
    x = upfirdn2d(x, f if up > 1 else None, up=up, padding=pads, gain=up ** 2, flip_filter=flip_filter)
    x = _conv(x, w, groups=groups, flip_weight=flip_weight)
    if down > 1:
        x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
    return x


def conv2d_resample(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True, flip_filter=False):
    """Upsample `x` by `up` with filter `f`, convolve with `w`, downsample by `down` with `f`.

    `x`: [N, C, H, W]; `w`: [O, C/groups, kh, kw] of the same dtype; `f`: float32 1-D/2-D
    filter or None; `padding` (int, [x, y] or [x0, x1, y0, y1]) is relative to the upsampled
    image. `flip_weight=True` correlates like F.conv2d; False convolves.
    """
    assert isinstance(x, torch.Tensor) and x.ndim == 4
    assert isinstance(w, torch.Tensor) and w.ndim == 4 and w.dtype == x.dtype
    assert f is None or (isinstance(f, torch.Tensor) and f.ndim in (1, 2) and f.dtype == torch.float32)
    for value in (up, down, groups):
        assert isinstance(value, int) and value >= 1
    kh, kw = w.shape[2], w.shape[3]
    pads = _resample_padding(padding, f, up, down)
    x0, x1, y0, y1 = pads

    # A 1x1 conv commutes with every resampling step: run it on the smaller image.
    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = upfirdn2d(x, f, down=down, padding=pads, flip_filter=flip_filter)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d(x, f, up=up, padding=pads, gain=up ** 2, flip_filter=flip_filter)

    # Down only: filter first, then decimate through the conv stride.
    if down > 1 and up == 1:
        x = upfirdn2d(x, f, padding=pads, flip_filter=flip_filter)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)

    # Up: transposed conv does the zero insertion and the conv, then the FIR filter.
    if up > 1:
        x, rest = _conv_transpose_up(x, w, up, pads, groups, flip_weight)
        x = upfirdn2d(x, f, padding=rest, gain=up ** 2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x

    # No resampling: conv2d pads by itself when the padding is symmetric and non-negative.
    if x0 == x1 and y0 == y1 and x0 >= 0 and y0 >= 0:
        return _conv(x, w, padding=[y0, x0], groups=groups, flip_weight=flip_weight)

    return _conv2d_resample_generic(x, w, f, up, down, pads, groups, flip_weight, flip_filter)
