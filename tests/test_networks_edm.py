"""EDM networks: preconditioning formulas, NVlabs parameter names, building blocks."""

import math

import numpy as np
import pytest
import torch

from training import networks_edm as N

class Probe(torch.nn.Module):
    """Stands in for the UNet: records its inputs and returns a fixed pattern."""
    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        self.seen = dict(x=x, noise=noise_labels, labels=class_labels, aug=augment_labels)
        pattern = torch.linspace(-1, 1, x[0].numel()).reshape(x.shape[1:])
        return pattern.repeat(self.out_channels // x.shape[1], 1, 1).expand(x.shape[0], -1, -1, -1).clone()

def _with_probe(net, channels_factor=1):
    net.model = Probe(net.img_channels * channels_factor)
    return net

SMALL = dict(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=[1],
    num_blocks=1, attn_resolutions=[])

def _check(net, sigma, c_skip, c_out, c_in, c_noise):
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    labels = torch.eye(3)[[0, 1, 2]]
    F = net.model(torch.zeros(1, 2, 8, 8), torch.zeros(1), None)[:, :2].to(torch.float64)
    out = net(x, sigma, labels, augment_labels=torch.ones(3, 9))
    seen = net.model.seen
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), c_skip(s) * x + c_out(s) * F, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen['x'].double(), c_in(s) * x.float().double(), rtol=1e-6, atol=1e-6)
    # float32 cancellation in VP's sigma_inv at small sigma costs ~1e-4 absolute.
    torch.testing.assert_close(seen['noise'].double(), c_noise(s).flatten(), rtol=1e-5, atol=5e-4)
    assert torch.equal(seen['labels'], labels)
    assert seen['aug'] is not None

SIGMAS = [torch.tensor([0.01, 0.5, 20.0]), torch.tensor(2.0, dtype=torch.float64)]

@pytest.mark.parametrize('sigma', SIGMAS)
def test_edm_precond_formula(sigma):
    net = _with_probe(N.EDMPrecond(model_type='SongUNet', sigma_data=0.4, **SMALL))
    sd = 0.4
    _check(net, sigma, lambda s: sd**2 / (s**2 + sd**2), lambda s: s * sd / (s**2 + sd**2).sqrt(),
        lambda s: 1 / (s**2 + sd**2).sqrt(), lambda s: s.log() / 4)

@pytest.mark.parametrize('sigma', SIGMAS)
def test_ve_precond_formula(sigma):
    net = _with_probe(N.VEPrecond(**SMALL))
    _check(net, sigma, lambda s: 1, lambda s: s, lambda s: torch.ones_like(s), lambda s: (s / 2).log())
    assert (net.sigma_min, net.sigma_max) == (0.02, 100)

@pytest.mark.parametrize('sigma', SIGMAS)
def test_vp_precond_formula(sigma):
    net = _with_probe(N.VPPrecond(**SMALL))
    bd, bm, M = 19.9, 0.1, 1000
    inv = lambda s: ((bm**2 + 2 * bd * (1 + s**2).log()).sqrt() - bm) / bd
    _check(net, sigma, lambda s: 1, lambda s: -s, lambda s: 1 / (s**2 + 1).sqrt(), lambda s: (M - 1) * inv(s))
    sigma_of_t = lambda t: math.sqrt(math.exp(0.5 * bd * t**2 + bm * t) - 1)
    # Computed in float32 as in NVlabs EDM, where exp(x)-1 cancels: 0.000977 for 0.0010005.
    assert net.sigma_min == pytest.approx(sigma_of_t(1e-5), rel=3e-2)
    assert net.sigma_max == pytest.approx(sigma_of_t(1.0), rel=1e-6)
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t)

def _iddpm_levels(M=1000, C1=0.001, C2=0.008):
    alpha_bar = lambda j: math.sin(0.5 * math.pi * j / M / (C2 + 1)) ** 2
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C1) - 1)
    return np.array(u)

def test_iddpm_precond_levels_and_formula():
    net = _with_probe(N.iDDPMPrecond(model_type='SongUNet', **SMALL), channels_factor=2)
    u = _iddpm_levels()
    np.testing.assert_allclose(net.u.numpy(), u, rtol=5e-4) # float32 recursion
    assert net.sigma_min == pytest.approx(u[999], rel=1e-3) and net.sigma_max == pytest.approx(u[0], rel=1e-5)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    idx = torch.tensor([int(np.argmin(np.abs(u - s))) for s in sigma.tolist()])
    assert torch.equal(net.round_sigma(sigma, return_index=True), idx)
    torch.testing.assert_close(net.round_sigma(sigma), torch.as_tensor(u[idx.numpy()], dtype=torch.float32))
    # The inner network predicts 2*C channels; only the first C are used.
    _check(net, sigma, lambda s: 1, lambda s: -s, lambda s: 1 / (s**2 + 1).sqrt(),
        lambda s: (999 - idx).to(torch.float64))

def test_fp16_flag_is_ignored_off_cuda():
    net = N.EDMPrecond(use_fp16=True, model_type='SongUNet', **SMALL)
    out = net(torch.randn(2, 2, 8, 8), torch.tensor([1.0, 2.0]), torch.eye(3)[:2])
    assert out.dtype == torch.float32

#----------------------------------------------------------------------------

