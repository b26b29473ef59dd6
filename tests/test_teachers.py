"""Teachers: the exact Gaussian-mixture denoiser against an independent autograd computation,
EDM network wrapping, loading, and the MLP networks' pickles."""

import ast
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from refine import teachers as T
from torch_utils import persistence, safe_pickle
from training import networks_edm, networks_mlp

F64 = torch.float64

#----------------------------------------------------------------------------
# Independent reference: log p_sigma with torch.distributions, D = x + sigma^2 grad log p_sigma.

def _reference_mixture(means, covs, weights, sigma):
    d = means.shape[1]
    comps = torch.distributions.MultivariateNormal(means, covariance_matrix=covs + sigma ** 2 * torch.eye(d, dtype=F64))
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(probs=weights), comps)

def _reference_score(means, covs, weights, x, sigma):
    x = x.detach().to(F64).requires_grad_(True)
    logp = _reference_mixture(means, covs, weights, sigma).log_prob(x).sum()
    return torch.autograd.grad(logp, x)[0]

def _random_gmm(K, d, seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, d, generator=g, dtype=F64) * 2
    A = torch.randn(K, d, d, generator=g, dtype=F64)
    covs = A @ A.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=F64) # full, well-conditioned
    weights = torch.rand(K, generator=g, dtype=F64) + 0.2
    return means, covs, weights / weights.sum()

def _probe_points(teacher, sigma, n=64, seed=0):
    """Samples of p_sigma plus a few far-away points."""
    g = torch.Generator().manual_seed(seed)
    x = teacher.sample(n, generator=g).to(F64)
    x = x + sigma * torch.randn(x.shape, generator=g, dtype=F64)
    far = 3 * teacher.sigma_data * torch.randn(8, teacher.dim, generator=g, dtype=F64)
    return torch.cat([x, far])

