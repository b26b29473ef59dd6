"""Tests for torch_utils.ops against straightforward float64 reference computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_utils.ops import bias_act, conv2d_gradfix, conv2d_resample, filtered_lrelu, fma, grid_sample_gradfix
from torch_utils.ops import upfirdn2d


@pytest.fixture(autouse=True, scope='module')
def single_thread():
    """The tensors here are tiny; intra-op threads only add overhead (badly so on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

# ----------------------------------------------------------------------------
# Naive references (numpy, float64, explicit loops).


def np64(t):
    return t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def kernel2d(f):
    """The 2-D kernel a filter stands for: a 1-D filter f is separable, i.e. outer(f, f)."""
    if f is None:
        return np.ones((1, 1))
    f = np64(f)
    return np.outer(f, f) if f.ndim == 1 else f


def naive_upfirdn2d(x, k, up=(1, 1), down=(1, 1), pad=(0, 0, 0, 0), flip_filter=False, gain=1.0):
    """x: [N, C, H, W] array; k: 2-D kernel; up/down: (x, y); pad: (x0, x1, y0, y1)."""
    x = np64(x)
    k = np64(k)
    n, c, h, w = x.shape
    (ux, uy), (dx, dy), (x0, x1, y0, y1) = up, down, pad

    # 1. Zero insertion: every pixel followed by u-1 zeros.
    u = np.zeros((n, c, h * uy, w * ux))
    for i in range(h):
        for j in range(w):
            u[:, :, i * uy, j * ux] = x[:, :, i, j]

    # 2. Pad / crop: padded pixel (i, j) shows upsampled pixel (i - y0, j - x0).
    hp, wp = h * uy + y0 + y1, w * ux + x0 + x1
    v = np.zeros((n, c, hp, wp))
    for i in range(hp):
        for j in range(wp):
            si, sj = i - y0, j - x0
            if 0 <= si < h * uy and 0 <= sj < w * ux:
                v[:, :, i, j] = u[:, :, si, sj]

    # 3. Valid true convolution: out[i, j] = sum_ab k[a, b] v[i + kh-1-a, j + kw-1-b].
    kh, kw = k.shape
    out = np.zeros((n, c, hp - kh + 1, wp - kw + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            for a in range(kh):
                for b in range(kw):
                    if flip_filter:  # Correlation instead.
                        out[:, :, i, j] += k[a, b] * v[:, :, i + a, j + b]
                    else:
                        out[:, :, i, j] += k[a, b] * v[:, :, i + kh - 1 - a, j + kw - 1 - b]

    # 4. Decimation, starting at index 0.
    return out[:, :, ::dy, ::dx] * gain


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np64(actual), np64(expected), rtol=tol, atol=tol)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def rand_filter(*shape, seed=1):
    """Random, asymmetric float32 filter taps (normalized by the absolute sum)."""
    f = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) - 0.3
    return (f / f.abs().sum()).float()

# ----------------------------------------------------------------------------
# setup_filter.


def test_setup_filter_values():
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    assert f.dtype == torch.float32 and f.shape == (4, 4)
    expected = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64
    assert np.array_equal(f.numpy(), expected.astype(np.float32))

    g = upfirdn2d.setup_filter([1, 3, 3, 1], gain=4)
    assert np.array_equal(g.numpy(), (expected * 4).astype(np.float32))
    g = upfirdn2d.setup_filter([1, 2, 3], flip_filter=True, normalize=False)
    assert np.array_equal(g.numpy(), np.outer([3, 2, 1], [3, 2, 1]))
    g = upfirdn2d.setup_filter([[1, 2], [3, 4]], flip_filter=True, normalize=False)
    assert np.array_equal(g.numpy(), [[4, 3], [2, 1]])


def test_setup_filter_separable_rule():
    taps8 = np.arange(1, 9, dtype=np.float64)
    f = upfirdn2d.setup_filter(taps8)
    assert f.shape == (8,)
    np.testing.assert_allclose(f.numpy(), taps8 / taps8.sum(), rtol=1e-7)
    assert upfirdn2d.setup_filter(taps8, separable=False).shape == (8, 8)
    assert upfirdn2d.setup_filter([1, 2, 1], separable=True).shape == (3,)
    # A separable filter gets sqrt(gain) per pass.
    g = upfirdn2d.setup_filter(taps8, gain=9)
    np.testing.assert_allclose(g.numpy(), 3 * taps8 / taps8.sum(), rtol=1e-6)
    with pytest.raises(AssertionError):
        upfirdn2d.setup_filter([[1, 2], [3, 4]], separable=True)


def test_setup_filter_scalars_and_inputs():
    assert np.array_equal(upfirdn2d.setup_filter(None).numpy(), [[1]])
    assert np.array_equal(upfirdn2d.setup_filter(5).numpy(), [[1]])
    assert np.array_equal(upfirdn2d.setup_filter(5, normalize=False).numpy(), [[25]])  # outer([5], [5])
    taps = torch.tensor([1.0, 2.0, 1.0])
    upfirdn2d.setup_filter(taps, separable=True, flip_filter=True, gain=2)
    assert taps.tolist() == [1.0, 2.0, 1.0], 'the input tensor must not be modified'
    assert upfirdn2d.setup_filter([1, 1], device='cpu').device.type == 'cpu'

# ----------------------------------------------------------------------------
# upfirdn2d.


UPFIRDN_CASES = [
    # x shape,     filter,                   up,     down,   padding,          flip,  gain
    ((2, 3, 7, 9), rand_filter(3, 4),        1,      1,      0,                False, 1),
    ((1, 2, 5, 6), rand_filter(4, 4),        2,      1,      [2, 1, 2, 1],     False, 4),
    ((1, 2, 5, 4), rand_filter(3, 5),        [2, 3], [1, 2], [1, -2, 3, 0],    True,  1),
    ((2, 1, 8, 7), rand_filter(2, 3),        1,      1,      [-1, -2, -3, 0],  False, 0.5),
    ((1, 2, 9, 8), rand_filter(6),           1,      [3, 2], [1, 2],           True,  2.5),
    ((1, 2, 4, 5), rand_filter(5),           [3, 1], 2,      [4, -1, 0, 2],    False, 0.7),
    ((1, 1, 5, 6), None,                     2,      3,      1,                False, 3),
    ((1, 2, 6, 5), rand_filter(4),           2,      2,      2,                True,  1),
    ((1, 1, 6, 6), rand_filter(3, 3),        [1, 2], [2, 1], [0, 0, -2, 1],    True,  1),
]


def _expand(value, n):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _pads(padding):
    p = _expand(padding, 2)
    return (p[0], p[0], p[1], p[1]) if len(p) == 2 else p


@pytest.mark.parametrize('shape, f, up, down, padding, flip, gain', UPFIRDN_CASES)
def test_upfirdn2d_matches_naive(shape, f, up, down, padding, flip, gain):
    x = randn(*shape, dtype=torch.float64)
    expected = naive_upfirdn2d(x, kernel2d(f), _expand(up, 2), _expand(down, 2), _pads(padding), flip, gain)
    kwargs = dict(up=up, down=down, padding=padding, flip_filter=flip, gain=gain)
    y64 = upfirdn2d.upfirdn2d(x, f, **kwargs)
    y32 = upfirdn2d.upfirdn2d(x.float(), f, **kwargs)
    assert y64.dtype == torch.float64 and y32.dtype == torch.float32
    assert y64.shape == expected.shape
    assert_close(y64, expected, 1e-7)  # The filter itself is float32.
    assert_close(y32, expected, 1e-6)


def test_upfirdn2d_output_size_formula():
    x = randn(1, 1, 11, 13)
    f = rand_filter(3, 5)
    y = upfirdn2d.upfirdn2d(x, f, up=[2, 3], down=[3, 2], padding=[1, 2, -1, 4])
    w = (13 * 2 + 1 + 2 - 5) // 3 + 1
    h = (11 * 3 - 1 + 4 - 3) // 2 + 1
    assert y.shape == (1, 1, h, w)


def test_upfirdn2d_separable_equals_outer():
    x = randn(2, 3, 9, 7)
    f = rand_filter(5)
    for kwargs in [dict(), dict(up=2, padding=[2, 1, 0, 3], gain=4), dict(down=[2, 3], flip_filter=True)]:
        y_2d = upfirdn2d.upfirdn2d(x, torch.outer(f, f), **kwargs)
        assert_close(upfirdn2d.upfirdn2d(x, f, **kwargs), y_2d, 1e-6)


def test_upfirdn2d_asserts():
    x = randn(1, 1, 4, 4)
    with pytest.raises(AssertionError):
        upfirdn2d.upfirdn2d(x, rand_filter(3).double())  # Filter must be float32.
    with pytest.raises(AssertionError):
        upfirdn2d.upfirdn2d(x, rand_filter(3).requires_grad_())
    with pytest.raises(AssertionError):
        upfirdn2d.upfirdn2d(x[0], rand_filter(3))  # x must be 4-D.
    with pytest.raises(AssertionError):
        upfirdn2d.upfirdn2d(x, rand_filter(3), padding=-1)  # 2x2 image, 3-tap filter.
    with pytest.raises(AssertionError):
        upfirdn2d.upfirdn2d(x, None, impl='nope')
    upfirdn2d.upfirdn2d(x, None, impl='ref')


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_upfirdn2d_low_precision(dtype):
    x = randn(1, 2, 6, 6)
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    y = upfirdn2d.upsample2d(x.to(dtype), f)
    assert y.dtype == dtype
    assert_close(y.float(), upfirdn2d.upsample2d(x, f), 3e-2)


def test_upfirdn2d_gradients():
    x = randn(1, 2, 4, 5, dtype=torch.float64).requires_grad_()
    for f, kwargs in [(rand_filter(3, 2), dict(up=2, down=[1, 2], padding=[1, -1, 2, 0])),
                      (rand_filter(3), dict(up=[1, 2], down=2, padding=1, flip_filter=True, gain=2))]:
        fn = lambda t: upfirdn2d.upfirdn2d(t, f, **kwargs)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


def _wrapper_case():
    # Odd and even filter sizes, so that each `//2` in the padding formulas matters.
    return randn(2, 3, 8, 10, dtype=torch.float64), rand_filter(4, 3), [1, 0, -1, 2]


def test_filter2d_matches_padding_formula():
    x, f, (x0, x1, y0, y1) = _wrapper_case()
    fh, fw = f.shape
    pads = (x0 + fw // 2, x1 + (fw - 1) // 2, y0 + fh // 2, y1 + (fh - 1) // 2)
    y = upfirdn2d.filter2d(x, f, padding=[x0, x1, y0, y1], gain=2)
    assert_close(y, naive_upfirdn2d(x, f, pad=pads, gain=2), 1e-7)
    assert upfirdn2d.filter2d(x, f).shape == x.shape
    assert upfirdn2d.filter2d(x, rand_filter(5)).shape == x.shape


def test_upsample2d_matches_padding_formula():
    x, f, (x0, x1, y0, y1) = _wrapper_case()
    fh, fw = f.shape
    ux, uy = 2, 3
    pads = (x0 + (fw + ux - 1) // 2, x1 + (fw - ux) // 2, y0 + (fh + uy - 1) // 2, y1 + (fh - uy) // 2)
    y = upfirdn2d.upsample2d(x, f, up=[ux, uy], padding=[x0, x1, y0, y1], flip_filter=True, gain=0.5)
    assert_close(y, naive_upfirdn2d(x, f, up=(ux, uy), pad=pads, flip_filter=True, gain=0.5 * ux * uy), 1e-7)
    f4 = upfirdn2d.setup_filter([1, 3, 3, 1])
    y = upfirdn2d.upsample2d(x, f4)
    assert y.shape == (2, 3, 16, 20)
    # With the gain, a constant image stays constant away from the borders.
    y = upfirdn2d.upsample2d(torch.ones(1, 1, 6, 6), f4)
    assert_close(y[:, :, 2:-2, 2:-2], torch.ones(1, 1, 8, 8), 1e-6)


def test_downsample2d_matches_padding_formula():
    x, f, (x0, x1, y0, y1) = _wrapper_case()
    fh, fw = f.shape
    dx, dy = 2, 3
    pads = (x0 + (fw - dx + 1) // 2, x1 + (fw - dx) // 2, y0 + (fh - dy + 1) // 2, y1 + (fh - dy) // 2)
    y = upfirdn2d.downsample2d(x, f, down=[dx, dy], padding=[x0, x1, y0, y1], gain=3)
    assert_close(y, naive_upfirdn2d(x, f, down=(dx, dy), pad=pads, gain=3), 1e-7)
    assert upfirdn2d.downsample2d(x, upfirdn2d.setup_filter([1, 3, 3, 1])).shape == (2, 3, 4, 5)

# ----------------------------------------------------------------------------
# bias_act.


SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


def naive_act(x, act, alpha):
    """Activation formulas written out in torch (float64), so autograd gives reference gradients."""
    sig = 1 / (1 + torch.exp(-x))
    return {
        'linear': x,
        'relu': torch.where(x > 0, x, torch.zeros_like(x)),
        'lrelu': torch.where(x > 0, x, x * alpha),
        'tanh': (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)),
        'sigmoid': sig,
        'elu': torch.where(x > 0, x, torch.exp(x) - 1),
        'selu': SELU_SCALE * torch.where(x > 0, x, SELU_ALPHA * (torch.exp(x) - 1)),
        'softplus': torch.log(1 + torch.exp(x)),
        'swish': x * sig,
    }[act]


def naive_bias_act(x, b, dim, act, alpha, gain, clamp):
    if b is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.reshape(shape)
    x = naive_act(x, act, alpha) * gain
    if clamp is not None:
        x = torch.minimum(torch.maximum(x, torch.full_like(x, -clamp)), torch.full_like(x, clamp))
    return x


TABLE = {  # act: (def_alpha, def_gain, cuda_idx, ref, has_2nd_grad)
    'linear': (0, 1, 1, '', False), 'relu': (0, np.sqrt(2), 2, 'y', False),
    'lrelu': (0.2, np.sqrt(2), 3, 'y', False), 'tanh': (0, 1, 4, 'y', True),
    'sigmoid': (0, 1, 5, 'y', True), 'elu': (0, 1, 6, 'y', True), 'selu': (0, 1, 7, 'y', True),
    'softplus': (0, 1, 8, 'y', True), 'swish': (0, np.sqrt(2), 9, 'x', True),
}


def test_activation_table():
    assert set(bias_act.activation_funcs) == set(TABLE)
    for act, (def_alpha, def_gain, cuda_idx, ref, has_2nd_grad) in TABLE.items():
        spec = bias_act.activation_funcs[act]
        assert (spec.def_alpha, spec.def_gain, spec.cuda_idx, spec.ref, spec.has_2nd_grad) == \
            (def_alpha, def_gain, cuda_idx, ref, has_2nd_grad)
        assert spec['def_gain'] == spec.def_gain
        assert callable(spec.func)
    assert type(bias_act.activation_funcs['lrelu'].def_gain) is np.float64
    with pytest.raises(AttributeError):
        bias_act.activation_funcs['relu'].missing


@pytest.mark.parametrize('act', list(TABLE))
def test_bias_act_defaults_and_options(act):
    x = randn(3, 5, 4, dtype=torch.float64) * 2
    b = randn(5, dtype=torch.float64, seed=2)
    def_alpha, def_gain = TABLE[act][:2]
    for kwargs, (alpha, gain, clamp) in [(dict(), (def_alpha, def_gain, None)),
                                         (dict(alpha=0.3, gain=0.5, clamp=0.4), (0.3, 0.5, 0.4)),
                                         (dict(gain=np.float64(1.7), clamp=0), (def_alpha, 1.7, 0))]:
        expected = naive_bias_act(x, b, 1, act, alpha, gain, clamp)
        assert_close(bias_act.bias_act(x, b, act=act, **kwargs), expected, 1e-12)
        y32 = bias_act.bias_act(x.float(), b.float(), act=act, **kwargs)
        assert y32.dtype == torch.float32
        assert_close(y32, expected, 1e-6)


@pytest.mark.parametrize('act', list(TABLE))
def test_bias_act_gradients(act):
    x = (randn(4, 3, dtype=torch.float64) * 2).requires_grad_()
    b = randn(4, dtype=torch.float64, seed=3).requires_grad_()
    weights = randn(4, 3, dtype=torch.float64, seed=4)
    grads = torch.autograd.grad((bias_act.bias_act(x, b, dim=0, act=act, clamp=2.5) * weights).sum(), [x, b])
    def_alpha, def_gain = TABLE[act][:2]
    expected = naive_bias_act(x, b, 0, act, def_alpha, def_gain, 2.5)
    ref_grads = torch.autograd.grad((expected * weights).sum(), [x, b])
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, 1e-12)


def test_bias_act_dims_and_dtypes():
    x = randn(2, 3, 4, 5)
    for dim in [0, 1, 2, 3, -1]:
        b = randn(x.shape[dim], seed=dim + 10)
        expected = naive_bias_act(x.double(), b.double(), dim % 4, 'lrelu', 0.2, np.sqrt(2), None)
        assert_close(bias_act.bias_act(x, b, dim=dim, act='lrelu'), expected, 1e-6)
    expected = naive_bias_act(x.double(), None, 1, 'swish', 0, np.sqrt(2), None)
    assert_close(bias_act.bias_act(x, act='swish', impl='ref'), expected, 1e-6)
    for dtype in [torch.float16, torch.bfloat16, torch.float64]:
        y = bias_act.bias_act(x.to(dtype), randn(3), act='relu', clamp=1)
        assert y.dtype == dtype


def test_bias_act_asserts():
    x = randn(2, 3)
    with pytest.raises(AssertionError):
        bias_act.bias_act(x, clamp=-1)
    with pytest.raises(AssertionError):
        bias_act.bias_act(x, randn(2))  # Bias length does not match dim 1.
    with pytest.raises(KeyError):
        bias_act.bias_act(x, act='gelu')

# ----------------------------------------------------------------------------
# conv2d_resample.


def naive_conv2d_resample(x, w, f, up, down, padding, groups, flip_weight, flip_filter):
    """The defining composition in float64: zero-insert + pad + FIR, conv2d, FIR + decimate."""
    k = kernel2d(f)
    kh, kw = k.shape
    x0, x1, y0, y1 = _pads(padding)
    if up > 1:
        x0, x1 = x0 + (kw + up - 1) // 2, x1 + (kw - up) // 2
        y0, y1 = y0 + (kh + up - 1) // 2, y1 + (kh - up) // 2
    if down > 1:
        x0, x1 = x0 + (kw - down + 1) // 2, x1 + (kw - down) // 2
        y0, y1 = y0 + (kh - down + 1) // 2, y1 + (kh - down) // 2
    x = naive_upfirdn2d(x, k if up > 1 else np.ones((1, 1)), (up, up), pad=(x0, x1, y0, y1),
                        flip_filter=flip_filter, gain=up ** 2)
    w = w.double() if flip_weight else w.double().flip([2, 3])
    x = F.conv2d(torch.from_numpy(x), w, groups=groups).numpy()
    if down > 1:
        x = naive_upfirdn2d(x, k, down=(down, down), flip_filter=flip_filter)
    return x


F4 = upfirdn2d.setup_filter([1, 3, 3, 1])
RESAMPLE_CASES = [
    # x shape,      w shape,       f,                  up, down, padding,         groups
    ((2, 3, 6, 7),  (4, 3, 1, 1),  F4,                 2,  1,    0,               1),  # 1x1 up
    ((2, 3, 8, 7),  (4, 3, 1, 1),  F4,                 1,  2,    0,               1),  # 1x1 down
    ((2, 4, 8, 9),  (6, 2, 1, 1),  rand_filter(3, 2),  1,  2,    [1, 0, 2, 1],    2),  # 1x1 down, groups
    ((2, 3, 8, 9),  (4, 3, 3, 3),  F4,                 1,  2,    1,               1),  # down only
    ((1, 6, 9, 8),  (6, 2, 3, 5),  rand_filter(4, 3),  1,  3,    [2, 1, 0, 1],    3),  # down, groups
    ((2, 3, 5, 6),  (4, 3, 3, 3),  F4,                 2,  1,    1,               1),  # up
    ((1, 4, 5, 4),  (6, 2, 3, 5),  rand_filter(3, 4),  3,  1,    [1, 2, 0, 1],    2),  # up, groups, non-square
    ((2, 3, 5, 6),  (4, 3, 3, 3),  F4,                 2,  1,    -2,              1),  # up, crop in convT
    ((2, 3, 5, 6),  (4, 3, 3, 5),  F4,                 2,  1,    [-2, -2, -1, 0], 1),  # up, crop x only
    ((2, 3, 5, 6),  (4, 3, 3, 3),  rand_filter(5),     2,  2,    1,               1),  # up + down, separable
    ((1, 2, 4, 5),  (3, 2, 3, 2),  rand_filter(3, 5),  3,  2,    [0, 1, 2, -1],   1),  # up + down, odd
    ((1, 3, 4, 4),  (3, 1, 2, 2),  None,               2,  1,    0,               3),  # up, no filter
    ((2, 3, 6, 7),  (4, 3, 3, 3),  None,               1,  1,    1,               1),  # plain
    ((2, 3, 6, 7),  (4, 3, 3, 5),  None,               1,  1,    [2, 1],          1),  # plain, px != py
    ((2, 4, 6, 7),  (4, 2, 3, 5),  F4,                 1,  1,    [1, 0, 2, -1],   2),  # asymmetric padding
    ((2, 3, 6, 7),  (4, 3, 3, 3),  None,               1,  1,    -1,              1),  # negative padding
]


@pytest.mark.parametrize('flip_weight', [True, False])
@pytest.mark.parametrize('flip_filter', [False, True])
@pytest.mark.parametrize('shape, w_shape, f, up, down, padding, groups', RESAMPLE_CASES)
def test_conv2d_resample_matches_naive(shape, w_shape, f, up, down, padding, groups, flip_weight, flip_filter):
    x = randn(*shape)
    w = randn(*w_shape, seed=5)
    expected = naive_conv2d_resample(x, w, f, up, down, padding, groups, flip_weight, flip_filter)
    kwargs = dict(f=f, up=up, down=down, padding=padding, groups=groups, flip_weight=flip_weight,
                  flip_filter=flip_filter)
    y = conv2d_resample.conv2d_resample(x=x, w=w, **kwargs)
    assert y.dtype == torch.float32 and y.shape == expected.shape
    assert_close(y, expected, 1e-5)
    assert_close(conv2d_resample.conv2d_resample(x=x.double(), w=w.double(), **kwargs), expected, 1e-7)

    # The fast path equals the generic route computed by the library itself.
    pads = conv2d_resample._resample_padding(padding, f, up, down)
    generic = conv2d_resample._conv2d_resample_generic(x, w, f, up, down, pads, groups, flip_weight, flip_filter)
    assert_close(y, generic, 1e-5)


def test_conv2d_resample_gradients():
    x = randn(1, 2, 3, 4, dtype=torch.float64).requires_grad_()
    w = randn(2, 2, 3, 3, dtype=torch.float64, seed=6).requires_grad_()
    for kwargs in [dict(up=2), dict(down=2, padding=1), dict(up=2, down=2, flip_weight=False)]:
        fn = lambda a, b: conv2d_resample.conv2d_resample(a, b, f=F4, **kwargs)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w))