def test_nvlabs_parameter_names_ddpmpp():
    net = N.VPPrecond(img_resolution=16, img_channels=3, label_dim=10, augment_dim=9,
        model_channels=16, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[8])
    keys = set(net.state_dict())
    expected = {
        'model.map_label.weight', 'model.map_label.bias', 'model.map_augment.weight',
        'model.map_layer0.weight', 'model.map_layer1.bias', 'model.enc.16x16_conv.weight',
        'model.enc.16x16_block0.norm0.weight', 'model.enc.16x16_block0.affine.weight',
        'model.enc.8x8_down.conv0.resample_filter', 'model.enc.8x8_down.skip.weight',
        'model.enc.8x8_block1.qkv.weight', 'model.enc.8x8_block1.proj.bias',
        'model.enc.8x8_block0.skip.weight', 'model.dec.8x8_in0.norm2.weight',
        'model.dec.8x8_in1.conv1.weight', 'model.dec.8x8_block2.qkv.weight',
        'model.dec.16x16_up.conv0.weight', 'model.dec.16x16_block0.skip.weight',
        'model.dec.16x16_aux_norm.weight', 'model.dec.16x16_aux_conv.weight'}
    assert expected <= keys
    assert 'model.map_augment.bias' not in keys and 'model.dec.8x8_block0.qkv.weight' not in keys
    assert 'model.enc.16x16_block0.qkv.weight' not in keys # no attention at 16x16

def test_nvlabs_parameter_names_ncsnpp_and_adm():
    ncsn = N.VEPrecond(img_resolution=16, img_channels=3, model_channels=16, channel_mult=[1, 2, 2],
        num_blocks=1, attn_resolutions=[8], embedding_type='fourier', channel_mult_noise=2,
        encoder_type='residual', decoder_type='skip', resample_filter=[1, 3, 3, 1])
    keys = set(ncsn.state_dict())
    assert {'model.map_noise.freqs', 'model.enc.8x8_aux_residual.weight',
        'model.enc.4x4_aux_residual.weight', 'model.dec.8x8_aux_up.resample_filter',
        'model.dec.4x4_aux_conv.weight', 'model.dec.16x16_aux_norm.bias'} <= keys
    assert 'model.dec.4x4_aux_up.resample_filter' not in keys # the lowest level has none
    assert ncsn.model.enc['8x8_aux_residual'].resample_filter.shape == (1, 1, 4, 4)

    adm = N.iDDPMPrecond(img_resolution=16, img_channels=3, label_dim=5, model_channels=64,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    keys = set(adm.state_dict())
    assert {'u', 'model.map_label.weight', 'model.out_norm.weight', 'model.out_conv.weight',
        'model.enc.8x8_down.conv0.weight', 'model.enc.8x8_block0.qkv.weight',
        'model.dec.8x8_block0.qkv.weight', 'model.dec.8x8_block1.qkv.weight'} <= keys
    assert 'model.map_label.bias' not in keys
    assert 'model.enc.8x8_down.skip.weight' not in keys # a weightless resampling skip
    assert adm.model.out_conv.weight.shape[0] == 6 # mean and variance channels
    assert adm.model.dec['8x8_block0'].num_heads == 2 # 128 channels / 64 per head

#----------------------------------------------------------------------------

def test_embeddings_against_formulas():
    x = torch.tensor([0.3, -1.2, 5.0])
    pos = N.PositionalEmbedding(num_channels=8, endpoint=True)(x)
    f = (1 / 10000) ** (torch.arange(4) / 3)
    ref = torch.cat([torch.cos(x[:, None] * f), torch.sin(x[:, None] * f)], 1)
    torch.testing.assert_close(pos, ref, rtol=1e-4, atol=1e-5) # float32 pow rounding
    torch.manual_seed(0)
    four = N.FourierEmbedding(num_channels=8)
    arg = 2 * math.pi * x[:, None].double() * four.freqs.double()
    # Arguments reach ~500 rad, where float32 rounding alone is ~3e-5.
    torch.testing.assert_close(four(x), torch.cat([arg.cos(), arg.sin()], 1).float(), rtol=0, atol=2e-4)

def test_attention_matches_scaled_dot_product():
    q, k, v = torch.randn(3, 2, 16, 6).unbind(0)
    w = N.attention_weights(q, k)
    ours = torch.einsum('nqk,nck->ncq', w, v)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)

def test_resampling_conv_matches_independent_ops():
    x = torch.randn(2, 3, 8, 8)
    down = N.Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    box = torch.tensor([1., 3, 3, 1]); f = torch.outer(box, box) / 64
    ref = torch.nn.functional.conv2d(x, f.expand(3, 1, 4, 4), groups=3, stride=2, padding=1)
    torch.testing.assert_close(down(x), ref)
    up = N.Conv2d(3, 3, kernel=0, up=True)
    torch.testing.assert_close(up(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))

def test_dropout_and_label_dropout_only_in_training():
    net = N.EDMPrecond(label_dropout=1.0, dropout=0.5, model_type='DhariwalUNet',
        img_resolution=8, img_channels=1, label_dim=4, model_channels=64, channel_mult=[1],
        num_blocks=1, attn_resolutions=[])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, s, c = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.eye(4)[:2]
    net.eval()
    assert torch.equal(net(x, s, c), net(x, s, c))
    assert not torch.equal(net(x, s, c), net(x, s, torch.zeros(2, 4)))
    net.train()
    torch.manual_seed(0); a = net(x, s, c)
    torch.manual_seed(0); b = net(x, s, torch.zeros(2, 4)) # labels dropped with p=1
    assert torch.equal(a, b)
    assert not torch.equal(net(x, s, c), net(x, s, c)) # dropout active

def test_gradients_reach_every_parameter():
    net = N.EDMPrecond(model_type='SongUNet', img_resolution=8, img_channels=1, label_dim=2,
        augment_dim=3, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
        dropout=0)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    net(x, torch.tensor([0.3, 3.0]), torch.eye(2), augment_labels=torch.randn(2, 3)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())