@pytest.mark.parametrize('K,d', [(3, 2), (4, 5)])
@pytest.mark.parametrize('sigma', [1e-3, 0.3, 2.0, 50.0])
def test_gmm_denoiser_matches_autograd_reference_full_cov(K, d, sigma):
    means, covs, weights = _random_gmm(K, d, seed=K * 10 + d)
    teacher = T.GMMTeacher(means, covs, weights)
    x = _probe_points(teacher, sigma)
    ref_score = _reference_score(means, covs, weights, x, sigma)
    D = teacher(x, sigma)
    torch.testing.assert_close(D, x + sigma ** 2 * ref_score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(teacher.score(x, sigma), ref_score, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(T.Teacher.score(teacher, x, sigma), ref_score, rtol=1e-6, atol=1e-6)

@pytest.mark.parametrize('name', ['ring8', 'grid25', 'mog40', 'gauss64'])
def test_gmm_presets_match_autograd_reference(name):
    teacher = T.make_gmm(name)
    sd = teacher.sigma_data
    for sigma in [teacher.sigma_min, 0.05 * sd, sd, 10 * sd, teacher.sigma_max, 1e4 * sd]:
        x = _probe_points(teacher, sigma, n=32)
        ref = x + sigma ** 2 * _reference_score(teacher.means, teacher.covs, teacher.weights, x, sigma)
        # Absolute error scales with |x| (float64 cancellation in x - shift at huge sigma).
        atol = 1e-9 * (1 + float(x.abs().max()))
        torch.testing.assert_close(teacher(x, sigma), ref, rtol=1e-7, atol=atol, msg=f'{name} sigma={sigma}')

def test_gmm_denoiser_limits():
    teacher = T.make_gmm('ring8')
    x = _probe_points(teacher, 0.0)
    torch.testing.assert_close(teacher(x, 0.0), x) # no noise: nothing to remove
    mean, _ = teacher.moments()
    huge = teacher(x, 1e8)
    torch.testing.assert_close(huge, mean.expand_as(huge), atol=1e-6, rtol=0) # pure noise: the data mean

def test_gmm_sigma_shapes_dtype_and_gradient():
    teacher = T.make_gmm('grid25')
    x = _probe_points(teacher, 0.5, n=16).to(torch.float32)
    sigmas = torch.linspace(0.01, 3, x.shape[0])
    rows = torch.cat([teacher(x[i:i + 1], float(s)) for i, s in enumerate(sigmas)])
    for s in [sigmas, sigmas[:, None], sigmas.double()]:
        out = teacher(x, s)
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out, rows)
    torch.testing.assert_close(teacher(x, 0.7), teacher(x, torch.tensor([0.7])))
    with pytest.raises(ValueError):
        teacher(x, torch.ones(3))

    # Jacobian of D is I + sigma^2 Hessian(log p_sigma): check against the reference's Hessian.
    sigma = 0.4
    x0 = x[3].double()
    mix = _reference_mixture(teacher.means, teacher.covs, teacher.weights, sigma)
    hess = torch.autograd.functional.hessian(lambda v: mix.log_prob(v), x0)
    jac = torch.autograd.functional.jacobian(lambda v: teacher(v[None], sigma)[0], x0)
    torch.testing.assert_close(jac, torch.eye(2, dtype=F64) + sigma ** 2 * hess)
    xg = x.clone().requires_grad_(True)
    teacher(xg, sigma).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()

def test_gmm_log_prob_matches_scipy():
    means, covs, weights = _random_gmm(4, 3, seed=7)
    teacher = T.GMMTeacher(means, covs, weights)
    x = _probe_points(teacher, 0.0, n=20)
    for sigma in [0.0, 0.7]:
        logs = np.stack([scipy.stats.multivariate_normal(m.numpy(), c.numpy() + sigma ** 2 * np.eye(3)).logpdf(x.numpy())
            for m, c in zip(means, covs)], axis=1)
        expected = scipy.special.logsumexp(logs + np.log(weights.numpy()), axis=1)
        np.testing.assert_allclose(teacher.log_prob(x, sigma).numpy(), expected, rtol=1e-10, atol=1e-10)
    assert teacher.log_prob(x.float()).dtype == torch.float32

@pytest.mark.parametrize('name,n', [('ring8', 100000), ('mog40', 100000), ('gauss64', 40000)])
def test_gmm_samples_match_moments(name, n):
    teacher = T.make_gmm(name)
    x, comp = teacher.sample(n, generator=torch.Generator().manual_seed(1), return_components=True)
    assert x.dtype == torch.float32 and x.shape == (n, teacher.dim)
    # Mixture moments computed here, not by the teacher.
    pi, mu, S = teacher.weights, teacher.means, teacher.covs
    mean = (pi[:, None] * mu).sum(0)
    cov = sum(pi[k] * (S[k] + torch.outer(mu[k] - mean, mu[k] - mean)) for k in range(len(pi)))
    x = x.double()
    scale = float(cov.diagonal().max().sqrt())
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=6 * scale / math.sqrt(n))
    # Each covariance entry within 6 of its sampling standard errors (Gaussian approximation).
    stderr = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov.square()) / n).sqrt()
    z = float(((torch.cov(x.T) - cov).abs() / stderr).max())
    assert z < 6, z
    freq = torch.bincount(comp, minlength=len(pi)).double() / n
    assert float((freq - pi).abs().max()) < 6 * math.sqrt(float(pi.max()) / n)
    # Same generator seed, same samples.
    assert torch.equal(teacher.sample(50, generator=torch.Generator().manual_seed(3)),
                       teacher.sample(50, generator=torch.Generator().manual_seed(3)))