def test_conv2d_resample_asserts():
    x, w = randn(1, 2, 4, 4), randn(2, 2, 3, 3)
    with pytest.raises(AssertionError):
        conv2d_resample.conv2d_resample(x, w.double())
    with pytest.raises(AssertionError):
        conv2d_resample.conv2d_resample(x, w, f=F4.double(), up=2)
    with pytest.raises(AssertionError):
        conv2d_resample.conv2d_resample(x, w, up=0)

# ----------------------------------------------------------------------------
# fma.


FMA_SHAPES = [((4, 1, 3), (1, 5, 1), (5, 3)), ((3,), (2, 1), (4, 2, 3)), ((2, 3), (2, 3), (1,))]


@pytest.mark.parametrize('shapes', FMA_SHAPES)
def test_fma_matches_autograd(shapes):
    tensors = [randn(*s, dtype=torch.float64, seed=i).requires_grad_() for i, s in enumerate(shapes)]
    y = fma.fma(*tensors)
    a, b, c = [t.detach().clone().requires_grad_() for t in tensors]
    expected = a * b + c
    assert y.shape == expected.shape
    assert_close(y, expected, 1e-12)
    weights = randn(*y.shape, dtype=torch.float64, seed=9)
    grads = torch.autograd.grad((y * weights).sum(), tensors)
    ref_grads = torch.autograd.grad((expected * weights).sum(), [a, b, c])
    for g, r, t in zip(grads, ref_grads, tensors):
        assert g.shape == t.shape
        assert_close(g, r, 1e-12)


