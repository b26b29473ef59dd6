"""Diff-Instruct (Luo et al., NeurIPS 2023): the Integral KL divergence.

IKL(p_g, p_d) = ∫ w(σ) KL(p_g,σ ‖ p_d,σ) dσ has the generator gradient
    E[ w(σ) (s_ψ(x_t, σ) − s_φ(x_t, σ))ᵀ ∂x_t/∂θ ],   x_t = G(z) + σ ε,
with s_ψ the score of the diffused generator distribution (the fake score, learned online) and
s_φ the teacher's. Since s = (D − x)/σ², the official code's loss (D_ψ − D_φ)ᵀ x_g is this
gradient with the score-space weight w(σ) = σ²; that is the default here (`weighting='sigma2'`).
No gradient goes through either network. σ ~ LogNormal(−1.2, 1.2) for both losses (scaled by
sigma_data / 0.5 for data not on EDM's image scale).
"""

import torch

from refine import noise
from refine.divergences.base import Divergence, noised_denoisers, surrogate

class DiffInstruct(Divergence):
    name = 'di'
    grad_through_networks = False

    def __init__(self, sigma_data=0.5, fake_steps=1, gen_sigma='lognormal', gen_sigma_kwargs=None,
            weighting='sigma2', **kwargs):
        super().__init__(sigma_data=sigma_data, fake_steps=fake_steps, **kwargs)
        self.gen_sigma = noise.make_sigma_distribution(gen_sigma, scale=self.sigma_data / 0.5,
            **(gen_sigma_kwargs or {}))
        if weighting not in ('sigma2', 'uniform'):
            raise ValueError(f"unknown DI weighting '{weighting}' (sigma2 or uniform)")
        self.weighting = weighting

    def denoiser_weight(self, sigma):
        """w(σ)/σ², the factor on D_ψ − D_φ (1 for the official σ² score weighting)."""
        return torch.ones_like(sigma) if self.weighting == 'sigma2' else sigma ** -2

    def generator_loss(self, teacher, fake, x_g, labels, rnd):
        sigma = self.gen_sigma.sample(rnd)
        x_t, d_teacher, d_fake = noised_denoisers(teacher, fake, x_g, sigma, labels, rnd)
        # w(σ)(s_ψ − s_φ) = w(σ)/σ² · (D_ψ − D_φ)
        direction = noise.expand_like(self.denoiser_weight(sigma), x_g) * (d_fake - d_teacher)
        stats = dict(sigma=sigma, grad_norm=direction.flatten(1).norm(dim=1))
        return surrogate(direction, x_g), stats

    def options(self):
        return dict(super().options(), weighting=self.weighting)