def test_gmm_presets_metadata():
    ring, grid, mog, g64 = (T.make_gmm(n) for n in ['ring8', 'grid25', 'mog40', 'gauss64'])
    assert ring.means.shape == (8, 2) and torch.allclose(ring.means.norm(dim=1), torch.full([8], 2.0, dtype=F64))
    assert grid.means.shape == (25, 2) and set(grid.means[:, 0].tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    # MoG40 as FAB's GMM(dim=2, n_mixes=40, loc_scaling=40, log_var_scaling=1) after manual_seed(0).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fab_means = (torch.rand((40, 2)) - 0.5) * 2 * 40
    assert torch.equal(mog.means, fab_means.double())
    fab_std = float(torch.nn.functional.softplus(torch.tensor(1.0, dtype=F64)))
    torch.testing.assert_close(mog.covs, torch.diag_embed(torch.full([40, 2], fab_std ** 2, dtype=F64)))
    assert g64.means.shape == (8, 64) and g64.covs.shape == (8, 64, 64)
    eig = torch.linalg.eigvalsh(g64.covs)
    assert float((eig.max(1).values / eig.min(1).values).max()) <= 10 + 1e-9
    assert not torch.allclose(g64.covs, torch.diag_embed(torch.diagonal(g64.covs, dim1=1, dim2=2))) # full
    assert torch.equal(g64.covs, T.make_gmm('gauss64').covs) # fixed seed
    for t in [ring, grid, mog, g64]:
        _, cov = t.moments()
        assert t.sigma_data == pytest.approx(math.sqrt(float(cov.diagonal().mean())))
        assert t.sigma_min == pytest.approx(0.002 * t.sigma_data / 0.5)
        assert t.sigma_max == pytest.approx(80 * t.sigma_data / 0.5)
        assert t.shape == (t.dim,) and t.label_dim == 0
        assert isinstance(t.sigma_data, float)
    assert float(T.make_gmm('ring8', radius=3.0).means.norm(dim=1).max()) == pytest.approx(3.0) # overrides

def test_gmm_constructor_forms_and_errors():
    means = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    a = T.GMMTeacher(means, std=0.5)
    b = T.GMMTeacher(means, std=torch.tensor([0.5, 0.5]))
    c = T.GMMTeacher(means, std=torch.full([2, 2], 0.5))
    d = T.GMMTeacher(means, covs=0.25 * torch.eye(2).expand(2, 2, 2))
    x = torch.randn(5, 2)
    for t in [b, c, d]:
        torch.testing.assert_close(t(x, 0.3), a(x, 0.3))
    with pytest.raises(ValueError):
        T.GMMTeacher(means)
    with pytest.raises(ValueError):
        T.GMMTeacher(means, covs=-torch.eye(2).expand(2, 2, 2))
    with pytest.raises(ValueError):
        T.GMMTeacher(means, std=1.0, weights=[1.0, -1.0])

#----------------------------------------------------------------------------
# EDM network teachers.

def _tiny_edm(label_dim=0, **kwargs):
    torch.manual_seed(0)
    net = networks_edm.EDMPrecond(img_resolution=8, img_channels=2, label_dim=label_dim, model_type='SongUNet',
        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], **kwargs)
    with torch.no_grad(): # move off the near-zero output init so the network matters
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net

def _tiny_mlp(label_dim=0):
    torch.manual_seed(1)
    return networks_mlp.MLPDenoiser(dim=3, label_dim=label_dim, hidden=32, num_layers=2, sigma_data=2.0, emb_dim=16)

