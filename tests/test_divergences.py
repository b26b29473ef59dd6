"""The divergence family (sid, dmd, sim, fdiv, vardiu): each generator gradient against its formula
at the same random draws, each update against the exact objective it claims to descend (affine
generator, Gaussian teacher, exact fake score), and each run through refine.py on gmm:ring8."""

import glob
import math
import os

import pytest
import torch
from torch.autograd.functional import vjp

from refine import noise
from refine.divergences import DIVERGENCES, make_divergence
from torch_utils.rng import StreamRandom
from refine.teachers import GMMTeacher
from tests.scripts import load_script

F64 = torch.float64

def _rnd(n, seed=0):
    return StreamRandom(seed, 0, 'gen', n)

def _karras(u, scale, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + u * (lo - hi)) ** rho * scale

def _pair(teacher_and_fake=None):
    teacher = GMMTeacher(means=torch.tensor([[2.0, 0.0], [-1.0, 1.5]]), std=torch.tensor([0.5, 0.8]))
    fake = GMMTeacher(means=torch.tensor([[0.0, 0.5]]), covs=torch.tensor([[[1.5, 0.3], [0.3, 0.7]]]))
    return teacher, fake

def _x_g(n=64, seed=5):
    return torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)

def _jt(net, x_t, sigma, v):
    """Jᵀv for x ↦ net(x, σ) at x_t (an independent autograd path)."""
    return vjp(lambda x: net(x, sigma), x_t, v)[1]

#----------------------------------------------------------------------------
# Generator gradients = formulas, at the same draws.

@pytest.mark.parametrize('alpha', [1.2, 0.5])
def test_sid_gradient_goes_through_both_networks(alpha):
    teacher, fake = _pair()
    x_g = _x_g()
    div = make_divergence('sid', sigma_data=1.0, alpha=alpha)
    loss, _ = div.generator_loss(teacher, fake, x_g, None, _rnd(64))
    grad, = torch.autograd.grad(loss.sum(), x_g)

    rnd = _rnd(64)
    sigma = _karras(0.2 + rnd.rand() * 0.8, 2.0) # t ~ U[0, 0.8]; σ scaled by σ_d/0.5 = 2
    x_t = (x_g + sigma[:, None] * rnd.randn(2)).detach()
    d_t, d_f, x = teacher(x_t, sigma), fake(x_t, sigma), x_g.detach()
    a = d_t - d_f
    b = (d_t - x) - alpha * a
    wf = (x - d_t).abs().mean(1, keepdim=True)
    # L = aᵀb / wf:  ∇ = [J_φᵀ(b + (1 − α)a) − J_ψᵀ(b − αa) − a] / wf
    expected = (_jt(teacher, x_t, sigma, b + (1 - alpha) * a) - _jt(fake, x_t, sigma, b - alpha * a) - a) / wf
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)
    # ... which is not the direct-path gradient alone.
    assert (grad - (d_f - d_t) / wf).abs().max() > 1e-2

def test_sid_fine_fraction_mixes_noise_levels_on_the_same_stream():
    """fine_fraction f: a share f of SiD's σ from t ~ U[0, fine_tmax/1000], the rest from t ~ U[0, tmax/1000],
    split on the same uniform draw (so off means bit-identical levels, and on changes only the levels)."""
    n = 20000
    plain = make_divergence('sid', sigma_data=1.0).gen_sigma.sample(_rnd(n))
    torch.testing.assert_close(make_divergence('sid', sigma_data=1.0, fine_fraction=0.0).gen_sigma.sample(_rnd(n)),
        plain, rtol=0, atol=0)
    mixed = make_divergence('sid', sigma_data=1.0, fine_fraction=0.5, fine_tmax=200).gen_sigma.sample(_rnd(n))
    v = _rnd(n).rand()
    u = torch.where(v < 0.5, 0.8 + (v / 0.5) * 0.2, 0.2 + ((v - 0.5) / 0.5) * 0.8) # independent formula
    torch.testing.assert_close(mixed, _karras(u, 2.0), rtol=1e-6, atol=0)
    s_fine = _karras(torch.tensor(0.8), 2.0) # σ at t = 0.2, scaled
    assert (mixed <= s_fine).float().mean() == pytest.approx(0.5 + 0.5 * 0.25, abs=0.01)
    assert (plain <= s_fine).float().mean() == pytest.approx(0.25, abs=0.01)
    assert mixed.max() <= _karras(torch.tensor(0.2), 2.0) * (1 + 1e-6)
    for bad in [dict(fine_fraction=1.0), dict(fine_fraction=0.5, fine_tmax=800), dict(fine_fraction=-0.1)]:
        with pytest.raises(ValueError, match='fine_fraction'):
            make_divergence('sid', **bad)

