"""The fused GroupNorm-SiLU-dropout CPU kernel (torch_utils/ops/norm_act.py) and the EDM networks
on it (IMPLEMENTATION['fused_norm'], channels_last 'auto').

References are torch's group_norm, silu and where computed in float64; the gradients are checked
with gradcheck in float64 and against autograd through the torch ops in float32.
"""

import pytest
import torch
import torch.nn.functional as F

from torch_utils.ops import norm_act as na
from training import networks_edm as N

CL = torch.channels_last

pytestmark = pytest.mark.skipif(not na.plugin_ready(), reason='the norm_act plugin did not build')


@pytest.fixture(autouse=True)
def _restore_implementation():
    previous = dict(N.IMPLEMENTATION)
    yield
    N.set_implementation(**previous)


def _inputs(shape, groups, dtype=torch.float32, layout=None, drop=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    N_, C, H, W = shape
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn([C], generator=g, dtype=torch.float64)
    b = torch.randn([C], generator=g, dtype=torch.float64)
    keep = None
    if drop:  # drawn in the layout's memory order, as the networks do
        keep = torch.rand([N_, H, W, C], generator=g) > 0.3
        keep = keep.permute(0, 3, 1, 2) if layout == CL else keep.permute(0, 3, 1, 2).contiguous()
    x = x.to(dtype)
    if layout == CL:
        x = x.contiguous(memory_format=CL)
    return x, w, b, keep


def _reference(x, w, b, groups, eps, act, keep, scale):
    h = F.group_norm(x.double(), groups, w.double(), b.double(), eps)
    if act:
        h = F.silu(h)
    if keep is not None:
        h = torch.where(keep, h * scale, 0)
    return h


CASES = [([2, 32, 8, 8], 8), ([3, 12, 5, 7], 3), ([1, 6, 4, 4], 6), ([2, 64, 3, 1], 32), ([4, 4, 16, 16], 1)]


@pytest.mark.parametrize('shape, groups', CASES)
@pytest.mark.parametrize('layout', [None, CL], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('act, drop', [(True, True), (True, False), (False, True), (False, False)])
def test_forward_matches_torch_in_float32(shape, groups, layout, act, drop):
    x, w, b, keep = _inputs(shape, groups, layout=layout, drop=drop)
    w32, b32 = w.float(), b.float()
    out = na.norm_act(x, w32, b32, groups, 1e-5, act, keep, 1.25)
    ref = _reference(x, w32, b32, groups, 1e-5, act, keep, 1.25)
    assert out.dtype == torch.float32 and out.stride() == x.stride()
    assert (out.double() - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize('in_dtype, out_dtype', [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize('layout', [None, CL], ids=['nchw', 'nhwc'])
def test_bfloat16_in_and_out_round_once(in_dtype, out_dtype, layout):
    x, w, b, keep = _inputs([2, 32, 6, 5], 8, dtype=in_dtype, layout=layout)
    out = na.norm_act(x, w.float(), b.float(), 8, 1e-5, True, keep, 1.25, out_dtype)
    ref = _reference(x, w, b, 8, 1e-5, True, keep, 1.25)  # from the same (rounded) input
    assert out.dtype == out_dtype and out.stride() == x.stride()
    # float32 arithmetic, then one rounding to the output dtype.
    bound = (2.0 ** -8 if out_dtype == torch.bfloat16 else 1e-6) * ref.abs() + 1e-6 * ref.abs().max()
    assert ((out.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize('layout', [None, CL], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('act, drop', [(True, True), (False, False)])
def test_gradcheck_float64(layout, act, drop):
    x, w, b, keep = _inputs([2, 8, 4, 3], 2, dtype=torch.float64, layout=layout, drop=drop)
    x, w, b = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    cw = torch.randn([5, 8, 3, 3], dtype=torch.float64, requires_grad=True)
    cb = torch.randn([5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: na.norm_act(*t, 2, 1e-5, act, keep, 1.4), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b, cw, cb: na.norm_act_conv(x, w, b, cw, cb, 2, 1e-5, act, keep, 1.4, 1),
        (x, w, b, cw, cb))


@pytest.mark.parametrize('layout', [None, CL], ids=['nchw', 'nhwc'])
def test_float32_gradients_match_autograd_through_torch_ops(layout):
    x, w, b, keep = _inputs([3, 16, 9, 7], 4, layout=layout)
    cw = torch.randn([8, 16, 3, 3]) * 0.2
    grad = torch.randn([3, 8, 9, 7])
    results = []
    for fused in (True, False):
        leaves = [t.detach().float().clone().requires_grad_() for t in (x, w, b, cw)]
        xl, wl, bl, cwl = leaves
        if fused:
            y = na.norm_act_conv(xl, wl, bl, cwl, None, 4, 1e-5, True, keep, 1.5, 1)
        else:
            y = F.conv2d(torch.where(keep, F.silu(F.group_norm(xl, 4, wl, bl, 1e-5)) * 1.5, 0), cwl, padding=1)
        y.backward(grad)
        results.append([y.detach()] + [t.grad for t in leaves])
    for a, b_ in zip(*results):
        assert (a - b_).abs().max() <= 1e-5 * b_.abs().max()


def test_results_do_not_depend_on_the_thread_count():
    x, w, b, keep = _inputs([6, 32, 8, 8], 8)
    x = x.requires_grad_()
    wl, bl = w.float().requires_grad_(), b.float().requires_grad_()
    runs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x.grad = wl.grad = bl.grad = None
            y = na.norm_act(x, wl, bl, 8, 1e-5, True, keep, 1.25)
            y.backward(torch.ones_like(y))
            runs.append([y.detach(), x.grad, wl.grad, bl.grad])
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b_) for a, b_ in zip(*runs))


def test_denormals_are_flushed_inside_the_kernel_only():
    # The kernel flushes denormals (they cost a microcode assist per vector on Intel cores), so a
    # SiLU of 1e-39 gives 0 there; the caller's floating-point state must be left as it was.
    tiny = torch.tensor(1e-39)
    assert tiny.item() != 0 and tiny.item() < torch.finfo(torch.float32).tiny
    x = torch.full([1, 2, 4, 4], 1e-39)
    h = na.norm_act(x, torch.zeros(2), torch.full([2], 1e-39), 1, 1e-5, False, None, 1.0)
    assert torch.equal(h, torch.zeros_like(h))
    assert (tiny * 1.0).item() != 0 and torch.tensor([2e-39]).div(2).item() != 0  # torch's ops still keep them


def test_available_only_for_dense_cpu_inputs_of_supported_dtypes():
    x = torch.randn(2, 8, 4, 4)
    assert na.available(x) and na.available(x.contiguous(memory_format=CL)) and na.available(x, torch.bfloat16)
    assert not na.available(x[:, :, :, :2])  # not dense
    assert not na.available(x.half()) and not na.available(x.double(), torch.float32)


#----------------------------------------------------------------------------
# The networks on the kernel.

def _net(model_type, dropout=0.2):
    torch.manual_seed(0)
    net = N.EDMPrecond(img_resolution=8, img_channels=2, label_dim=2, model_type=model_type,
        model_channels=64 if model_type == 'DhariwalUNet' else 16, channel_mult=[1, 2], num_blocks=1,
        attn_resolutions=[4], dropout=dropout)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def _run(net, settings, train, bf16=False):
    N.set_implementation(**settings)
    net.train(train).zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn([3, 2, 8, 8], generator=g).requires_grad_()
    sigma, labels = torch.tensor([0.1, 1.0, 20.0]), torch.eye(2)[[0, 1, 1]]
    torch.manual_seed(7)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        y = net(x, sigma, labels)
    (y.float().square().sum() + y.float().sum()).backward()
    return y, [y.detach().float(), x.grad] + [p.grad for p in net.parameters()]


TORCH_OPS = dict(fused_norm=False, channels_last=False, dropout='uniform')
FUSED = dict(fused_norm=True, channels_last='auto', dropout='uniform')


@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
@pytest.mark.parametrize('recompute', [True, False])
def test_networks_match_torch_ops_to_float32_rounding(model_type, recompute):
    net = _net(model_type)
    # Eval mode: no dropout, so the mask's layout (NHWC memory order under 'auto') plays no part.
    y_ref, ref = _run(net, dict(TORCH_OPS, recompute=recompute), train=False)
    y, fused = _run(net, dict(FUSED, recompute=recompute), train=False)
    assert y.is_contiguous() and y.shape == y_ref.shape  # NCHW out, whatever the layout inside
    for a, b in zip(fused, ref):
        assert (a - b).abs().max() <= 2e-5 * b.abs().max()


@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_training_mode_nchw_kernel_matches_torch_ops_with_the_same_dropout_masks(model_type):
    net = _net(model_type)
    _, ref = _run(net, TORCH_OPS, train=True)
    _, fused = _run(net, dict(FUSED, channels_last=False), train=True)  # NCHW: the same mask draws
    for a, b in zip(fused, ref):
        assert (a - b).abs().max() <= 2e-5 * b.abs().max()


@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
@pytest.mark.parametrize('channels', [1, 3])
def test_auto_layout_runs_every_block_in_nhwc_even_for_one_channel_images(model_type, channels):
    """A [N, 1, H, W] image is NCHW and NHWC at once, and broadcast operands ([N, C, 1, 1]) or a
    mask drawn NCHW would turn the result NCHW: every block must still see NHWC tensors."""
    torch.manual_seed(0)
    net = N.EDMPrecond(img_resolution=8, img_channels=channels, model_type=model_type,
        model_channels=64 if model_type == 'DhariwalUNet' else 16, channel_mult=[1, 2], num_blocks=1,
        attn_resolutions=[4], dropout=0.2).train()
    layouts = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: layouts.append(N._is_channels_last(args[0])))
        for m in net.modules() if isinstance(m, N.UNetBlock)]
    N.set_implementation(**FUSED)
    y = net(torch.randn([2, channels, 8, 8]), torch.tensor([0.5, 2.0]))
    for hook in hooks:
        hook.remove()
    assert layouts and all(layouts) and y.is_contiguous()


def test_bf16_network_outputs_match_torch_autocast_closely():
    net = _net('SongUNet')
    y_ref, ref = _run(net, TORCH_OPS, train=False, bf16=True)
    y, fused = _run(net, FUSED, train=False, bf16=True)
    assert y.dtype == y_ref.dtype
    # Both round every convolution's input to bf16; the kernel skips float32 intermediates.
    assert (fused[0] - ref[0]).abs().max() <= 0.02 * ref[0].abs().max()
    assert (fused[1] - ref[1]).norm() <= 0.05 * ref[1].norm()


def test_bf16_chains_keep_less_for_the_backward_pass():
    net = _net('SongUNet').train()
    x, s, c = torch.randn(8, 2, 8, 8), torch.rand(8) + 0.1, torch.eye(2)[[0, 1] * 4]
    def saved_bytes():
        storages = {}
        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast('cpu', dtype=torch.bfloat16):
            net(x, s, c)
        return sum(storages.values())
    N.set_implementation(**TORCH_OPS)
    before = saved_bytes()
    N.set_implementation(**FUSED)
    assert saved_bytes() < 0.7 * before


def test_without_the_plugin_the_networks_use_torch_ops(monkeypatch):
    net = _net('SongUNet')
    _, ref = _run(net, TORCH_OPS, train=True)
    monkeypatch.setattr(na, '_plugin', lambda: None)  # as after a failed build or DI_CUSTOM_OPS=ref
    _, fallback = _run(net, FUSED, train=True)
    assert all(torch.equal(a, b) for a, b in zip(fallback, ref))