def test_edm_teacher_wraps_edm_precond():
    net = _tiny_edm(label_dim=3)
    teacher = T.EDMTeacher(net)
    assert teacher.shape == (2, 8, 8) and teacher.label_dim == 3
    assert (teacher.sigma_min, teacher.sigma_max, teacher.sigma_data) == (0.002, 80.0, 0.5)
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 2, 8, 8)
    labels = torch.eye(3)[[0, 1, 2, 0]]
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0])
    torch.testing.assert_close(teacher(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
    torch.testing.assert_close(teacher(x, sigma[:, None], labels), net(x, sigma, labels), rtol=0, atol=0)
    torch.testing.assert_close(teacher(x, 0.5, labels), net(x, torch.tensor(0.5), labels), rtol=0, atol=0)
    torch.testing.assert_close(teacher.score(x, sigma, labels),
        (net(x, sigma, labels) - x) / sigma[:, None, None, None] ** 2)

    # Gradients reach x through the network (not only through the skip path).
    xg = x.clone().requires_grad_(True)
    teacher(xg, sigma, labels).square().sum().backward()
    x2 = x.clone().requires_grad_(True)
    net(x2, sigma, labels).square().sum().backward()
    torch.testing.assert_close(xg.grad, x2.grad)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    skip_only = 2 * c_skip[:, None, None, None] ** 2 * x
    assert not torch.allclose(xg.grad, skip_only, atol=1e-3)

def test_edm_teacher_sigma_range_from_net():
    vp = networks_edm.VPPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1],
        num_blocks=1, attn_resolutions=[])
    teacher = T.EDMTeacher(vp)
    assert teacher.sigma_min == vp.sigma_min and teacher.sigma_max == vp.sigma_max
    assert teacher.sigma_data == 0.5 and teacher.shape == (1, 8, 8)
    edm = _tiny_edm(sigma_min=0.01, sigma_max=20.0)
    assert (T.EDMTeacher(edm).sigma_min, T.EDMTeacher(edm).sigma_max) == (0.01, 20.0)

def test_edm_teacher_wraps_mlp_denoiser():
    net = _tiny_mlp(label_dim=2)
    teacher = T.EDMTeacher(net)
    assert teacher.shape == (3,) and teacher.label_dim == 2 and teacher.sigma_data == 2.0
    assert teacher.sigma_min == pytest.approx(0.008) and teacher.sigma_max == pytest.approx(320.0)
    x = torch.randn(5, 3)
    labels = torch.eye(2)[[0, 1, 1, 0, 1]]
    sigma = torch.rand(5) + 0.1
    assert torch.equal(teacher(x, sigma, labels), net(x, sigma, labels))
    xg = x.clone().requires_grad_(True)
    teacher(xg, sigma, labels).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0

