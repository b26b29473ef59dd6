"""VarDiU on image generators: the convolutional encoder's density, the generator gradient with
it against its formula, and an exact resume of a tiny image run."""

import math
import os

import pytest
import torch
from torch.autograd.functional import vjp

from refine import run
from refine.divergences import make_divergence
from refine.divergences.vardiu import ConvEncoder, GaussianEncoder
from tests import real_data_golden as golden
from torch_utils import train_utils
from torch_utils.rng import StreamRandom

F64 = torch.float64
SHAPE = (2, 4, 4) # channels, height, width

def _encoder(seed=0, label_dim=3):
    """A small convolutional encoder with its zero-initialised output layer randomised, so that
    the mean and the variance depend on x_t, σ and the labels."""
    torch.manual_seed(seed)
    enc = ConvEncoder(SHAPE, SHAPE, sigma_data=0.5, label_dim=label_dim, channels=8, blocks=2, emb_dim=16)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return enc.double()

def _labels(n, label_dim=3, seed=1):
    idx = torch.randint(label_dim, [n], generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(idx, label_dim).to(F64)

class GaussianImageTeacher:
    """Data N(0, s² I) on images: D(x, σ) = x s² / (s² + σ²) exactly."""
    sigma_data = 0.5

    def __call__(self, x, sigma, labels=None):
        s2 = self.sigma_data ** 2
        return x * s2 / (s2 + sigma.to(x.dtype).reshape(-1, 1, 1, 1) ** 2)

def test_conv_encoder_log_prob_is_the_gaussian_density():
    enc = _encoder()
    div = make_divergence('vardiu', sigma_data=0.5, encoder=enc)
    g = torch.Generator().manual_seed(3)
    n = 6
    x_t = torch.randn(n, *SHAPE, dtype=F64, generator=g)
    z = torch.randn(n, *SHAPE, dtype=F64, generator=g)
    sigma = torch.tensor([0.002, 0.01, 0.05, 0.2, 0.43, 1.0], dtype=F64)
    c = _labels(n)
    mean, log_var = enc(x_t, sigma, c)
    assert mean.shape == log_var.shape == (n, *SHAPE)
    assert float(mean.detach().std()) > 0.01 and float(log_var.detach().std()) > 0.01 # the outputs are not constant
    assert bool((log_var <= 0).all()) # never wider than the prior
    expected = torch.distributions.Normal(mean, (0.5 * log_var).exp()).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(div.encoder_log_prob(z, x_t, sigma, c), expected, rtol=1e-10, atol=1e-8)
    # By hand, from ln τ² = −softplus(2(h − ln σ)) with h the raw second output:
    raw = enc.out(torch.nn.functional.silu(enc.norm(_features(enc, x_t, sigma, c))))
    h = raw[:, SHAPE[0]:]
    var = 1 / (1 + (h.exp() / sigma.reshape(-1, 1, 1, 1)) ** 2)
    by_hand = (-0.5 * (z - raw[:, :SHAPE[0]]) ** 2 / var - 0.5 * var.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    torch.testing.assert_close(div.encoder_log_prob(z, x_t, sigma, c), by_hand, rtol=1e-10, atol=1e-8)

def _features(enc, x_t, sigma, c):
    """The encoder's last features, recomputed step by step from its layers."""
    c_in = 1 / (sigma ** 2 + enc.sigma_data ** 2).sqrt()
    emb = enc.emb(torch.cat([enc.noise_emb(sigma.log() / 4), c], dim=1))
    h = enc.stem(c_in.reshape(-1, 1, 1, 1) * x_t)
    for block in enc.blocks:
        h = block(h, emb)
    return h

def test_conv_encoder_starts_near_the_prior():
    enc = ConvEncoder((1, 8, 8), (1, 8, 8), sigma_data=0.5, init_gain=0.05)
    x_t, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.002, 0.05, 0.43, 2.0])
    mean, log_var = enc(x_t, sigma)
    assert bool((mean == 0).all())
    expected = -torch.log1p((0.05 / sigma) ** 2) # 1/τ² = 1 + (g/σ)²
    torch.testing.assert_close(log_var, expected.reshape(-1, 1, 1, 1).expand_as(log_var))
    with pytest.raises(ValueError, match='encoder=mlp'):
        ConvEncoder((1, 8, 8), (16,), sigma_data=0.5)

