"""f-distill (Xu, Nie, Vahdat, 2025): diffusion f-divergences D_f(p_d,σ ‖ p_g,σ) = E_{p_g,σ}[f(r)].

With r = p_d,σ / p_g,σ the density ratio, the generator gradient of D_f at one noise level is
E[h(r) (s_ψ − s_φ)ᵀ ∂x_t/∂θ] with h(r) = f''(r) r²; in EDM form, with DMD's per-sample normaliser,

    ∂L/∂x_g = h(r) (D_ψ − D_φ) / mean |x_g − D_φ|,     no gradient through the networks.

h for the implemented f (any positive constant factor is irrelevant after normalisation):
  rkl (reverse KL)  1            kl (forward KL)     r           js (Jensen-Shannon)  r/(1+r)
  jeffrey           1 + r        chi2 (Pearson χ²)   r²          neyman (Neyman χ²)   1/r
  hellinger         √r           sf                  1/(1+r)
Reverse KL (h ≡ 1) is DMD2's loss. As in f-distill (FastGen's implementation): r = exp(logit)
with the logit clamped to [−10, 10], r clipped to [0.1, 20], r divided by its batch mean within
each of 10 σ bins, and h divided by its batch mean. σ for both losses: DMD2's "polynomial"
Karras sampling with FastGen's range u ∈ [0.002, 0.998]; 5 fake updates per generator update;
generator input at σ = 80 (`default_sigma_init`, FastGen builds on DMD2).

Where r comes from (`ratio`):
  * 'disc' (the published method; the default when `refine.py --data` is given): r = D/(1 − D)
    = exp(ℓ) from the GAN discriminator on the fake score's bottleneck, trained on real vs
    generated samples (refine/divergences/adversarial.py), at the same x_t as the loss; its GAN
    term is added to the generator loss with weight 1e-3 (FastGen's base setting), and the
    discriminator and that term draw σ from the same u ∈ [0.002, 0.998] Karras range. Needs
    --data.
  * 'score' (default, data-free): a log-ratio head ℓ_η(x_t, σ) trained so that its input
    gradient matches the score difference the teacher and fake denoisers already give,
    ∇_x log r = s_φ − s_ψ = (D_φ − D_ψ)/σ²:
        loss_η = σ² ‖∇_x ℓ_η(x_t) − (D_φ − D_ψ)(x_t)/σ²‖²,   x_t from detached generator samples,
    score-space matching with DSM's σ² weighting (EDM's D-space weight 1/σ² + 1/σ_d² would
    ignore small σ, where D_φ − D_ψ shrinks like σ²). This fixes log r up to an additive constant per σ, and that
    constant is exactly what the per-σ-bin batch normalisation of r removes. The head is owned by
    this divergence and trained in the fake update (the loop's extra optimizer, at the fake
    score's learning rate unless `head_lr` is given). Its quality is bounded by the fake score's.
  * 'one': r ≡ 1 — every f reduces to reverse KL (DMD2's gradient, without its GAN).
  * a callable (x_t, sigma, labels) -> log r (Python API; the tests pass the exact ratio).
Batch normalisations are over the samples a process has in one accumulation round (a per-part
statistic like batch norm); with one process and no rounds, the whole batch.
"""

import math

import torch

from refine import noise
from refine.divergences.base import Divergence, noised_denoisers, surrogate
from refine.divergences.sid import mean_abs_normaliser
from refine.divergences.vardiu import NoiseConditionedMLP

def _h(f, r):
    table = dict(rkl=lambda r: torch.ones_like(r), kl=lambda r: r, js=lambda r: r / (1 + r),
        jeffrey=lambda r: 1 + r, chi2=lambda r: r.square(), neyman=lambda r: 1 / r,
        hellinger=lambda r: r.sqrt(), sf=lambda r: 1 / (1 + r))
    return table[f](r)

F_NAMES = ('rkl', 'kl', 'js', 'jeffrey', 'chi2', 'neyman', 'hellinger', 'sf')