def test_fma_partial_grads():
    a, b = randn(3, 1), randn(1, 4, seed=1).requires_grad_()
    c = randn(4, seed=2)
    (g,) = torch.autograd.grad(fma.fma(a, b, c).sum(), [b])
    assert_close(g, a.sum().expand(1, 4), 1e-6)

# ----------------------------------------------------------------------------
# conv2d_gradfix and grid_sample_gradfix.


@pytest.fixture
def gradfix_enabled(monkeypatch):
    monkeypatch.setattr(conv2d_gradfix, 'enabled', True)


@pytest.mark.parametrize('use_custom', [False, True])
def test_conv_gradfix_forward(monkeypatch, use_custom):
    monkeypatch.setattr(conv2d_gradfix, 'enabled', use_custom)
    x, w, b = randn(2, 4, 7, 6).requires_grad_(), randn(6, 2, 3, 3, seed=1), randn(6, seed=2)
    y = conv2d_gradfix.conv2d(input=x, weight=w, bias=b, stride=2, padding=1, groups=2)
    assert_close(y, F.conv2d(x, w, b, stride=2, padding=1, groups=2), 1e-6)
    wt = randn(4, 3, 3, 3, seed=3)
    y = conv2d_gradfix.conv_transpose2d(x, wt, b, stride=2, padding=1, output_padding=1, groups=2)
    assert_close(y, F.conv_transpose2d(x, wt, b, stride=2, padding=1, output_padding=1, groups=2), 1e-6)