def test_vardiu_gradient_with_the_conv_encoder_is_its_formula():
    enc = _encoder(seed=4)
    teacher = GaussianImageTeacher()
    div = make_divergence('vardiu', sigma_data=0.5, encoder=enc)
    div.set_progress(100_000) # p = 0.1 + 0.5 * 1.9
    n = 8
    z = div.draw_latents(StreamRandom(0, 0, 'z', n), SHAPE).to(F64)
    c = _labels(n)
    x_g = (0.3 * z + 0.1).requires_grad_(True)
    loss, stats = div.generator_loss(teacher, None, x_g, c, StreamRandom(0, 0, 'gen', n), z=z)
    grad, = torch.autograd.grad(loss.sum(), x_g)

    # Independently: the same draws, the Gaussian log-density's x_t-gradient through the encoder
    # by a vector-Jacobian product, and m = (D − x_g)/σ² of the exact teacher.
    rnd = StreamRandom(0, 0, 'gen', n)
    u = rnd.rand()
    sigma = (0.002 + u ** 1.05 * (0.43 - 0.002))[0::2].repeat_interleave(2) # float32, as drawn
    e = rnd.randn(*SHAPE)[0::2]
    eps = torch.stack([e, -e], dim=1).reshape(n, *SHAPE)
    torch.testing.assert_close(stats['sigma'], sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    x_t = x_g.detach() + s * eps
    mean, log_var = enc(x_t, sigma, c)
    # ∂/∂μ and ∂/∂lnτ² of Σ log N(z; μ, τ²), pushed back to x_t through the encoder.
    d_mean = (z - mean) * torch.exp(-log_var)
    d_log_var = 0.5 * (z - mean) ** 2 * torch.exp(-log_var) - 0.5
    _, (dlogq,) = vjp(lambda x: torch.cat(enc(x, sigma, c), dim=1), (x_t,), torch.cat([d_mean, d_log_var], dim=1).detach())
    m = (teacher(x_t, sigma) - x_g.detach()) / s ** 2
    w = (sigma / 0.43) ** 2
    torch.testing.assert_close(grad, -w.reshape(-1, 1, 1, 1) * (dlogq + m), rtol=1e-6, atol=1e-9)

    # During the encoder warm-up the generator gets nothing and the encoder still learns.
    div = make_divergence('vardiu', sigma_data=0.5, encoder=enc, encoder_warmup_kimg=1.0)
    div.set_progress(500)
    loss, _ = div.generator_loss(teacher, None, x_g, c, StreamRandom(0, 0, 'gen', n), z=z)
    enc.zero_grad()
    loss.sum().backward()
    assert x_g.grad is None and enc.out.weight.grad.abs().sum() > 0

def test_encoder_is_chosen_by_the_generator():
    from training.networks_generators import LatentGenerator, OneStepGenerator # pylint: disable=import-outside-toplevel
    from training.networks_mlp import MLPGenerator # pylint: disable=import-outside-toplevel
    vec = LatentGenerator(MLPGenerator(z_dim=2, dim=2, hidden=8, num_layers=1))
    net = torch.nn.Module()
    net.img_channels, net.img_resolution, net.label_dim = 1, 8, 0
    img = OneStepGenerator(net, sigma_init=1.0)
    for G, option, kind in [(vec, 'auto', GaussianEncoder), (img, 'auto', ConvEncoder), (img, 'mlp', GaussianEncoder)]:
        div = make_divergence('vardiu', encoder=option)
        div.setup(G=G, teacher=None)
        assert isinstance(div.encoder, kind), (option, kind)
        assert div.module_lr == (1e-3 if kind is ConvEncoder else None)
    div = make_divergence('vardiu', encoder='conv', encoder_lr=3e-4)
    div.setup(G=img, teacher=None)
    assert div.module_lr == 3e-4 and div.options()['encoder'] == 'conv'
    with pytest.raises(ValueError, match='encoder'):
        make_divergence('vardiu', encoder='unet')

def _tiny_image_run(workdir, teacher_pkl, kimg, resume=False):
    o = run.resolve_options(dict(teacher=teacher_pkl, gen='teacher', divergence='vardiu', batch=4,
        lr=1e-3, glr=1e-3, kimg=kimg, tick=0.004, snap=1, seed=3, allow_pickle_code=False))
    torch.manual_seed(o.seed)
    setup = run.prepare(o)
    os.makedirs(workdir, exist_ok=True)
    state = train_utils.latest_training_state(workdir) if resume else None
    result = run.launch(setup, workdir, resume_state=state, log=lambda *_: None)
    assert isinstance(result.divergence_modules[0], ConvEncoder)
    return torch.load(train_utils.latest_training_state(workdir), weights_only=True)

def test_tiny_image_run_resumes_bitwise(tmp_path):
    teacher = golden.tiny_teacher(str(tmp_path / 'teacher.pkl'))
    straight = _tiny_image_run(str(tmp_path / 'a'), teacher, kimg=0.008) # 2 generator steps
    _tiny_image_run(str(tmp_path / 'b'), teacher, kimg=0.004)
    resumed = _tiny_image_run(str(tmp_path / 'b'), teacher, kimg=0.008, resume=True)
    assert straight['cur_nimg'] == resumed['cur_nimg'] == 8
    assert golden.digest_state(straight) == golden.digest_state(resumed)
    enc = straight['divergence_modules'][0]
    assert any(float(v.abs().sum()) > 0 for k, v in enc.items() if k.startswith('out.weight')) # it learnt
