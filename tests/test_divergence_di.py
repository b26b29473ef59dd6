"""Diff-Instruct: its generator gradient against the formula, and against the exact Integral KL."""

import pytest
import torch

from refine import noise
from refine.divergences import make_divergence
from torch_utils.rng import StreamRandom
from refine.teachers import GMMTeacher


def _rnd(n, seed=0):
    return StreamRandom(seed, 0, "gen", n)

def test_generator_gradient_is_weighted_denoiser_difference():
    """d loss / d x_g = w(σ)/σ² (D_ψ − D_φ)(x_t), evaluated at the same σ and ε."""
    teacher = GMMTeacher(means=torch.tensor([[2.0, 0.0], [-1.0, 1.5]]), std=torch.tensor([0.5, 0.8]))
    fake = GMMTeacher(means=torch.tensor([[0.0, 0.5]]), covs=torch.tensor([[[1.5, 0.3], [0.3, 0.7]]]))
    x_g = torch.randn(64, 2).requires_grad_(True)
    for weighting in ['sigma2', 'uniform']:
        div = make_divergence('di', sigma_data=1.0, weighting=weighting)
        loss, stats = div.generator_loss(teacher, fake, x_g, None, _rnd(64))
        grad, = torch.autograd.grad(loss.sum(), x_g)

        rnd = _rnd(64) # the same draws, recomputed independently
        sigma = (rnd.randn() * 1.2 - 1.2).exp() * 2.0 # LogNormal(-1.2, 1.2) scaled by σ_d/0.5
        x_t = x_g.detach() + sigma[:, None] * rnd.randn(2)
        diff = fake(x_t, sigma) - teacher(x_t, sigma)
        w_over_s2 = torch.ones_like(sigma) if weighting == 'sigma2' else sigma ** -2
        torch.testing.assert_close(stats['sigma'], sigma)
        torch.testing.assert_close(grad, w_over_s2[:, None] * diff, rtol=1e-5, atol=1e-6)

class AffineGenerator(torch.nn.Module):
    """x = a + B z: its distribution N(a, B Bᵀ) and every diffused version are known exactly."""
    z_shape, out_shape, label_dim, is_vector = (2,), (2,), 0, True

    def __init__(self, a, B):
        super().__init__()
        self.a = torch.nn.Parameter(torch.as_tensor(a, dtype=torch.float64))
        self.B = torch.nn.Parameter(torch.as_tensor(B, dtype=torch.float64))

    def forward(self, z, c=None):
        return self.a + z.to(torch.float64) @ self.B.T

    def exact_fake_score(self):
        return GMMTeacher(means=self.a.detach()[None], covs=(self.B @ self.B.T).detach()[None])

def test_update_descends_the_exact_integral_kl():
    """With the exact fake score, E[DI gradient] = ∇θ E_σ[σ² KL(p_g,σ ‖ p_d,σ)] (finite differences)."""
    torch.manual_seed(0)
    m, S = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([[0.6, 0.2], [0.2, 0.4]], dtype=torch.float64)
    teacher = GMMTeacher(means=m[None], covs=S[None])
    G = AffineGenerator([-0.5, 0.8], [[1.2, 0.3], [-0.2, 0.9]])
    n = 200_000
    div = make_divergence('di', sigma_data=0.5)
    loss, _ = div.generator_loss(teacher, G.exact_fake_score(), G(_rnd(n, 7).randn(2)), None, _rnd(n, 1))
    # The generator loss draws σ first from its stream: recover those σ for the exact objective.
    sigma = div.gen_sigma.sample(_rnd(n, 1)).to(torch.float64)
    (loss.sum() / n).backward()
    di_grad = torch.cat([G.a.grad.flatten(), G.B.grad.flatten()])

    def integral_kl(theta):
        a, B = theta[:2], theta[2:].reshape(2, 2)
        eye = torch.eye(2, dtype=torch.float64)
        s2 = sigma.reshape(-1, 1, 1) ** 2
        C0, C1 = B @ B.T + s2 * eye, S + s2 * eye
        C1_inv = torch.linalg.inv(C1)
        dm = (m - a).expand(len(sigma), 2)
        kl = 0.5 * (torch.einsum('nii->n', C1_inv @ C0) + torch.einsum('ni,nij,nj->n', dm, C1_inv, dm)
            - 2 + torch.logdet(C1) - torch.logdet(C0))
        return (sigma ** 2 * kl).mean()

    theta = torch.cat([G.a.detach().flatten(), G.B.detach().flatten()])
    eps = 1e-5
    fd = torch.stack([(integral_kl(theta + eps * e) - integral_kl(theta - eps * e)) / (2 * eps)
        for e in torch.eye(6, dtype=torch.float64)])
    assert torch.allclose(di_grad, fd, rtol=0.05, atol=0.02 * fd.abs().max()), (di_grad, fd)
    # And a small step against the DI gradient lowers the exact objective.
    assert integral_kl(theta - 0.05 * di_grad) < integral_kl(theta)

def test_fake_loss_is_edm_denoising_score_matching():
    fake = GMMTeacher(means=torch.zeros(1, 2), std=1.0)
    div = make_divergence('di', sigma_data=0.5)
    x = torch.randn(32, 2)
    loss = div.fake_loss(fake, x, None, _rnd(32, 3))
    rnd = _rnd(32, 3)
    sigma = (rnd.randn() * 1.2 - 1.2).exp()
    x_t = x + sigma[:, None] * rnd.randn(2)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss, weight * (fake(x_t, sigma) - x).square().sum(1))
    assert torch.equal(noise.edm_weight(sigma, 0.5), weight)