def test_dmd_gradient_is_normalised_denoiser_difference():
    teacher, fake = _pair()
    x_g = _x_g()
    div = make_divergence('dmd', sigma_data=1.0)
    assert div.fake_steps == 5 and div.default_sigma_init == 80
    loss, _ = div.generator_loss(teacher, fake, x_g, None, _rnd(64))
    grad, = torch.autograd.grad(loss.sum(), x_g)
    rnd = _rnd(64)
    sigma = _karras(0.02 + rnd.rand() * 0.96, 2.0)
    x_t = x_g.detach() + sigma[:, None] * rnd.randn(2)
    d_t = teacher(x_t, sigma)
    expected = (fake(x_t, sigma) - d_t) / (x_g.detach() - d_t).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)

@pytest.mark.parametrize('form', ['sim', 'exact'])
def test_sim_gradient_is_pseudo_huber_surrogate_through_networks(form):
    teacher, fake = _pair()
    x_g = _x_g()
    div = make_divergence('sim', sigma_data=1.0, form=form, huber_c=0.3)
    loss, _ = div.generator_loss(teacher, fake, x_g, None, _rnd(64))
    grad, = torch.autograd.grad(loss.sum(), x_g)

    rnd = _rnd(64)
    sigma = _karras(0.2 + rnd.rand() * 0.8, 2.0)
    x_t = (x_g + sigma[:, None] * rnd.randn(2)).detach()
    c = 0.3 * math.sqrt(2) * 2.0
    d_t, d_f, x = teacher(x_t, sigma), fake(x_t, sigma), x_g.detach()
    delta = d_f - d_t
    n = (delta.square().sum(1, keepdim=True) + c * c).sqrt()
    u = delta / n
    r = d_f - x
    p_r = r / n - delta * (delta * r).sum(1, keepdim=True) / n ** 3 # (∂u/∂Δ) r, symmetric
    # L = −uᵀ(D_ψ − x_g) [+ n − c]:  ∇ = −J_Δᵀ P r − J_ψᵀ u + u  [+ J_Δᵀ u]
    v_delta = -p_r + (u if form == 'exact' else 0)
    expected = _jt(fake, x_t, sigma, v_delta) - _jt(teacher, x_t, sigma, v_delta) - _jt(fake, x_t, sigma, u) + u
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)

@pytest.mark.parametrize('f', ['js', 'kl', 'rkl'])
def test_fdiv_gradient_is_ratio_weighted_dmd(f):
    teacher, fake = _pair()
    x_g = _x_g()
    log_r = lambda x, sigma, labels: 0.8 * x[:, 0] - 0.3 * x[:, 1] + 0.1 * sigma.log() # any function
    div = make_divergence('fdiv', sigma_data=1.0, f=f, ratio=log_r)
    loss, stats = div.generator_loss(teacher, fake, x_g, None, _rnd(64))
    grad, = torch.autograd.grad(loss.sum(), x_g)

    rnd = _rnd(64)
    v = rnd.rand()
    sigma = _karras(0.002 + v * 0.996, 2.0)
    x_t = x_g.detach() + sigma[:, None] * rnd.randn(2)
    r = log_r(x_t, sigma, None).clamp(-10, 10).exp().clamp(0.1, 20)
    bins = (v * 10).floor().long().clamp(max=9) # 10 bins of the σ range
    r = r / torch.stack([r[bins == b].mean() for b in range(10)])[bins]
    h = dict(js=r / (1 + r), kl=r, rkl=torch.ones_like(r))[f]
    h = h / h.mean()
    d_t = teacher(x_t, sigma)
    expected = h[:, None] * (fake(x_t, sigma) - d_t) / (x_g.detach() - d_t).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(stats['h'].to(F64), h, rtol=1e-5, atol=1e-8)