class FDivergence(Divergence):
    name = 'fdiv'
    grad_through_networks = False
    default_sigma_init = 80.0
    default_fake_steps = 5
    module_phase = 'fake'

    def __init__(self, sigma_data=0.5, fake_steps=5, f='js', ratio='score', u_min=0.002, u_max=0.998,
            logit_clip=10.0, ratio_min=0.1, ratio_max=20.0, ratio_bins=10, normalise=True,
            normalise_ratio=True, normalise_h=True, head_hidden=256, head_layers=4, head_lr=None,
            fake_sigma='karras', fake_sigma_kwargs=None, **kwargs):
        self.u_min, self.u_max = float(u_min), float(u_max)
        fake_sigma_kwargs = dict(u_min=self.u_min, u_max=self.u_max) if fake_sigma_kwargs is None else fake_sigma_kwargs
        super().__init__(sigma_data=sigma_data, fake_steps=fake_steps, fake_sigma=fake_sigma,
            fake_sigma_kwargs=fake_sigma_kwargs, **kwargs)
        if f not in F_NAMES:
            raise ValueError(f"unknown f-divergence '{f}' (choose from {', '.join(F_NAMES)})")
        if not (callable(ratio) or ratio in ('score', 'one', 'disc')):
            raise ValueError(f"ratio must be 'score', 'one', 'disc' or a callable, got {ratio!r}")
        self.f, self.ratio = f, ratio
        self.logit_clip, self.ratio_min, self.ratio_max = float(logit_clip), float(ratio_min), float(ratio_max)
        self.ratio_bins = int(ratio_bins)
        self.normalise, self.normalise_ratio, self.normalise_h = bool(normalise), bool(normalise_ratio), bool(normalise_h)
        self.head_hidden, self.head_layers = int(head_hidden), int(head_layers)
        self.module_lr = None if head_lr is None else float(head_lr)
        self.gen_sigma = noise.KarrasUniformSigma(u_min=self.u_min, u_max=self.u_max, scale=self.sigma_data / 0.5)
        self.head = None
        self.teacher = None
        self.disc_log_ratio = None # set by the real-data terms (ratio='disc')

    # With --data: FastGen's f-distill settings on top of DMD2's (GAN weight 1e-3, σ over
    # u ∈ [0.002, 0.998] like the divergence's own).
    adversarial_defaults = dict(weight=1e-3, u_min=0.002, u_max=0.998)

    @property
    def needs_data(self):
        return self.ratio == 'disc'

    # Loop hooks ---------------------------------------------------------------------------

    def setup(self, G, teacher, fake=None):
        self.teacher = teacher
        if self.ratio == 'score' and self.head is None:
            self.head = NoiseConditionedMLP(math.prod(G.out_shape), 1, self.sigma_data,
                label_dim=getattr(G, 'label_dim', 0), hidden=self.head_hidden, num_layers=self.head_layers)

    def trainable_modules(self):
        return [self.head] if self.head is not None else []

    # The density ratio --------------------------------------------------------------------

    def log_ratio(self, x_t, sigma, labels):
        """Estimated log r(x_t) = log p_d,σ − log p_g,σ (up to a constant per σ), [N]."""
        if callable(self.ratio):
            return self.ratio(x_t, sigma, labels).reshape(-1)
        if self.ratio == 'one':
            return torch.zeros(x_t.shape[0], dtype=x_t.dtype, device=x_t.device)
        if self.ratio == 'disc':
            if self.disc_log_ratio is None:
                raise RuntimeError("fdiv with ratio='disc' needs the real-data terms (refine.py --data)")
            return self.disc_log_ratio(x_t, sigma, labels).reshape(-1)
        if self.head is None:
            raise RuntimeError("fdiv with ratio='score': call setup(G=..., teacher=...) (the loop does) first")
        return self.head(x_t, sigma, labels).reshape(-1)

    def sigma_bins(self, sigma):
        """Bin index in [0, ratio_bins) of each σ by its position u on the sampled Karras range."""
        g = self.gen_sigma
        lo, hi = g.sigma_min ** (1 / g.rho), g.sigma_max ** (1 / g.rho)
        u = (hi - (sigma / g.scale) ** (1 / g.rho)) / (hi - lo)
        frac = ((u - self.u_min) / max(self.u_max - self.u_min, 1e-12)).clamp(0, 1 - 1e-9)
        return (frac * self.ratio_bins).floor().long()

    def weights(self, x_t, sigma, labels):
        """The density ratio r and the normalised weights h(r), [N] each (no gradient)."""
        with torch.no_grad():
            logit = self.log_ratio(x_t, sigma, labels).to(torch.float64)
            r = logit.clamp(-self.logit_clip, self.logit_clip).exp().clamp(self.ratio_min, self.ratio_max)
            if self.normalise_ratio:
                bins = self.sigma_bins(sigma.to(torch.float64))
                total = torch.zeros(self.ratio_bins, dtype=r.dtype, device=r.device).index_add_(0, bins, r)
                count = torch.zeros_like(total).index_add_(0, bins, torch.ones_like(r))
                r = r / (total / count.clamp(min=1))[bins]
            h = _h(self.f, r)
            if self.normalise_h:
                h = h / h.mean()
        return r, h

    # Losses -------------------------------------------------------------------------------

    def generator_loss(self, teacher, fake, x_g, labels, rnd):
        sigma = self.gen_sigma.sample(rnd)
        x_t, d_teacher, d_fake = noised_denoisers(teacher, fake, x_g, sigma, labels, rnd)
        with torch.no_grad():
            r, h = self.weights(x_t, sigma, labels)
            direction = noise.expand_like(h.to(x_g.dtype), x_g) * (d_fake - d_teacher)
            if self.normalise:
                direction = direction / mean_abs_normaliser(x_g, d_teacher)
        stats = dict(sigma=sigma, ratio=r.to(sigma.dtype), h=h.to(sigma.dtype),
            grad_norm=direction.flatten(1).norm(dim=1))
        return surrogate(direction, x_g), stats

    def head_loss(self, fake, x_g, labels, rnd):
        """Ratio score matching of the log-ratio head on detached generator samples, [N]."""
        sigma = self.fake_sigma.sample(rnd)
        s = noise.expand_like(sigma, x_g)
        x_t = (x_g + s * rnd.randn(*x_g.shape[1:])).detach()
        with torch.no_grad():
            target = self.teacher(x_t, sigma, labels) - fake(x_t, sigma, labels)
        x_in = x_t.clone().requires_grad_(True)
        with torch.enable_grad():
            ell = self.head(x_in, sigma, labels)
            grad, = torch.autograd.grad(ell.sum(), x_in, create_graph=True)
        # σ²‖∇ℓ − (D_φ − D_ψ)/σ²‖²: score-space matching with DSM's σ² weighting.
        return (s * grad - target / s).square().flatten(1).sum(1)

    def fake_loss(self, fake, x_g, labels, rnd):
        loss = super().fake_loss(fake, x_g, labels, rnd)
        if self.head is not None:
            loss = loss + self.head_loss(fake, x_g, labels, rnd)
        return loss

    def options(self):
        return dict(super().options(), f=self.f, ratio=self.ratio if isinstance(self.ratio, str) else 'callable',
            u_min=self.u_min, u_max=self.u_max, normalise=self.normalise, normalise_ratio=self.normalise_ratio,
            normalise_h=self.normalise_h)