def test_conv_gradfix_double_backward(gradfix_enabled):
    x = randn(1, 4, 5, 4, dtype=torch.float64).requires_grad_()
    w = randn(2, 2, 3, 2, dtype=torch.float64, seed=1).requires_grad_()
    b = randn(2, dtype=torch.float64, seed=2).requires_grad_()
    conv = lambda x, w, b: conv2d_gradfix.conv2d(x, w, b, stride=2, padding=[1, 0], groups=2)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, w, b))
    assert torch.autograd.gradgradcheck(conv, (x, w, b))
    wt = randn(4, 1, 3, 2, dtype=torch.float64, seed=3).requires_grad_()
    def convt(x, w):
        return conv2d_gradfix.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1, groups=2)

    assert torch.autograd.gradcheck(convt, (x, wt))
    assert torch.autograd.gradgradcheck(convt, (x, wt))


@pytest.mark.parametrize('transpose', [False, True])
def test_no_weight_gradients(gradfix_enabled, transpose):
    op = conv2d_gradfix.conv_transpose2d if transpose else conv2d_gradfix.conv2d
    x = randn(2, 3, 5, 5).requires_grad_()
    w = randn(3, 3, 3, 3, seed=1).requires_grad_()
    y = op(x, w, padding=1)  # Forward outside the block: the flag is read during backward.
    with conv2d_gradfix.no_weight_gradients():
        y.square().sum().backward()
    assert w.grad is None or not w.grad.any()
    x_ref = x.detach().clone().requires_grad_()
    ref_op = F.conv_transpose2d if transpose else F.conv2d
    ref_op(x_ref, w.detach(), padding=1).square().sum().backward()
    assert_close(x.grad, x_ref.grad, 1e-5)
    assert not conv2d_gradfix.weight_gradients_disabled