def test_fdiv_data_free_ratio_head_matches_score_difference():
    """ratio='score': the head's loss is σ²‖∇ℓ − (D_φ − D_ψ)/σ²‖², and training it recovers the
    exact log-ratio's gradient (two Gaussians: log r is quadratic)."""
    torch.manual_seed(0)
    teacher = GMMTeacher(means=torch.tensor([[1.0, 0.0]]), std=0.7)
    fake = GMMTeacher(means=torch.tensor([[-0.5, 0.3]]), std=1.0)

    class Gen(torch.nn.Module):
        z_shape = out_shape = (2,)
        label_dim = 0
    div = make_divergence('fdiv', sigma_data=0.5, f='kl', head_hidden=64, head_layers=2)
    div.setup(G=Gen(), teacher=teacher)
    assert div.trainable_modules() == [div.head] and div.module_phase == 'fake'
    x = torch.randn(256, 2)
    loss = div.head_loss(fake, x, None, _rnd(256, 1))
    rnd = _rnd(256, 1)
    sigma = _karras(0.002 + rnd.rand() * 0.996, 1.0)
    x_t = (x + sigma[:, None] * rnd.randn(2)).requires_grad_(True)
    grad, = torch.autograd.grad(div.head(x_t, sigma).sum(), x_t)
    target = teacher(x_t.detach(), sigma) - fake(x_t.detach(), sigma)
    expected = (sigma[:, None] * grad - target / sigma[:, None]).square().sum(1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)

    opt = torch.optim.Adam(div.head.parameters(), lr=3e-3)
    for step in range(300):
        opt.zero_grad()
        div.head_loss(fake, torch.randn(256, 2) * 1.0 + torch.tensor([-0.5, 0.3]), None, _rnd(256, 100 + step)).mean().backward()
        opt.step()
    # Compare ∇ log r with the exact s_φ − s_ψ at σ = 0.5 around the generator's mass.
    xs = (torch.randn(512, 2) + torch.tensor([-0.5, 0.3])).requires_grad_(True)
    s = torch.full([512], 0.5)
    g, = torch.autograd.grad(div.head(xs, s).sum(), xs)
    exact = teacher.score(xs.detach(), s) - fake.score(xs.detach(), s)
    rel = float((g - exact).norm() / exact.norm())
    assert rel < 0.1, rel

class _EncoderOf(torch.nn.Module):
    """The exact posterior q(z | x_t) of x = a + diag(b) z + σ ε, in VarDiU's parameterisation."""
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a.detach().clone(), b.detach().clone()

    def forward(self, x_t, sigma, labels=None):
        s2 = sigma.to(F64)[:, None] ** 2
        v = self.b ** 2 + s2
        mean = self.b * (x_t - self.a) / v
        rho = torch.log(torch.expm1(1 / v.sqrt())) # std = σ softplus(ρ) = σ / √(b² + σ²)
        return mean, rho

