"""Upsample, FIR-filter and downsample 2-D images (`upfirdn2d`) and its wrappers.

Per channel of an NCHW tensor: insert `up-1` zeros after every pixel, pad (negative
padding crops), convolve with the filter (true convolution unless `flip_filter`), and
keep every `down`-th pixel. A 1-D filter is separable: it runs along W, then along H.
Only a pure-PyTorch path exists; `impl` is accepted for API compatibility.
"""

import operator

import torch
import torch.nn.functional as F

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


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Upsample by zero insertion, pad, FIR-filter and downsample each channel of `x`.

    `up`/`down` are an int or [x, y]; `padding` is an int, [x, y] or [x0, x1, y0, y1],
    relative to the upsampled image. `f` is a float32 filter from `setup_filter` (or None
    for identity), scaled here by `gain**(f.ndim/2)` per pass. The output width is
    `(W*up + x0 + x1 - fw) // down + 1`, likewise for the height.
    """
    assert isinstance(x, torch.Tensor)
    assert impl in ('ref', 'cuda')
    return _upfirdn2d_ref(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)


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
    n, c = x.shape[:2]
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

    # Filter all channels as one batch of single-channel images; decimate via the stride.
    x = x.reshape(n * c, 1, x.shape[2], x.shape[3])
    if f.ndim == 2:
        x = F.conv2d(x, f[None, None], stride=[downy, downx])
    else:
        x = F.conv2d(x, f[None, None, None, :], stride=[1, downx])
        x = F.conv2d(x, f[None, None, :, None], stride=[downy, 1])
    return x.reshape(n, c, x.shape[2], x.shape[3])

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