@pytest.mark.parametrize('transpose', [False, True])
def test_no_weight_gradients_r1_pattern(gradfix_enabled, transpose):
    """Input gradient taken under the flag, penalty backpropagated to the weight afterwards."""
    op, ref_op = (conv2d_gradfix.conv2d, F.conv2d)
    if transpose:
        op, ref_op = (conv2d_gradfix.conv_transpose2d, F.conv_transpose2d)
    x = randn(2, 3, 5, 5, dtype=torch.float64).requires_grad_()
    w = randn(3, 3, 3, 3, dtype=torch.float64, seed=1).requires_grad_()
    out = torch.tanh(op(x, w, padding=1, stride=2)).sum()
    with conv2d_gradfix.no_weight_gradients():
        (gx,) = torch.autograd.grad(out, [x], create_graph=True)
    gx.square().sum().backward()
    w_ref = w.detach().clone().requires_grad_()
    out_ref = torch.tanh(ref_op(x, w_ref, padding=1, stride=2)).sum()
    (gx_ref,) = torch.autograd.grad(out_ref, [x], create_graph=True)
    gx_ref.square().sum().backward()
    assert_close(w.grad, w_ref.grad, 1e-12)


def test_no_weight_gradients_flag_handling():
    with conv2d_gradfix.no_weight_gradients(disable=False):
        assert not conv2d_gradfix.weight_gradients_disabled
    with conv2d_gradfix.no_weight_gradients():
        assert conv2d_gradfix.weight_gradients_disabled
        x = randn(1, 1, 4, 4).requires_grad_()
        w = randn(1, 1, 3, 3, seed=1).requires_grad_()
        conv2d_gradfix.conv2d(x, w).sum().backward()  # Not enabled, but the flag is on at forward time.
        assert w.grad is None and x.grad is not None
    assert not conv2d_gradfix.weight_gradients_disabled


