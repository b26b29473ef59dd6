"""StyleGAN2 networks: pickle round trips (safe vs code-executing loader), NVlabs parameter
names, and independent checks of modulated convolution, mapping, noise and minibatch-std."""

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_utils import persistence, safe_pickle
from training import networks_stylegan2 as sg2

Z_DIM = W_DIM = 8
RES = 16

# name: (architecture, c_dim, img_channels, conv_clamp, num_fp16_res)
CONFIGS = {
    'orig-uncond':     ('orig',   0, 1, None, 0),
    'skip-cond-clamp': ('skip',   4, 3, 256,  0),
    'resnet-cond':     ('resnet', 4, 3, None, 0),
    'resnet-fp16':     ('resnet', 0, 1, 256,  2),
}

def _perturb(net, seed):
    """Random values everywhere (biases, noise strengths, w_avg start at 0/1 otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if name.endswith('resample_filter'):
                continue
            t.add_(torch.randn(t.shape, generator=g) * 0.3)
    return net

def make_G(arch='skip', c_dim=0, img_channels=3, conv_clamp=None, num_fp16_res=0, seed=0):
    torch.manual_seed(seed)
    G = sg2.Generator(z_dim=Z_DIM, c_dim=c_dim, w_dim=W_DIM, img_resolution=RES,
        img_channels=img_channels, mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(channel_base=256, channel_max=32, architecture=arch,
            conv_clamp=conv_clamp, num_fp16_res=num_fp16_res))
    return _perturb(G, seed + 100)

def make_D(arch='resnet', c_dim=0, img_channels=3, conv_clamp=None, num_fp16_res=0, seed=0):
    torch.manual_seed(seed)
    D = sg2.Discriminator(c_dim=c_dim, img_resolution=RES, img_channels=img_channels,
        architecture=arch, channel_base=256, channel_max=32, conv_clamp=conv_clamp,
        num_fp16_res=num_fp16_res, mapping_kwargs=dict(num_layers=2),
        epilogue_kwargs=dict(mbstd_group_size=2))
    return _perturb(D, seed + 200)

def _inputs(c_dim, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn([n, Z_DIM], generator=g)
    c = torch.eye(c_dim)[torch.randint(0, c_dim, [n], generator=g)] if c_dim else torch.zeros([n, 0])
    return z, c

def _for_pickle(module):
    """What StyleGAN training does to each network before saving a snapshot."""
    return copy.deepcopy(module).eval().requires_grad_(False).cpu()

@pytest.fixture
def fresh_sources():
    """Call the returned function to forget which sources belong to live modules, so that the
    code loader must exec them (after copying and pickling, which need the live sources)."""
    saved = dict(persistence._src_to_module_dict)
    yield persistence._src_to_module_dict.clear
    persistence._src_to_module_dict.clear()
    persistence._src_to_module_dict.update(saved)

#----------------------------------------------------------------------------
# (a) Round trip through a StyleGAN-style snapshot dict with both loaders.

@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_snapshot_round_trip_safe_equals_code(name, fresh_sources):
    arch, c_dim, img_channels, conv_clamp, num_fp16_res = CONFIGS[name]
    kwargs = dict(c_dim=c_dim, img_channels=img_channels, conv_clamp=conv_clamp, num_fp16_res=num_fp16_res)
    G = make_G(arch, **kwargs, seed=0)
    G_ema = make_G(arch, **kwargs, seed=1)
    D = make_D(arch, **kwargs, seed=2)
    data = dict(G=_for_pickle(G), D=_for_pickle(D), G_ema=_for_pickle(G_ema), augment_pipe=None,
        training_set_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='x.zip',
            use_labels=c_dim > 0, max_size=10, xflip=False, resolution=RES))
    buf = io.BytesIO()
    pickle.dump(data, buf)
    fresh_sources()
    safe = safe_pickle.load(io.BytesIO(buf.getvalue()))
    code = safe_pickle.load(io.BytesIO(buf.getvalue()), allow_code=True)

    assert list(safe) == list(data) and list(code) == list(data)
    assert safe['augment_pipe'] is None and safe['training_set_kwargs'] == data['training_set_kwargs']
    for key in ['G', 'D', 'G_ema']:
        assert type(safe[key]) is type(data[key])                          # rebuilt as our class
        assert type(code[key]).__module__.startswith('_imported_module_')  # the embedded source ran
        assert not safe[key].training and not code[key].training
        assert not any(p.requires_grad for p in safe[key].parameters())
        ref = data[key].state_dict()
        for other in [safe[key], code[key]]:
            sd = other.state_dict()
            assert list(sd) == list(ref)
            assert all(torch.equal(sd[k], ref[k]) for k in ref)

    z, c = _inputs(c_dim)
    with torch.no_grad():
        for key in ['G', 'G_ema']:
            for trunc in [dict(), dict(truncation_psi=0.7, truncation_cutoff=3),
                    dict(truncation_psi=0.5)]:
                out = [net(z, c, noise_mode='const', **trunc) for net in
                    [data[key], safe[key], code[key]]]
                assert out[0].shape == (4, img_channels, RES, RES) and out[0].dtype == torch.float32
                assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
            torch.manual_seed(5)
            a = safe[key](z, c, noise_mode='random')
            torch.manual_seed(5)
            b = code[key](z, c, noise_mode='random')
            assert torch.equal(a, b)
        img = data['G_ema'](z, c, noise_mode='const')
        logits = [net(img, c) for net in [data['D'], safe['D'], code['D']]]
        assert logits[0].shape == (4, 1)
        assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    # G and G_ema really differ, so the comparisons above could fail.
    assert not torch.equal(data['G'](z, c, noise_mode='const'), data['G_ema'](z, c, noise_mode='const'))

def test_no_numpy_scalars_in_pickled_attributes():
    for net in [make_G('resnet', c_dim=4, conv_clamp=256), make_D('skip', c_dim=4)]:
        for module in net.modules():
            for key, value in vars(module).items():
                assert not isinstance(value, np.generic), (type(module).__name__, key)

def test_source_marker_selects_classes():
    src = persistence._module_to_src(sg2)
    assert 'class SynthesisBlock' in src
    for name in ['Generator', 'MappingNetwork', 'SynthesisNetwork', 'FullyConnectedLayer',
            'Conv2dLayer', 'Discriminator', 'MinibatchStdLayer']:
        assert safe_pickle.find_known_class(name, src) is getattr(sg2, name)
    # A StyleGAN3 networks_stylegan3.py source (no SynthesisBlock) maps to our StyleGAN3
    # classes, not to the StyleGAN2 ones of the same names.
    from training import networks_stylegan3 as sg3
    sg3_like = 'class SynthesisInput(torch.nn.Module):\nclass SynthesisLayer(torch.nn.Module):\n'
    for name in ['Generator', 'MappingNetwork', 'SynthesisNetwork', 'SynthesisLayer', 'FullyConnectedLayer']:
        assert safe_pickle.find_known_class(name, sg3_like) is getattr(sg3, name)
    assert safe_pickle.find_known_class('Generator', 'class Generator(torch.nn.Module):\n') is None
    # EDM names still resolve to the EDM classes, whatever the source.
    from training import networks_edm
    for name in ['Conv2d', 'Linear', 'EDMPrecond']:
        assert safe_pickle.find_known_class(name, src) is getattr(networks_edm, name)

def test_stylegan3_style_top_level_synthesis_kwargs():
    torch.manual_seed(0)
    a = sg2.Generator(Z_DIM, 0, W_DIM, RES, 1, synthesis_kwargs=dict(channel_base=256, channel_max=32))
    torch.manual_seed(0)
    b = sg2.Generator(Z_DIM, 0, W_DIM, RES, 1, channel_base=256, channel_max=32)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())

#----------------------------------------------------------------------------
# (b) NVlabs state_dict names, written by hand from the published architecture.

def _fc(prefix):
    return [f'{prefix}.weight', f'{prefix}.bias']

def _syn_layer(prefix):
    return [f'{prefix}.{k}' for k in ['weight', 'bias', 'noise_strength', 'noise_const',
        'resample_filter', 'affine.weight', 'affine.bias']]

def _torgb(prefix):
    return [f'{prefix}.{k}' for k in ['weight', 'bias', 'affine.weight', 'affine.bias']]

def _conv(prefix, bias=True):
    return [f'{prefix}.weight', f'{prefix}.resample_filter'] + ([f'{prefix}.bias'] if bias else [])

def test_generator_state_dict_names_skip():
    G = make_G('skip', c_dim=4)
    expected = set(_fc('mapping.embed') + _fc('mapping.fc0') + _fc('mapping.fc1') + ['mapping.w_avg'])
    expected |= {'synthesis.b4.const', 'synthesis.b4.resample_filter'}
    expected |= set(_syn_layer('synthesis.b4.conv1') + _torgb('synthesis.b4.torgb'))
    for res in [8, 16]:
        b = f'synthesis.b{res}'
        expected |= {f'{b}.resample_filter'}
        expected |= set(_syn_layer(f'{b}.conv0') + _syn_layer(f'{b}.conv1') + _torgb(f'{b}.torgb'))
    assert set(G.state_dict()) == expected
    # Parameters vs buffers matter too (what an optimizer trains, what requires_grad_ touches).
    assert {k for k, _ in G.named_buffers()} == \
        {k for k in expected if k.rsplit('.', 1)[1] in ['w_avg', 'noise_const', 'resample_filter']}
    sd = G.state_dict()
    assert sd['synthesis.b4.const'].shape == (32, 4, 4)
    assert sd['synthesis.b16.conv0.weight'].shape == (16, 32, 3, 3)
    assert sd['synthesis.b16.conv0.affine.weight'].shape == (32, W_DIM)
    assert sd['synthesis.b16.conv1.noise_const'].shape == (16, 16)
    assert sd['synthesis.b16.conv1.noise_strength'].shape == ()
    assert sd['synthesis.b16.torgb.weight'].shape == (3, 16, 1, 1)
    assert sd['synthesis.b8.resample_filter'].shape == (4, 4)
    assert sd['mapping.fc0.weight'].shape == (W_DIM, Z_DIM + W_DIM) # z concatenated with embed(c)
    assert sd['mapping.w_avg'].shape == (W_DIM,)
    assert G.num_ws == G.synthesis.num_ws == G.mapping.num_ws == 6
    assert G.synthesis.block_resolutions == [4, 8, 16]

def test_generator_state_dict_names_resnet_and_orig():
    keys = set(make_G('resnet').state_dict())
    assert {'synthesis.b8.skip.weight', 'synthesis.b16.skip.resample_filter'} <= keys
    assert 'synthesis.b8.skip.bias' not in keys
    assert 'synthesis.b16.torgb.weight' in keys and 'synthesis.b8.torgb.weight' not in keys
    assert 'mapping.embed.weight' not in keys
    keys = set(make_G('orig').state_dict())
    assert not any('.skip.' in k for k in keys)
    assert [k for k in keys if '.torgb.' in k and k.endswith('.weight') and 'affine' not in k] == \
        ['synthesis.b16.torgb.weight']

def test_discriminator_state_dict_names():
    D = make_D('resnet', c_dim=4)
    expected = set(_fc('mapping.embed') + _fc('mapping.fc0') + _fc('mapping.fc1'))
    expected |= set(_conv('b16.fromrgb'))
    for res in [16, 8]:
        expected |= {f'b{res}.resample_filter'}
        expected |= set(_conv(f'b{res}.conv0') + _conv(f'b{res}.conv1') + _conv(f'b{res}.skip', bias=False))
    expected |= set(_conv('b4.conv') + _fc('b4.fc') + _fc('b4.out'))
    assert set(D.state_dict()) == expected
    assert {k for k, _ in D.named_buffers()} == {k for k in expected if k.endswith('resample_filter')}
    sd = D.state_dict()
    assert sd['b4.conv.weight'].shape == (32, 33, 3, 3)    # + 1 minibatch-std channel
    assert sd['b4.fc.weight'].shape == (32, 32 * 16)
    assert sd['b4.out.weight'].shape == (32, 32)           # cmap_dim = channels at 4x4
    assert sd['mapping.fc1.weight'].shape == (32, 32)
    keys = set(make_D('skip').state_dict())
    assert {'b8.fromrgb.weight', 'b4.fromrgb.weight'} <= keys and 'b4.out.bias' in keys
    assert make_D('skip').state_dict()['b4.out.weight'].shape == (1, 32)

#----------------------------------------------------------------------------
# (c) Independent checks.

def _naive_modconv(x, weight, styles, noise, demodulate, padding):
    out = []
    for n in range(x.shape[0]):
        w = weight * styles[n].reshape(1, -1, 1, 1)
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        out.append(F.conv2d(x[n:n+1], w, padding=padding))
    out = torch.cat(out)
    return out + noise if noise is not None else out

@pytest.mark.parametrize('demodulate', [True, False])
@pytest.mark.parametrize('with_noise', [True, False])
def test_modulated_conv2d_vs_naive(demodulate, with_noise):
    g = torch.Generator().manual_seed(0)
    x = torch.randn([3, 5, 6, 6], generator=g, dtype=torch.float64)
    weight = torch.randn([7, 5, 3, 3], generator=g, dtype=torch.float64)
    styles = torch.randn([3, 5], generator=g, dtype=torch.float64) + 1
    noise = torch.randn([3, 1, 6, 6], generator=g, dtype=torch.float64) if with_noise else None
    ref = _naive_modconv(x, weight, styles, noise, demodulate, padding=1)
    for fused in [True, False]:
        out = sg2.modulated_conv2d(x=x.clone(), weight=weight, styles=styles, noise=noise,
            padding=1, demodulate=demodulate, fused_modconv=fused)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

def test_modulated_conv2d_up_fused_equals_unfused():
    g = torch.Generator().manual_seed(1)
    x = torch.randn([2, 4, 5, 5], generator=g, dtype=torch.float64)
    weight = torch.randn([3, 4, 3, 3], generator=g, dtype=torch.float64)
    styles = torch.randn([2, 4], generator=g, dtype=torch.float64)
    f = sg2.upfirdn2d.setup_filter([1, 3, 3, 1])
    outs = [sg2.modulated_conv2d(x=x, weight=weight, styles=styles, up=2, padding=1,
        resample_filter=f, flip_weight=False, fused_modconv=fused) for fused in [True, False]]
    assert outs[0].shape == (2, 3, 10, 10)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)

def test_normalize_2nd_moment():
    x = torch.randn([5, 9], dtype=torch.float64) * 3 + 1
    y = sg2.normalize_2nd_moment(x)
    torch.testing.assert_close(y, x / torch.sqrt((x ** 2).mean(dim=1, keepdim=True) + 1e-8))
    torch.testing.assert_close(y.square().mean(dim=1), torch.ones(5, dtype=torch.float64))

def test_mapping_truncation():
    G = make_G('skip', c_dim=4).eval()
    z, c = _inputs(4)
    w_avg = G.mapping.w_avg.clone()
    with torch.no_grad():
        ws = G.mapping(z, c)
        assert ws.shape == (4, G.num_ws, W_DIM)
        assert torch.equal(ws, ws[:, :1].expand_as(ws))            # one w broadcast to all ws
        cut = G.mapping(z, c, truncation_psi=0.7, truncation_cutoff=2)
        torch.testing.assert_close(cut[:, :2], w_avg + 0.7 * (ws[:, :2] - w_avg))
        assert torch.equal(cut[:, 2:], ws[:, 2:])
        full = G.mapping(z, c, truncation_psi=0.7)
        torch.testing.assert_close(full, w_avg + 0.7 * (ws - w_avg))
        torch.testing.assert_close(G.mapping(z, c, truncation_psi=0), w_avg.expand_as(ws))
        # G(z, c) with truncation is synthesis of the truncated ws.
        img = G(z, c, truncation_psi=0.7, truncation_cutoff=2, noise_mode='const')
        assert torch.equal(img, G.synthesis(cut, noise_mode='const'))
    assert torch.equal(G.mapping.w_avg, w_avg)                      # eval: never updated

def test_mapping_w_avg_update():
    G = make_G('skip', c_dim=4)
    mapping = G.mapping
    z, c = _inputs(4)
    beta = mapping.w_avg_beta
    assert beta == 0.995

    def check(updates, **kwargs):
        before = mapping.w_avg.clone()
        with torch.no_grad():
            ws = mapping(z, c, **kwargs)
        if updates:
            expected = beta * before + (1 - beta) * ws[:, 0].mean(dim=0)
            torch.testing.assert_close(mapping.w_avg, expected)
            assert not torch.equal(mapping.w_avg, before)
        else:
            assert torch.equal(mapping.w_avg, before)

    mapping.train()
    check(True)                              # ADA: tracked in training mode
    check(False, skip_w_avg_update=True)
    check(False, update_emas=False)          # an explicit update_emas decides (StyleGAN3)
    mapping.eval()
    check(False)
    check(True, update_emas=True)
    G.train()                                # through G: the same rules
    before = mapping.w_avg.clone()
    with torch.no_grad():
        G(z, c, skip_w_avg_update=True)
        G(z, c, update_emas=False)
    assert torch.equal(mapping.w_avg, before)
    with torch.no_grad():
        G(z, c)
    assert not torch.equal(mapping.w_avg, before)

def test_noise_modes():
    G = make_G('resnet', c_dim=4, conv_clamp=256).eval()
    z, c = _inputs(4)
    with torch.no_grad():
        const = G(z, c, noise_mode='const')
        assert torch.equal(const, G(z, c, noise_mode='const'))
        none = G(z, c, noise_mode='none')
        r1 = G(z, c)                                      # 'random' is the default
        r2 = G(z, c, noise_mode='random')
        torch.manual_seed(3)
        r3 = G(z, c, noise_mode='random')
        torch.manual_seed(3)
        r4 = G(z, c, noise_mode='random')
        assert torch.equal(r3, r4) and not torch.equal(r1, r2)
        assert not torch.equal(const, none) and not torch.equal(r1, const)

        G0 = copy.deepcopy(G)
        for m in G0.modules():
            if isinstance(m, sg2.SynthesisLayer):
                m.noise_strength.zero_()
        for mode in ['const', 'random', 'none']:                # zero strength == no noise
            assert torch.equal(G0(z, c, noise_mode=mode), none)

        G1 = copy.deepcopy(G)
        G1.synthesis.b16.conv1.noise_const.mul_(-1)             # 'const' uses the buffer
        assert not torch.equal(G1(z, c, noise_mode='const'), const)
        assert torch.equal(G1(z, c, noise_mode='none'), none)
        with pytest.raises(AssertionError):
            G(z, c, noise_mode='bogus')

@pytest.mark.parametrize('arch', ['orig', 'skip', 'resnet'])
def test_output_shape_and_gradients_reach_every_parameter(arch):
    G = make_G(arch, c_dim=4, img_channels=3, conv_clamp=256).train()
    z, c = _inputs(4)
    img = G(z.double(), c, noise_mode='random')               # float64 z accepted
    assert img.shape == (4, 3, RES, RES) and img.dtype == torch.float32
    weight = torch.randn(img.shape, generator=torch.Generator().manual_seed(0))
    (img * weight).sum().backward()
    for name, p in G.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

def test_fused_and_unfused_generator_agree():
    G = make_G('skip', c_dim=4, conv_clamp=256).eval()
    z, c = _inputs(4)
    with torch.no_grad():
        a = G(z, c, noise_mode='const', fused_modconv=True)
        b = G(z, c, noise_mode='const', fused_modconv=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

def test_fp16_blocks_and_force_fp32():
    G16 = make_G('skip', num_fp16_res=2).eval()
    assert [getattr(G16.synthesis, f'b{r}').use_fp16 for r in [4, 8, 16]] == [False, True, True]
    G32 = make_G('skip', num_fp16_res=0).eval()
    G32.load_state_dict(G16.state_dict())
    z, c = _inputs(0)
    with torch.no_grad():
        ref = G32(z, c, noise_mode='const')
        assert torch.equal(G16(z, c, noise_mode='const', force_fp32=True), ref)
        half = G16(z, c, noise_mode='const')               # ADA: fp16 on any device by default
    assert half.dtype == torch.float32
    err = (half - ref).abs().max().item()
    assert 0 < err < 0.1 * ref.abs().max().item()

#----------------------------------------------------------------------------
# (d) Minibatch standard deviation and the discriminator.

def _naive_mbstd(x, group_size, num_channels):
    N, C, H, W = x.shape
    G = N if group_size is None else min(group_size, N)
    n = N // G
    extra = torch.empty([N, num_channels, H, W], dtype=x.dtype)
    for i in range(N):
        members = x[[j for j in range(N) if j % n == i % n]]   # [G, C, H, W]
        std = (members.var(dim=0, unbiased=False) + 1e-8).sqrt()
        for f in range(num_channels):
            part = std[f * (C // num_channels):(f + 1) * (C // num_channels)]
            extra[i, f] = part.mean()
    return torch.cat([x, extra], dim=1)

@pytest.mark.parametrize('group_size,num_channels,N', [(2, 1, 4), (4, 2, 8), (None, 1, 3), (8, 1, 4)])
def test_minibatch_std_vs_naive(group_size, num_channels, N):
    x = torch.randn([N, 6, 3, 3], dtype=torch.float64)
    out = sg2.MinibatchStdLayer(group_size, num_channels)(x)
    assert out.shape == (N, 6 + num_channels, 3, 3)
    torch.testing.assert_close(out, _naive_mbstd(x, group_size, num_channels), rtol=1e-10, atol=1e-12)

def test_minibatch_std_rejects_indivisible_batch():
    with pytest.raises(RuntimeError):
        sg2.MinibatchStdLayer(2)(torch.randn([3, 4, 2, 2]))

def test_discriminator_projection_and_gradients():
    D = make_D('resnet', c_dim=4, img_channels=3).train()
    z, c = _inputs(4)
    img = torch.randn([4, 3, RES, RES], requires_grad=True)
    logits = D(img, c)
    assert logits.shape == (4, 1)
    logits.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    for name, p in D.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Conditioning: logit = <out(features), mapping(c)> / sqrt(cmap_dim).
    with torch.no_grad():
        feats = []
        hook = D.b4.out.register_forward_hook(lambda m, i, o: feats.append(o))
        logits = D(img, c)
        hook.remove()
        cmap = D.mapping(None, c)
        torch.testing.assert_close(logits, (feats[0] * cmap).sum(1, keepdim=True) / math.sqrt(32))

#----------------------------------------------------------------------------
# Equalized learning rate and the layer formulas.

def test_fully_connected_equalized_lr():
    torch.manual_seed(0)
    layer = sg2.FullyConnectedLayer(6, 5, activation='lrelu', lr_multiplier=0.01, bias_init=0.5)
    assert torch.allclose(layer.bias, torch.full([5], 0.5))
    x = torch.randn([3, 6])
    w = layer.weight * 0.01 / math.sqrt(6)
    b = layer.bias * 0.01
    torch.testing.assert_close(layer(x), F.leaky_relu(x @ w.t() + b, 0.2) * math.sqrt(2))
    linear = sg2.FullyConnectedLayer(6, 5, lr_multiplier=0.1)
    with torch.no_grad():
        linear.bias.normal_()
    torch.testing.assert_close(linear(x), x @ (linear.weight * 0.1 / math.sqrt(6)).t() + linear.bias * 0.1)

def test_conv2d_layer_formula():
    torch.manual_seed(0)
    layer = sg2.Conv2dLayer(4, 6, kernel_size=3, activation='lrelu', conv_clamp=0.5)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn([2, 4, 5, 5])
    y = F.conv2d(x, layer.weight / math.sqrt(4 * 9), layer.bias, padding=1)
    ref = (F.leaky_relu(y, 0.2) * math.sqrt(2) * 0.5).clamp(-0.25, 0.25)
    torch.testing.assert_close(layer(x, gain=0.5), ref)

def test_synthesis_and_torgb_layer_formulas():
    torch.manual_seed(0)
    layer = _perturb(sg2.SynthesisLayer(4, 6, w_dim=W_DIM, resolution=5, conv_clamp=1.0), 1).double()
    layer.resample_filter = layer.resample_filter.float()      # FIR filters stay float32
    x = torch.randn([2, 4, 5, 5], dtype=torch.float64)
    w = torch.randn([2, W_DIM], dtype=torch.float64)
    styles = w @ (layer.affine.weight / math.sqrt(W_DIM)).t() + layer.affine.bias
    y = _naive_modconv(x, layer.weight, styles, layer.noise_const * layer.noise_strength, True, padding=1)
    ref = (F.leaky_relu(y + layer.bias.reshape(1, -1, 1, 1), 0.2) * math.sqrt(2) * 0.7).clamp(-0.7, 0.7)
    for fused in [True, False]:
        out = layer(x, w, noise_mode='const', fused_modconv=fused, gain=0.7)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    torgb = _perturb(sg2.ToRGBLayer(4, 3, w_dim=W_DIM), 2).double()
    styles = (w @ (torgb.affine.weight / math.sqrt(W_DIM)).t() + torgb.affine.bias) / math.sqrt(4)
    ref = _naive_modconv(x, torgb.weight, styles, None, False, padding=0) + torgb.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(torgb(x, w), ref, rtol=1e-10, atol=1e-10)

def test_block_architectures_compose_layers():
    """resnet: sqrt(1/2) * (skip(x) + conv1(conv0(x))); skip: img = upsample(img) + torgb(x)."""
    torch.manual_seed(0)
    kw = dict(w_dim=W_DIM, resolution=8, img_channels=3, is_last=False)
    x = torch.randn([2, 6, 4, 4])
    img = torch.randn([2, 3, 4, 4])
    ws = torch.randn([2, 3, W_DIM])
    block = _perturb(sg2.SynthesisBlock(6, 5, architecture='resnet', **kw), 0).eval()
    with torch.no_grad():
        out, out_img = block(x, None, ws[:, :2], noise_mode='const')
        h = block.conv1(block.conv0(x, ws[:, 0], noise_mode='const'), ws[:, 1], noise_mode='const')
        torch.testing.assert_close(out, (block.skip(x) + h) * math.sqrt(0.5))
        assert out_img is None                                  # no ToRGB before the last block
        block = _perturb(sg2.SynthesisBlock(6, 5, architecture='skip', **kw), 1).eval()
        out, out_img = block(x, img, ws, noise_mode='const')
        torch.testing.assert_close(out, block.conv1(block.conv0(x, ws[:, 0], noise_mode='const'),
            ws[:, 1], noise_mode='const'))
        torch.testing.assert_close(out_img, sg2.upfirdn2d.upsample2d(img, block.resample_filter) +
            block.torgb(out, ws[:, 2]))

        dblock = _perturb(sg2.DiscriminatorBlock(5, 5, 6, resolution=8, img_channels=3,
            first_layer_idx=0, architecture='resnet'), 2)
        x = torch.randn([2, 5, 8, 8])
        out, _ = dblock(x, None)
        torch.testing.assert_close(out, (dblock.skip(x) + dblock.conv1(dblock.conv0(x))) * math.sqrt(0.5))

def test_safe_loader_refuses_sources_without_marker():
    """A pickle whose embedded source lacks 'class SynthesisBlock' (a StyleGAN3 networks file,
    say) is not rebuilt as our StyleGAN2 classes; it loads as an inert placeholder."""
    buf = io.BytesIO()
    pickle.dump(dict(G_ema=_for_pickle(make_G('skip')), augment_pipe=None), buf)
    raw = buf.getvalue()
    assert b'class SynthesisBlock' in raw
    data = safe_pickle.load(io.BytesIO(raw.replace(b'class SynthesisBlock', b'class SynthesisBlocX')))
    assert isinstance(data['G_ema'], safe_pickle.UnknownPersistentObject)
    with pytest.raises(safe_pickle.UnsafePickleError):
        safe_pickle.require_module(data, 'G_ema')
    assert isinstance(safe_pickle.load(io.BytesIO(raw))['G_ema'], sg2.Generator)