def test_vardiu_gradient_and_antithetic_draws():
    teacher, _ = _pair()
    enc = _EncoderOf(torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([1.1, 0.7], dtype=F64))
    div = make_divergence('vardiu', sigma_data=1.0, encoder=enc)
    assert div.fake_steps == 0 and div.uses_latents and div.trainable_modules() == [enc]
    div.set_progress(50_000) # a quarter of the way: p = 0.1 + 0.25 * 1.9
    assert div.current_power == pytest.approx(0.575)
    z = div.draw_latents(_rnd(64, 9), (2,))
    assert torch.equal(z[0::2], z[1::2]) and not torch.equal(z[0], z[2])
    x_g = (z.to(F64) * 1.3 + 0.1).requires_grad_(True)
    loss, stats = div.generator_loss(teacher, None, x_g, None, _rnd(64), z=z)
    grad, = torch.autograd.grad(loss.sum(), x_g)

    rnd = _rnd(64)
    u = rnd.rand()
    sigma = (0.002 + u ** 0.575 * (0.43 - 0.002)) * 2.0
    sigma = sigma[0::2].repeat_interleave(2)
    e = rnd.randn(2)[0::2]
    eps = torch.stack([e, -e], dim=1).reshape(64, 2)
    torch.testing.assert_close(stats['sigma'], sigma)
    x_t = (x_g.detach() + sigma[:, None] * eps).requires_grad_(True)
    mean, rho = enc(x_t, sigma)
    std = sigma[:, None] * torch.nn.functional.softplus(rho)
    log_q = (-0.5 * ((z - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(1)
    dlogq, = torch.autograd.grad(log_q.sum(), x_t)
    m = (teacher(x_t.detach(), sigma) - x_g.detach()) / sigma[:, None] ** 2
    w = (sigma / (0.43 * 2.0)) ** 2
    torch.testing.assert_close(grad, -w[:, None] * (dlogq + m), rtol=1e-6, atol=1e-9)

def test_vardiu_encoder_is_trained_jointly():
    from training.networks_mlp import MLPGenerator # pylint: disable=import-outside-toplevel
    from training.networks_generators import LatentGenerator # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    G = LatentGenerator(MLPGenerator(z_dim=2, dim=2, hidden=32, num_layers=2))
    teacher, _ = _pair()
    div = make_divergence('vardiu', sigma_data=teacher.sigma_data, encoder_hidden=32, encoder_layers=2)
    div.setup(G=G, teacher=teacher)
    z = div.draw_latents(_rnd(32), G.z_shape)
    loss, _ = div.generator_loss(teacher, None, G(z), None, _rnd(32, 1), z=z)
    loss.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in div.encoder.parameters() if p.ndim == 2)
    assert all(p.grad is not None for p in G.parameters())

#----------------------------------------------------------------------------
# Exact objectives: affine generator x = a + B z, Gaussian teacher N(m, S), exact fake score.

class AffineGenerator(torch.nn.Module):
    z_shape, out_shape, label_dim, is_vector = (2,), (2,), 0, True

    def __init__(self, a, B):
        super().__init__()
        self.a = torch.nn.Parameter(torch.as_tensor(a, dtype=F64))
        self.B = torch.nn.Parameter(torch.as_tensor(B, dtype=F64))

    def forward(self, z, c=None):
        return self.a + z.to(F64) @ self.B.T

    def exact_fake_score(self):
        return GMMTeacher(means=self.a.detach()[None], covs=(self.B @ self.B.T).detach()[None])

M = torch.tensor([1.0, -0.5], dtype=F64)
S = torch.tensor([[0.6, 0.2], [0.2, 0.4]], dtype=F64)
EYE = torch.eye(2, dtype=F64)

def _theta(G):
    return torch.cat([G.a.detach().flatten(), G.B.detach().flatten()])

def _split(theta):
    return theta[:2], theta[2:].reshape(2, 2)

def _covs(theta, sigma):
    a, B = _split(theta)
    s2 = sigma.reshape(-1, 1, 1) ** 2
    return a, B, B @ B.T + s2 * EYE, S + s2 * EYE

def _kl(m0, C0, m1, C1):
    """KL(N(m0, C0) ‖ N(m1, C1)) per batch entry."""
    C1_inv = torch.linalg.inv(C1)
    dm = (m1 - m0).expand(C0.shape[0], 2)
    return 0.5 * (torch.einsum('nii->n', C1_inv @ C0) + torch.einsum('ni,nij,nj->n', dm, C1_inv, dm)
        - 2 + torch.logdet(C1) - torch.logdet(C0))

def _fd(objective, theta, eps=1e-5):
    return torch.stack([(objective(theta + eps * e) - objective(theta - eps * e)) / (2 * eps)
        for e in torch.eye(theta.numel(), dtype=F64)])

def _mc_grad(name, n=200_000, G=None, **kwargs):
    """The divergence's parameter gradient (mean over n samples) and the σ it drew."""
    G = G or AffineGenerator([-0.5, 0.8], [[1.2, 0.3], [-0.2, 0.9]])
    teacher = GMMTeacher(means=M[None], covs=S[None])
    div = make_divergence(name, sigma_data=0.5, **kwargs)
    z = _rnd(n, 7).randn(2)
    loss, stats = div.generator_loss(teacher, G.exact_fake_score(), G(z), None, _rnd(n, 1))
    (loss.sum() / n).backward()
    return torch.cat([G.a.grad.flatten(), G.B.grad.flatten()]), stats['sigma'].to(F64), G

def _assert_gradient(mc, exact, rtol=0.05):
    assert torch.allclose(mc, exact, rtol=rtol, atol=rtol * exact.abs().max()), (mc, exact)

def _assert_descent(mc, objective, theta):
    exact = _fd(objective, theta)
    cos = float(mc @ exact / (mc.norm() * exact.norm()))
    assert cos > 0.5, (cos, mc, exact)
    step = 0.02 * mc / mc.abs().max() * theta.abs().max()
    assert objective(theta - step) < objective(theta)
    return cos

def test_sid_half_alpha_is_the_exact_fisher_gradient_and_default_descends():
    def fisher(sigma):
        def objective(theta):
            a, _, C0, C1 = _covs(theta, sigma)
            C0_inv, C1_inv = torch.linalg.inv(C0), torch.linalg.inv(C1)
            Md = C1_inv - C0_inv
            bias = torch.einsum('nij,j->ni', C1_inv, a - M)
            f = torch.einsum('nii->n', Md @ C0 @ Md) + bias.square().sum(1)
            return (sigma ** 4 / 2 * f).mean()
        return objective
    mc, sigma, G = _mc_grad('sid', alpha=0.5, normalise=False)
    _assert_gradient(mc, _fd(fisher(sigma), _theta(G)))
    mc, sigma, G = _mc_grad('sid')
    _assert_descent(mc, fisher(sigma), _theta(G))

def _reverse_ikl(sigma):
    def objective(theta):
        a, _, C0, C1 = _covs(theta, sigma)
        return (sigma ** 2 * _kl(a, C0, M, C1)).mean()
    return objective

def test_dmd_descends_the_integral_kl():
    mc, sigma, G = _mc_grad('dmd', normalise=False)
    _assert_gradient(mc, _fd(_reverse_ikl(sigma), _theta(G)))
    mc, sigma, G = _mc_grad('dmd')
    _assert_descent(mc, _reverse_ikl(sigma), _theta(G))

def test_sim_exact_form_is_the_pseudo_huber_gradient_and_sim_form_descends():
    n, c = 400_000, 0.3 * math.sqrt(2)
    g = torch.Generator().manual_seed(11)
    zz, ee = torch.randn(n, 2, dtype=F64, generator=g), torch.randn(n, 2, dtype=F64, generator=g)
    def huber(sigma_draws):
        sigma = sigma_draws[torch.randint(len(sigma_draws), [n], generator=torch.Generator().manual_seed(3))]
        def objective(theta): # E_σ E_{x ~ p_g,σ}[d_c(σ²(s_g − s_d))], x = a + B z + σ ε (common numbers)
            a, B, C0, C1 = _covs(theta, sigma)
            x = a + zz @ B.T + sigma[:, None] * ee
            s_g = -torch.linalg.solve(C0, (x - a)[..., None])[..., 0]
            s_d = -torch.linalg.solve(C1, (x - M)[..., None])[..., 0]
            delta = sigma[:, None] ** 2 * (s_g - s_d)
            return ((delta.square().sum(1) + c * c).sqrt() - c).mean()
        return objective
    mc, sigma, G = _mc_grad('sim', form='exact', huber_c=0.3)
    _assert_gradient(mc, _fd(huber(sigma), _theta(G)), rtol=0.06)
    mc, sigma, G = _mc_grad('sim', huber_c=0.3)
    _assert_descent(mc, huber(sigma), _theta(G))

def test_fdiv_forward_kl_with_exact_ratio_descends_the_integral_forward_kl():
    G = AffineGenerator([-0.5, 0.8], [[1.2, 0.3], [-0.2, 0.9]])
    teacher, fake = GMMTeacher(means=M[None], covs=S[None]), G.exact_fake_score()
    log_r = lambda x, sigma, labels: teacher.log_prob(x, sigma) - fake.log_prob(x, sigma)
    def forward_ikl(sigma):
        def objective(theta):
            a, _, C0, C1 = _covs(theta, sigma)
            return (sigma ** 2 * _kl(M, C1, a, C0)).mean()
        return objective
    mc, sigma, G = _mc_grad('fdiv', G=G, f='kl', ratio=log_r, normalise=False, normalise_ratio=False,
        normalise_h=False, ratio_min=0, ratio_max=math.inf, logit_clip=math.inf)
    _assert_gradient(mc, _fd(forward_ikl(sigma), _theta(G)))
    G = AffineGenerator([-0.5, 0.8], [[1.2, 0.3], [-0.2, 0.9]])
    mc, sigma, G = _mc_grad('fdiv', G=G, f='kl', ratio=log_r)
    _assert_descent(mc, forward_ikl(sigma), _theta(G))

def test_vardiu_bound_gradient_with_exact_posterior_is_the_weighted_kl_gradient():
    """At the optimal encoder the bound touches the KL, so their θ-gradients agree (envelope)."""
    n = 200_000
    G = AffineGenerator([-0.5, 0.8], [[1.2, 0.0], [0.0, 0.9]]) # diagonal: the posterior is mean-field
    teacher = GMMTeacher(means=M[None], covs=S[None])
    div = make_divergence('vardiu', sigma_data=0.5, encoder=_EncoderOf(G.a, G.B.diagonal()))
    div.set_progress(10 ** 9)
    z = div.draw_latents(_rnd(n, 7), (2,))
    loss, stats = div.generator_loss(teacher, None, G(z), None, _rnd(n, 1), z=z)
    (loss.sum() / n).backward()
    mc = torch.cat([G.a.grad.flatten(), G.B.grad.flatten()])
    sigma = stats['sigma'].to(F64)
    def weighted_kl(theta):
        a, _, C0, C1 = _covs(theta, sigma)
        return ((sigma / 0.43) ** 2 * _kl(a, C0, M, C1)).mean()
    _assert_gradient(mc, _fd(weighted_kl, _theta(G)))

#----------------------------------------------------------------------------
# Through refine.py.

def _load_cli():
    return load_script('refine.py', 'refine_cli')

RING = ['--teacher', 'gmm:ring8', '--gen', 'mlp', '--batch', '64']

def _cli(args):
    from click.testing import CliRunner # pylint: disable=import-outside-toplevel
    return CliRunner().invoke(_load_cli().main, args, catch_exceptions=False)

@pytest.mark.parametrize('name,opts', [('sid', ['--div-opt', 'alpha=1.0']), ('dmd', []),
    ('sim', ['--div-opt', 'form=exact']), ('fdiv', ['--div-opt', 'f=kl']), ('vardiu', [])])
def test_every_divergence_runs_on_ring8_and_its_snapshot_loads(tmp_path, name, opts):
    from torch_utils import safe_pickle # pylint: disable=import-outside-toplevel
    result = _cli([*RING, '--divergence', name, *opts, '--outdir', str(tmp_path), '--kimg', '0.256',
        '--tick', '0.128', '--snap', '1', '--seed', '1'])
    assert result.exit_code == 0, result.output
    run_dir, = glob.glob(os.path.join(tmp_path, '0*'))
    data = safe_pickle.load_network_pkl(sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1])
    assert data['divergence']['name'] == name
    x = data['G_ema'](torch.randn(16, *data['G_ema'].z_shape))
    assert x.shape == (16, 2) and bool(x.isfinite().all())
    if opts:
        key, value = opts[1].split('=')
        assert str(data['divergence'][key]) == value
    expected_steps = dict(sid=4, dmd=5, sim=4, fdiv=5, vardiu=0)[name] # vector default >= 4, DMD2/f-distill 5
    assert data['divergence']['fake_steps'] == expected_steps

def test_divergence_modules_resume_exactly(tmp_path):
    """fdiv's ratio head and vardiu's encoder are in the training state: resume = uninterrupted."""
    for name in ['fdiv', 'vardiu']:
        base = [*RING, '--divergence', name, '--tick', '0.128', '--seed', '2', '--lr', '1e-3']
        assert _cli([*base, '--outdir', str(tmp_path / f'{name}-a'), '--kimg', '0.256']).exit_code == 0
        assert _cli([*base, '--outdir', str(tmp_path / f'{name}-b'), '--kimg', '0.128']).exit_code == 0
        run_b, = glob.glob(str(tmp_path / f'{name}-b' / '0*'))
        result = _cli(['--resume', run_b, '--kimg', '0.256'])
        assert result.exit_code == 0 and 'Resuming' in result.output, result.output
        run_a, = glob.glob(str(tmp_path / f'{name}-a' / '0*'))
        sa = torch.load(sorted(glob.glob(os.path.join(run_a, 'training-state-*.pt')))[-1], weights_only=True)
        sb = torch.load(sorted(glob.glob(os.path.join(run_b, 'training-state-*.pt')))[-1], weights_only=True)
        assert len(sa['divergence_modules']) == 1
        for key in ['G', 'fake']:
            assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), (name, key)
        ma, mb = sa['divergence_modules'][0], sb['divergence_modules'][0]
        assert all(torch.equal(ma[k], mb[k]) for k in ma), name