def test_grid_sample():
    x = randn(1, 2, 5, 6, dtype=torch.float64).requires_grad_()
    grid = (torch.rand(1, 3, 4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.4 - 1.2)
    y = grid_sample_gradfix.grid_sample(x, grid)
    assert torch.equal(y, F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False))
    assert torch.autograd.gradgradcheck(lambda t: grid_sample_gradfix.grid_sample(t, grid), (x,))

# ----------------------------------------------------------------------------
# filtered_lrelu.


def naive_filtered_lrelu(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter):
    x = np64(x)
    if b is not None:
        x = x + np64(b).reshape(1, -1, 1, 1)
    x = naive_upfirdn2d(x, kernel2d(fu), (up, up), pad=_pads(padding), flip_filter=flip_filter, gain=up ** 2)
    x = np.where(x >= 0, x, x * slope) * gain
    if clamp is not None:
        x = np.clip(x, -clamp, clamp)
    return naive_upfirdn2d(x, kernel2d(fd), down=(down, down), flip_filter=flip_filter)


SEP_U = upfirdn2d.setup_filter(rand_filter(8))          # 1-D, separable (StyleGAN3-T style)
SEP_D = upfirdn2d.setup_filter(rand_filter(8, seed=2))
LRELU_CASES = [
    # x shape,     fu,                 fd,                         up, down, padding,       gain,       slope, clamp
    ((2, 3, 6, 5), SEP_U,              SEP_D,                      2,  2,    [5, 4, 6, 3],  np.sqrt(2), 0.2,   None),
    ((1, 2, 5, 5), rand_filter(4, 4),  rand_filter(3, 3, seed=3),  2,  1,    [2, 1, 0, 3],  np.sqrt(2), 0.2,   0.5),
    ((1, 2, 7, 6), None,               rand_filter(5, 5, seed=4),  1,  2,    [1, 2, 3, 2],  1,          1,     None),
    ((1, 2, 4, 4), rand_filter(3),     None,                       3,  1,    1,             2.0,        0.1,   0.3),
    ((1, 1, 5, 4), None,               None,                       1,  1,    0,             1,          0,     0),
]


@pytest.mark.parametrize('flip_filter', [False, True])
@pytest.mark.parametrize('shape, fu, fd, up, down, padding, gain, slope, clamp', LRELU_CASES)
def test_filtered_lrelu_matches_naive(shape, fu, fd, up, down, padding, gain, slope, clamp, flip_filter):
    x = randn(*shape) * 2
    b = randn(shape[1], seed=7)
    expected = naive_filtered_lrelu(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter)
    y = filtered_lrelu.filtered_lrelu(x=x, fu=fu, fd=fd, b=b, up=up, down=down, padding=padding, gain=gain,
                                      slope=slope, clamp=clamp, flip_filter=flip_filter)
    assert y.dtype == torch.float32 and y.shape == expected.shape
    assert_close(y, expected, 1e-5)

    # Documented output size.
    (x0, x1, y0, y1), (fu_w, fu_h), (fd_w, fd_h) = _pads(padding), _size(fu), _size(fd)
    assert y.shape[3] == (shape[3] * up + x0 + x1 - (fu_w - 1) - (fd_w - 1) + (down - 1)) // down
    assert y.shape[2] == (shape[2] * up + y0 + y1 - (fu_h - 1) - (fd_h - 1) + (down - 1)) // down


def _size(f):
    return (1, 1) if f is None else (f.shape[-1], f.shape[0])


def test_filtered_lrelu_dtype_and_asserts():
    x = randn(1, 2, 4, 4)
    f = rand_filter(3)
    for dtype in [torch.float64, torch.bfloat16]:
        assert filtered_lrelu.filtered_lrelu(x.to(dtype), f, f, padding=2).dtype == dtype
    assert filtered_lrelu.filtered_lrelu(x, b=None).shape == x.shape
    for kwargs in [dict(gain=0), dict(slope=-0.1), dict(clamp=-1), dict(up=1.5)]:
        with pytest.raises(AssertionError):
            filtered_lrelu.filtered_lrelu(x, **kwargs)