def test_mlp_denoiser_preconditioning():
    net = _tiny_mlp()
    x = torch.randn(6, 3, dtype=F64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 2.0, 10.0, 100.0], dtype=F64)
    seen = {}
    def probe(inp):
        seen['inp'] = inp
        return torch.ones(inp.shape[0], 3, dtype=inp.dtype)
    net.model.forward = probe
    out = net(x, sigma)
    sd, s = 2.0, sigma[:, None]
    torch.testing.assert_close(out, sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(seen['inp'][:, :3], x / (s ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(seen['inp'][:, 3:], net.noise_emb(sigma.log() / 4))

def test_mlp_generator_scale_and_labels():
    torch.manual_seed(0)
    G = networks_mlp.MLPGenerator(z_dim=4, dim=3, label_dim=2, hidden=64, num_layers=3)
    z = torch.randn(4000, 4)
    c = torch.eye(2)[torch.randint(2, [4000])]
    y = G(z, c).detach()
    assert y.shape == (4000, 3)
    assert 0.7 < float(y.std()) < 1.4 and float(y.mean(0).abs().max()) < 0.3
    assert not torch.allclose(G(z[:5], torch.eye(2)[[0] * 5]), G(z[:5], torch.eye(2)[[1] * 5]))
    torch.manual_seed(0)
    G5 = networks_mlp.MLPGenerator(z_dim=4, dim=3, label_dim=2, hidden=64, num_layers=3, out_scale=5.0)
    torch.testing.assert_close(G5(z, c), 5 * y)

def _roundtrip(tmp_path, data, name='net.pkl'):
    path = tmp_path / name
    persistence.save_network_pkl(data, str(path))
    return str(path), safe_pickle.load_network_pkl(str(path))

def test_mlp_networks_pickle_roundtrip_safe(tmp_path):
    den = _tiny_mlp(label_dim=2)
    torch.manual_seed(2)
    gen = networks_mlp.MLPGenerator(z_dim=2, dim=3, label_dim=2, hidden=16, num_layers=2, out_scale=3.0)
    _, loaded = _roundtrip(tmp_path, dict(ema=den, G=gen))
    assert type(loaded['ema']) is networks_mlp.MLPDenoiser and type(loaded['G']) is networks_mlp.MLPGenerator
    x, z = torch.randn(7, 3), torch.randn(7, 2)
    c = torch.eye(2)[[0, 1, 0, 1, 1, 0, 0]]
    sigma = torch.rand(7) * 5
    assert torch.equal(loaded['ema'](x, sigma, c), den(x, sigma, c))
    assert torch.equal(loaded['G'](z, c), gen(z, c))
    assert loaded['G'].out_scale == 3.0 and loaded['ema'].sigma_data == 2.0
    # The NVlabs way (embedded source, known here) gives the same network too.
    with open(tmp_path / 'net.pkl', 'rb') as f:
        nv = persistence.load(f)
    assert torch.equal(nv['ema'](x, sigma, c), den(x, sigma, c))

def test_networks_mlp_is_self_contained():
    # Embedded in pickles: may import only numpy, torch and torch_utils.persistence.
    tree = ast.parse(open(networks_mlp.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f'{node.module}.{a.name}' for a in node.names}
    assert imported <= {'math', 'numpy', 'torch', 'torch.nn.functional.silu', 'torch_utils.persistence'}, imported

#----------------------------------------------------------------------------
# load_teacher.

def test_load_teacher_gmm_and_errors(tmp_path):
    teacher = T.load_teacher('gmm:ring8')
    assert isinstance(teacher, T.GMMTeacher) and teacher.num_components == 8
    with pytest.raises(ValueError, match=r"gmm:nope.*gmm:ring8.*gmm:mog40"):
        T.load_teacher('gmm:nope')
    missing = str(tmp_path / 'missing.pkl')
    with pytest.raises(ValueError, match='missing.pkl'):
        T.load_teacher(missing)
    path, _ = _roundtrip(tmp_path, dict(something=torch.zeros(3)), 'empty.pkl')
    with pytest.raises(ValueError, match='no denoiser'):
        T.load_teacher(path)
    path, _ = _roundtrip(tmp_path, dict(ema=networks_mlp.MLPGenerator(z_dim=2, dim=2, hidden=8, num_layers=1)), 'gen.pkl')
    with pytest.raises(ValueError, match=r"gen\.pkl.*not a denoiser"):
        T.load_teacher(path)
    (tmp_path / 'junk.pkl').write_bytes(b'not a pickle')
    with pytest.raises(ValueError, match='junk.pkl'):
        T.load_teacher(str(tmp_path / 'junk.pkl'))

@pytest.mark.parametrize('key', ['ema', 'net'])
def test_load_teacher_from_pickle(tmp_path, key):
    net = _tiny_edm().eval() # no dropout: the teacher runs in eval mode
    path, _ = _roundtrip(tmp_path, {key: net, 'dataset_kwargs': dict(resolution=8)})
    teacher = T.load_teacher(path)
    assert isinstance(teacher, T.EDMTeacher) and teacher.shape == (2, 8, 8)
    assert type(teacher.net) is networks_edm.EDMPrecond
    x, sigma = torch.randn(3, 2, 8, 8), torch.tensor([0.2, 1.0, 5.0])
    assert torch.equal(teacher(x, sigma), net(x, sigma))

def test_load_teacher_mlp_pickle(tmp_path):
    net = _tiny_mlp()
    path, _ = _roundtrip(tmp_path, dict(ema=net))
    teacher = T.load_teacher(path)
    x, sigma = torch.randn(4, 3), torch.tensor([0.2, 1.0, 5.0, 30.0])
    assert teacher.shape == (3,) and torch.equal(teacher(x, sigma), net(x, sigma))

#----------------------------------------------------------------------------
