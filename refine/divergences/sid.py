"""Score identity Distillation (SiD; Zhou et al., ICML 2024): a model-based Fisher divergence.

SiD minimises the Fisher divergence E_σ E_{p_g,σ} ‖s_g − s_d‖² between the diffused generator
and teacher distributions. Score identities turn it into a loss on the teacher denoiser D_φ and
the fake denoiser D_ψ (the learned denoiser of the generator's distribution); per sample,

    L = [(D_φ − D_ψ)ᵀ(D_φ − x_g) − α ‖D_φ − D_ψ‖²] / wf,    wf = sg(mean |x_g − D_φ|),

with both denoisers evaluated at x_t = x_g + σ ε. Equivalently (D_φ − D_ψ)ᵀ(D_ψ − x_g) +
(1 − α)‖D_φ − D_ψ‖². Gradients flow through *both* networks into x_t and hence into x_g:
x_t keeps its graph, and the networks' parameters are frozen for this step (so no parameter
gradient of the fake score is built). σ follows SiD's sampling, t ~ U[0, tmax/1000] on the
Karras grid (tmax = 800: σ ∈ [0.002, 24.4]), scaled by sigma_data/0.5; the fake score is trained
by EDM denoising score matching with σ ~ LogNormal(−1.2, 1.2). One fake update per generator
update. The official generator input is 2.5·z at σ = 2.5 (`default_sigma_init`).

Decisions:
  * α = 1.2 by default (SiD's released checkpoints). With the exact fake score, α = 0.5 is the
    exact gradient of E_σ[σ⁴/2 · Fisher divergence] (tests/test_divergences.py checks this by
    finite differences); α = 1 and 1.2 are 10% and 14% off there, still descent directions. On
    the 2-D mixtures (ring8, grid25; MLP fake score) α = 1.2 with the per-sample normaliser
    collapses every mode, while α ≤ 1, or α = 1.2 without the normaliser, works — as SiD issue #3
    reports for speech. The default stays the published 1.2; use alpha=0.5 or 1.0 on toy data.
  * SiD scales the loss by lsg = 100 and sums over pixels. Adam is invariant to a constant
    factor (up to its eps), so the default `loss_scale` is 1, like every other divergence here;
    pass loss_scale=100 to reproduce the official numbers exactly.
  * SiDA (the GAN variant, `sida`) needs real data: `refine.py --data` (refine/divergences/adversarial.py).
  * The official code drops samples with NaNs; here the loop's nan_to_num on gradients is the
    only guard.
"""

import contextlib

import torch

from refine import noise
from refine.divergences.base import Divergence

@contextlib.contextmanager
def frozen_parameters(*modules):
    """Build a graph through `modules` w.r.t. their inputs only: no parameter gradients.

    The flags are restored on exit; the graph recorded meanwhile keeps the parameters out, so a
    later backward() leaves their .grad untouched.
    """
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)

def sid_sigma(tmax, scale, fine_tmax=None, fine_fraction=0.0):
    """SiD's noise levels: t ~ U[0, tmax/1000] on the Karras grid, i.e. u = 1 − t ∈ [1 − tmax/1000, 1];
    with `fine_fraction` f, a share f of the draws from t ~ U[0, fine_tmax/1000] instead."""
    if not 0 < tmax <= 1000:
        raise ValueError(f'tmax must be in (0, 1000], got {tmax}')
    if fine_fraction and not (fine_tmax is not None and 0 < fine_tmax < tmax and 0 < fine_fraction < 1):
        raise ValueError(f'fine_fraction must be in (0, 1) with fine_tmax in (0, tmax), '
            f'got fine_fraction={fine_fraction}, fine_tmax={fine_tmax}')
    fine = dict(fine_u_min=1 - fine_tmax / 1000, fine_fraction=fine_fraction) if fine_fraction else {}
    return noise.KarrasUniformSigma(u_min=1 - tmax / 1000, u_max=1.0, scale=scale, **fine)

def mean_abs_normaliser(x_g, d_teacher, eps=1e-5):
    """Per-sample sg(mean |x_g − D_φ|), clipped below (DMD, SiD, f-distill), shaped [N, 1, ...]."""
    wf = (x_g - d_teacher).detach().abs().flatten(1).mean(1).clamp(min=eps)
    return noise.expand_like(wf, x_g)

class ScoreIdentity(Divergence):
    name = 'sid'
    grad_through_networks = True
    default_sigma_init = 2.5
    default_fake_steps = 1

    # With --data: SiDA's discriminator (channel mean of the bottleneck, no parameters), trained
    # with lsd·λ(σ)·½[BCE_real + BCE_fake] at σ ~ LogNormal(−1.2, 1.2) (lsd = 1), and the
    # generator's 0.5·L_SiD + 0.5·0.01·BCE/wf, i.e. L_SiD + 0.01·BCE/wf under Adam, at SiD's σ.
    adversarial_defaults = dict(weight=0.01, disc_weight=0.5, sigma='lognormal', gen_sigma='divergence',
        head='mean', normalise=True, disc_weighting='edm')

    def __init__(self, sigma_data=0.5, fake_steps=1, alpha=1.2, tmax=800, normalise=True,
            loss_scale=1.0, fine_fraction=0.0, fine_tmax=200, **kwargs):
        super().__init__(sigma_data=sigma_data, fake_steps=fake_steps, **kwargs)
        self.alpha = float(alpha)
        self.tmax = float(tmax)
        self.normalise = bool(normalise)
        self.loss_scale = float(loss_scale)
        self.fine_fraction, self.fine_tmax = float(fine_fraction), float(fine_tmax)
        self.gen_sigma = sid_sigma(self.tmax, self.sigma_data / 0.5, self.fine_tmax, self.fine_fraction)

    def generator_loss(self, teacher, fake, x_g, labels, rnd):
        sigma = self.gen_sigma.sample(rnd)
        x_t = x_g + noise.expand_like(sigma, x_g) * rnd.randn(*x_g.shape[1:])
        with frozen_parameters(teacher, fake), torch.enable_grad():
            d_teacher = teacher(x_t, sigma, labels)
            d_fake = fake(x_t, sigma, labels)
        gap = d_teacher - d_fake
        loss = gap * ((d_teacher - x_g) - self.alpha * gap)
        if self.normalise:
            loss = loss / mean_abs_normaliser(x_g, d_teacher)
        loss = self.loss_scale * loss.flatten(1).sum(1)
        stats = dict(sigma=sigma, gap_norm=gap.detach().flatten(1).norm(dim=1))
        return loss, stats

    def options(self):
        return dict(super().options(), alpha=self.alpha, tmax=self.tmax, normalise=self.normalise,
            loss_scale=self.loss_scale, fine_fraction=self.fine_fraction, fine_tmax=self.fine_tmax)

class SiDA(ScoreIdentity):
    """SiDA (Zhou et al., ICLR 2025): SiD plus a GAN on the fake score's encoder bottleneck,
    trained on real images. The SiD part is `sid`'s; the adversarial part, with SiDA's weights
    and noise levels (`adversarial_defaults` above), is refine/divergences/adversarial.py's.
    It needs `--data`; SiD²A (G initialised from a SiD run) is `--gen SID_SNAPSHOT.pkl`."""
    name = 'sida'
    needs_data = True