# ----------------------------------------------------------------------------
# The compiled plugins against the reference paths (the specification).

from torch_utils import custom_ops  # noqa: E402 pylint: disable=wrong-import-position


@pytest.fixture(scope='module')
def plugins():
    """Build (or load from the user cache) both CPU plugins once for this module."""
    if custom_ops.mode() == 'ref':
        pytest.skip('DI_CUSTOM_OPS=ref')
    found = bias_act._plugin(), upfirdn2d._plugin()
    assert all(p is not None for p in found), 'the CPU plugins must build here (see the warning for the log)'
    return found


def rel_err(actual, expected):
    """Largest difference relative to the largest magnitude of `expected`."""
    a, e = np64(actual), np64(expected)
    return np.abs(a - e).max() / max(np.abs(e).max(), 1e-30)


def layout(x, kind):
    if kind == 'channels_last':
        return x.contiguous(memory_format=torch.channels_last)
    if kind == 'strided':  # A view with a non-unit last stride.
        return torch.stack([x, -x], dim=-1).flatten(-2)[..., ::2]
    return x


def grads_of(fn, inputs, seed=11):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    w = randn(*y.shape, seed=seed).to(y.dtype)
    return y, torch.autograd.grad((y * w).sum(), leaves)


F4_RANK1 = upfirdn2d.setup_filter([1, 3, 3, 1])  # StyleGAN2's 4x4: runs as a separable filter.
PLUGIN_UPFIRDN_CASES = UPFIRDN_CASES + [
    # x shape,      filter,              up,    down, padding,        flip,  gain
    ((1, 2, 5, 7),  F4_RANK1,            4,     1,    [3, 2, 3, 2],   False, 16),
    ((2, 2, 17, 13), rand_filter(4, 4),  1,     4,    [1, 2, 0, 3],   True,  1),
    ((1, 3, 5, 6),  rand_filter(7),      4,     2,    3,              False, 16),
    ((2, 3, 9, 11), F4_RANK1,            1,     1,    [2, 1, 2, 1],   False, 1),
    ((2, 3, 16, 15), F4_RANK1,           1,     2,    1,              True,  1),
    ((1, 2, 8, 8),  F4_RANK1,            2,     1,    [2, 1, 2, 1],   False, 4),
    ((1, 1, 7, 5),  rand_filter(1, 4),   [1, 4], [2, 1], [0, 3, 1, 0], True, 2),
    # Separable row kernel: untemplated tap counts, down 3 with crops, up 3, 12 taps up 2 down 2.
    ((2, 2, 13, 17), rand_filter(6),     1,     3,    [-1, 4, 2, -2], False, 1),
    ((1, 2, 6, 7),  rand_filter(5),      3,     1,    [2, 2, 3, 1],   True,  9),
    ((1, 2, 9, 10), rand_filter(12),     2,     2,    [10, 10, 9, 11], False, 4),
    ((2, 1, 11, 9), F4_RANK1,            1,     [2, 3], [-1, 2, 0, 1], False, 1),
]


@pytest.mark.parametrize('kind', ['contiguous', 'channels_last', 'strided'])
@pytest.mark.parametrize('shape, f, up, down, padding, flip, gain', PLUGIN_UPFIRDN_CASES)
def test_upfirdn2d_plugin_matches_reference(plugins, shape, f, up, down, padding, flip, gain, kind):
    x = layout(randn(*shape), kind)
    kwargs = dict(up=up, down=down, padding=padding, flip_filter=flip, gain=gain)
    y, (gx,) = grads_of(lambda t: upfirdn2d.upfirdn2d(t, f, **kwargs), [x])
    assert type(y.grad_fn).__name__ == '_Upfirdn2dBackward', 'the plugin did not run'
    y_ref, (gx_ref,) = grads_of(lambda t: upfirdn2d.upfirdn2d(t, f, impl='ref', **kwargs), [x])
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert rel_err(y, y_ref) <= 1e-6
    assert rel_err(gx, gx_ref) <= 1e-6


@pytest.mark.parametrize('f, kwargs', [
    (rand_filter(3, 2), dict(up=2, down=[1, 2], padding=[1, -1, 2, 0])),
    (rand_filter(3), dict(up=[1, 2], down=2, padding=1, flip_filter=True, gain=2)),
    (F4_RANK1, dict(up=[2, 4], down=[4, 1], padding=[2, 3, 1, 2], gain=3)),
])
def test_upfirdn2d_plugin_gradcheck(plugins, f, kwargs):
    x = randn(1, 2, 5, 4, dtype=torch.float64).requires_grad_()
    fn = lambda t: upfirdn2d.upfirdn2d(t, f, **kwargs)  # noqa: E731
    assert type(fn(x).grad_fn).__name__ == '_Upfirdn2dBackward'
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


BIAS_ACT_LAYOUTS = [  # x shape, dim, layout
    ((2, 5, 6, 7), 1, 'contiguous'), ((2, 5, 6, 7), 1, 'channels_last'), ((2, 5, 6, 7), 1, 'strided'),
    ((4, 3), 0, 'contiguous'), ((3, 4, 5), -1, 'contiguous'), ((2, 5, 6, 7), 2, 'channels_last'),
]


@pytest.mark.parametrize('clamp', [None, 0.7])
@pytest.mark.parametrize('act', list(bias_act.activation_funcs))
def test_bias_act_plugin_matches_reference(plugins, act, clamp):
    for shape, dim, kind in BIAS_ACT_LAYOUTS:
        x = layout(randn(*shape) * 2, kind)
        b = randn(shape[dim], seed=5)
        for args in ([x, b], [x]):
            def fn(impl, *t):
                return bias_act.bias_act(t[0], t[1] if len(t) > 1 else None, dim=dim, act=act, clamp=clamp, impl=impl)
            y, grads = grads_of(lambda *t: fn('cuda', *t), args)
            assert 'BiasAct' in type(y.grad_fn).__name__, 'the plugin did not run'
            y_ref, grads_ref = grads_of(lambda *t: fn('ref', *t), args)
            assert y.shape == y_ref.shape and y.dtype == torch.float32
            assert rel_err(y, y_ref) <= 1e-6, (shape, kind)
            for g, g_ref in zip(grads, grads_ref):
                assert rel_err(g, g_ref) <= 1e-6, (shape, kind)


