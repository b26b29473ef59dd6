"""Distribution Matching Distillation (DMD, Yin et al. CVPR 2024; DMD2, NeurIPS 2024).

DMD follows the reverse-KL gradient E[(s_ψ − s_φ)ᵀ ∂x_t/∂θ] with DMD's per-sample weighting
(its Eq. 8), which in EDM form gives the generator-output gradient

    ∂L/∂x_g = (D_ψ − D_φ) / mean |x_g − D_φ|,     D's at x_t = x_g + σ ε, no gradient through them.

Defaults are DMD2's: σ for the generator loss drawn with σ^(1/7) uniform over the Karras grid
between bins 20 and 980 of 1000 (u ∈ [0.02, 0.98]); the fake score trained by DSM over the whole
grid (u ∈ [0, 1]) with EDM's weight 1/σ² + 1/σ_d²; 5 fake updates per generator update; the
generator input 80·z at σ = 80 (`default_sigma_init`). All σ scale with sigma_data/0.5.

Decisions:
  * The grid index is drawn continuously (σ^(1/7) uniform over the same range) rather than on
    1000 discrete bins: the same distribution up to discreteness.
  * DMD2 builds 0.5·MSE(x_g, sg(x_g − g)) with *mean* reduction, i.e. g/numel; we keep the sum
    (gradient exactly g, as for Diff-Instruct). Adam cancels the constant factor.
  * DMD2's GAN classifier on the fake score's bottleneck needs real images: `dmd2`, or any
    divergence with `refine.py --data` (refine/divergences/adversarial.py; DMD2's weights are
    the generic defaults there). Not implemented: DMD's LPIPS regression loss (pairs of noise
    and teacher ODE outputs; data-free in principle but needs an offline teacher-sampling pass
    and LPIPS).
  * The denominator is clipped at 1e-5 (SiD's clip; FastGen adds 1e-6).
"""

import torch

from refine import noise
from refine.divergences.base import Divergence, noised_denoisers, surrogate
from refine.divergences.sid import mean_abs_normaliser

class DistributionMatching(Divergence):
    name = 'dmd'
    grad_through_networks = False
    default_sigma_init = 80.0
    default_fake_steps = 5

    def __init__(self, sigma_data=0.5, fake_steps=5, u_min=0.02, u_max=0.98, normalise=True,
            fake_sigma='karras', **kwargs):
        super().__init__(sigma_data=sigma_data, fake_steps=fake_steps, fake_sigma=fake_sigma, **kwargs)
        self.u_min, self.u_max = float(u_min), float(u_max)
        self.normalise = bool(normalise)
        self.gen_sigma = noise.KarrasUniformSigma(u_min=self.u_min, u_max=self.u_max, scale=self.sigma_data / 0.5)

    def direction(self, teacher, fake, x_g, labels, rnd):
        """σ, the (undetached) teacher and fake denoisers at x_t, and the DMD direction g."""
        sigma = self.gen_sigma.sample(rnd)
        x_t, d_teacher, d_fake = noised_denoisers(teacher, fake, x_g, sigma, labels, rnd)
        direction = d_fake - d_teacher
        if self.normalise:
            with torch.no_grad():
                direction = direction / mean_abs_normaliser(x_g, d_teacher)
        return sigma, x_t, d_teacher, d_fake, direction

    def generator_loss(self, teacher, fake, x_g, labels, rnd):
        sigma, _, _, _, direction = self.direction(teacher, fake, x_g, labels, rnd)
        stats = dict(sigma=sigma, grad_norm=direction.flatten(1).norm(dim=1))
        return surrogate(direction, x_g), stats

    def options(self):
        return dict(super().options(), u_min=self.u_min, u_max=self.u_max, normalise=self.normalise)

class DMD2(DistributionMatching):
    """DMD2 (Yin et al., NeurIPS 2024): DMD's gradient (as `dmd`: no regression loss, 5 fake
    updates per generator update, the two-time-scale rule) plus a GAN classifier on the fake
    score's bottleneck trained on real images, with weights 3e-3 (generator) and 1e-2
    (classifier) and the diffusion GAN's noise over the whole Karras grid (the generic
    defaults of refine/divergences/adversarial.py). It needs `--data`."""
    name = 'dmd2'
    needs_data = True