def test_div_opt_errors_are_clean(tmp_path):
    result = _cli([*RING, '--divergence', 'sid', '--div-opt', 'alpah=1', '--outdir', str(tmp_path)])
    assert result.exit_code != 0 and "alpah: divergence 'sid' has no such option" in result.output and 'alpha' in result.output
    result = _cli([*RING, '--divergence', 'sid', '--div-opt', 'alpha', '--outdir', str(tmp_path)])
    assert result.exit_code != 0 and 'KEY=VALUE' in result.output
    result = _cli([*RING, '--divergence', 'vardiu', '--fake-steps', '2', '--outdir', str(tmp_path)])
    assert result.exit_code != 0 and 'fake score' in result.output
    assert 'Traceback' not in result.output and not os.listdir(tmp_path)

def test_div_opt_values_and_method_sigma_init():
    from refine.divergences import coerce_options # pylint: disable=import-outside-toplevel
    cli = _load_cli()
    raw = cli.parse_div_opts(['alpha=1', 'normalise=false', 'tmax=7e2'])
    assert raw == dict(alpha='1', normalise='false', tmax='7e2') # typed by the divergence's defaults:
    assert coerce_options('sid', raw) == dict(alpha=1.0, normalise=False, tmax=700.0)
    assert coerce_options('fdiv', dict(f='js')) == dict(f='js')
    assert coerce_options('di', dict(gen_sigma_kwargs='None')) == dict(gen_sigma_kwargs=None)
    assert coerce_options('sid', dict(alpha=1.5, normalise=True)) == dict(alpha=1.5, normalise=True) # JSON values
    from refine import run # pylint: disable=import-outside-toplevel
    for name, expected in [('di', 1.0), ('sid', 2.5), ('sim', 2.5), ('dmd', 80.0), ('fdiv', 80.0), ('vardiu', 1.0)]:
        o = run.resolve_options(dict(teacher='edm.pkl', gen='teacher', divergence=name))
        assert o.sigma_init == expected and o.fake_steps is None
        assert make_divergence(name).fake_steps == dict(dmd=5, fdiv=5, vardiu=0).get(name, 1)
    assert run.resolve_options(dict(teacher='edm.pkl', gen='teacher', divergence='sid', sigma_init=1.5)).sigma_init == 1.5
    assert set(DIVERGENCES) == {'di', 'sid', 'dmd', 'sim', 'fdiv', 'vardiu', 'sida', 'dmd2'} # the last two need --data

def test_bench_runs_every_divergence_with_time_to_floor(tmp_path):
    from click.testing import CliRunner # pylint: disable=import-outside-toplevel
    bench = load_script('bench/gmm.py', 'bench_gmm')
    result = CliRunner().invoke(bench.main, ['--presets', 'ring8', '--divergences',
        'di,sid,dmd,sim,fdiv,vardiu,sid:alpha=0.5', '--kimg', '0.512', '--eval-n', '200', '--curve-n', '200',
        '--curve-every', '0.256', '--reach', '2,1000', '--outdir', str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = result.output[result.output.index('| divergence |'):].strip().splitlines()
    assert 'to 2x floor | to 1000x floor |' in table[0] and len(table) == 2 + 7
    for row, name in zip(table[2:], ['di', 'sid', 'dmd', 'sim', 'fdiv', 'vardiu', 'sid:alpha=0.5']):
        cells = [c.strip() for c in row.strip('|').split('|')]
        assert cells[0] == name and cells[1] == 'ring8'
        assert cells[-1].endswith('kimg)') # 1000x the floor is reached at the first evaluation
    assert os.path.isfile(tmp_path / 'sid_alpha=0.5' / 'ring8-sid' / 'after.png')