@pytest.mark.parametrize('act', list(bias_act.activation_funcs))
def test_bias_act_plugin_gradcheck(plugins, act):
    x = (randn(2, 3, 4, dtype=torch.float64) * 2).requires_grad_()
    b = randn(3, dtype=torch.float64, seed=3).requires_grad_()
    for clamp in [None, 1.5]:
        fn = lambda t, u: bias_act.bias_act(t, u, act=act, clamp=clamp)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, b))
        assert torch.autograd.gradgradcheck(fn, (x, b))
    fn = lambda t: bias_act.bias_act(t.permute(0, 2, 1), act=act, dim=2, gain=0.5)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_plugins_low_precision_and_threads(plugins):
    x, b, f = randn(2, 4, 9, 8), randn(4, seed=2), F4_RANK1
    for dtype in [torch.float16, torch.bfloat16]:
        y = bias_act.bias_act(x.to(dtype), b, act='lrelu', clamp=1)
        assert y.dtype == dtype
        assert_close(y.float(), bias_act.bias_act(x, b, act='lrelu', clamp=1, impl='ref'), 2e-2)
        y = upfirdn2d.upsample2d(x.to(dtype), f)
        assert y.dtype == dtype
        assert_close(y.float(), upfirdn2d.upsample2d(x, f, impl='ref'), 3e-2)
    # The bias gradient is summed in a fixed order: the same bits for any number of threads.
    x = randn(8, 16, 33, 31)
    results = []
    for threads in [1, 2]:
        torch.set_num_threads(threads)
        results.append(grads_of(lambda t, u: bias_act.bias_act(t, u, act='lrelu'), [x, randn(16)])[1][1])
        results.append(grads_of(lambda t: upfirdn2d.downsample2d(t, f), [x])[1][0])
    torch.set_num_threads(1)
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])


def test_filtered_lrelu_plugin_path_matches_reference(plugins):
    x, b = randn(2, 3, 7, 6) * 2, randn(3, seed=7)
    kwargs = dict(fu=SEP_U, fd=SEP_D, b=b, up=2, down=2, padding=[5, 4, 6, 3], clamp=0.8)
    y, grads = grads_of(lambda t: filtered_lrelu.filtered_lrelu(t, **kwargs), [x])
    y_ref, grads_ref = grads_of(lambda t: filtered_lrelu.filtered_lrelu(t, impl='ref', **kwargs), [x])
    assert rel_err(y, y_ref) <= 1e-6 and rel_err(grads[0], grads_ref[0]) <= 1e-6

# ----------------------------------------------------------------------------
# CUDA plugins against the CPU reference (skipped without a GPU).


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


@cuda
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize('kind', ['contiguous', 'channels_last'])
def test_cuda_plugins_match_reference(dtype, tol, kind):
    assert bias_act._plugin() is not None and hasattr(bias_act._plugin(), 'bias_act_cuda')
    dev = torch.device('cuda')
    x = layout(randn(4, 6, 12, 10) * 2, kind)
    b = randn(6, seed=3)
    for act in bias_act.activation_funcs:
        fn = lambda impl, d: lambda t, u: bias_act.bias_act(t, u, act=act, clamp=1.5, impl=impl)  # noqa: E731
        y, grads = grads_of(fn('cuda', dev), [x.to(dev, dtype), b.to(dev, dtype)])
        y_ref, grads_ref = grads_of(fn('ref', None), [x.double(), b.double()])
        assert y.dtype == dtype and rel_err(y, y_ref) <= tol, act
        for g, g_ref in zip(grads, grads_ref):
            assert rel_err(g, g_ref) <= tol * 10, act
    for shape, f, up, down, padding, flip, gain in PLUGIN_UPFIRDN_CASES:
        xs = layout(randn(*shape), kind)
        kw = dict(up=up, down=down, padding=padding, flip_filter=flip, gain=gain)
        y, (g,) = grads_of(lambda t: upfirdn2d.upfirdn2d(t, None if f is None else f.to(dev), **kw), [xs.to(dev, dtype)])
        y_ref, (g_ref,) = grads_of(lambda t: upfirdn2d.upfirdn2d(t, f, impl='ref', **kw), [xs.double()])
        assert rel_err(y, y_ref) <= tol and rel_err(g, g_ref) <= tol, shape
    for shape, fu, fd, up, down, padding, gain, slope, clamp in LRELU_CASES:
        xs, bs = layout(randn(*shape) * 2, kind), randn(shape[1], seed=7)
        kw = dict(up=up, down=down, padding=padding, gain=gain, slope=slope, clamp=clamp)
        to = lambda f: None if f is None else f.to(dev)  # noqa: E731
        y, grads = grads_of(lambda t, u: filtered_lrelu.filtered_lrelu(t, to(fu), to(fd), u, **kw),
                            [xs.to(dev, dtype), bs.to(dev, dtype)])
        y_ref, grads_ref = grads_of(lambda t, u: filtered_lrelu.filtered_lrelu(t, fu, fd, u, impl='ref', **kw),
                                    [xs.double(), bs.double()])
        assert rel_err(y, y_ref) <= tol, shape
        for g, g_ref in zip(grads, grads_ref):
            assert rel_err(g, g_ref) <= tol * 10, shape
