"""VarDiU (Wang, Zhang, Ou, Barber, 2025): a variational diffusive upper bound with an unbiased gradient.

For a latent-variable generator x_g = G_θ(z), z ~ N(0, I), and x_t = x_g + σ ε,

    KL(p_θ,σ ‖ p_d,σ) ≤ E_{z,ε}[ −log q_η(z | x_t, σ) − log p_d,σ(x_t) ] + const,

tight when the encoder q_η is the generator's posterior p_θ(z | x_t). The bound is minimised
jointly over θ and η, so no fake score is learned (`fake_steps` = 0): DI's bias from an
imperfect DSM fake score is gone. Per sample the loss is

    L = −w(σ) [ log N(z; μ_η(x_t, σ), diag(σ · softplus(ρ_η(x_t, σ)))²) + sg(m)ᵀ x_g ],

with gradients to θ through x_t inside the encoder term and through sg(m)ᵀx_g, where
m = (D_φ(x_t) − x_g)/σ² (the official code's choice with a learned teacher: the teacher score
plus ε/σ, zero-mean extra, unbiased; `teacher_score='score'` uses (D_φ − x_t)/σ² instead).
w(σ) = (σ/σ_max)² ('sigma2'; also 'sigma', 'sigma4', 'uniform').

Schedule: σ = σ_min + u^p (σ_max − σ_min), u ~ U(0, 1), with the power p annealed from
`power_start` = 0.1 (training starts near σ_max) up to `power` = 2. Antithetic pairs: each latent
z appears twice in the batch with noises ε and −ε and one shared σ (adjacent samples, so every
process's part of the batch must be even).

Decisions (the toy code's settings translated to this toolkit):
  * σ range. The code's MoG40 range [0.1, 20] has sigma_data ≈ 23.1, i.e. [0.0022, 0.43] on EDM's
    image scale; defaults sigma_min = 0.002, sigma_max = 0.43, scaled by sigma_data/0.5 like
    every σ here.
  * Annealing length. The code adds 0.01 to p every 1000 iterations of 1024 samples: 1.9 / 0.01
    × 1.024 Mimg ≈ 195 Mimg to reach p = 2, far beyond this toolkit's budgets. p rises linearly
    in images instead, reaching `power` after `anneal_kimg` = 200 kimg by default
    (anneal_kimg=194560 reproduces the code's rate). The loop reports progress through
    `set_progress(cur_nimg)`.
  * The encoder is an MLP on [c_in x_t (flattened), noise embedding of ln σ/4, labels] with 4
    hidden layers of 256 (the code: 4 × 400, on [x, σ]), owned by this divergence and trained
    by the loop's extra optimizer in the generator update, with the generator's learning rate
    unless `encoder_lr` is given. For image generators it is the same MLP on flattened pixels:
    correct, but a convolutional encoder would be the efficient choice (not done).
  * `default_sigma_init` = 1.0 (Diff-Instruct's, VarDiU's baseline) for one-step generators
    initialised from a teacher; VarDiU itself only trains MLP generators.
"""

import math

import torch
import torch.nn.functional as F

from refine import noise
from refine.divergences.base import Divergence
from training.networks_mlp import MLPBody, MLPNoiseEmbedding

class NoiseConditionedMLP(torch.nn.Module):
    """An MLP head on a noisy sample: f(c_in x (flattened), emb(ln σ / 4), labels) -> out_features.

    Used for divergence-owned networks (VarDiU's encoder, f-distill's data-free ratio head).
    """
    def __init__(self, in_features, out_features, sigma_data, label_dim=0, hidden=256, num_layers=4,
            emb_dim=64, out_gain=1.0):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.sigma_data, self.label_dim = float(sigma_data), int(label_dim)
        self.noise_emb = MLPNoiseEmbedding(emb_dim)
        self.body = MLPBody(self.in_features + emb_dim + self.label_dim, self.out_features,
            hidden=hidden, num_layers=num_layers, out_gain=out_gain)

    def forward(self, x, sigma, labels=None):
        x = x.flatten(1)
        sigma = sigma.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        c_in = 1 / (sigma.square() + self.sigma_data ** 2).sqrt()
        parts = [c_in * x, self.noise_emb((sigma.log() / 4).flatten()).to(x.dtype)]
        if self.label_dim:
            parts.append(labels.to(x.dtype).reshape(x.shape[0], self.label_dim))
        return self.body(torch.cat(parts, dim=1))

class GaussianEncoder(torch.nn.Module):
    """q_η(z | x_t, σ) = N(μ, diag(σ · softplus(ρ))²): returns (μ, ρ), each shaped like z."""
    def __init__(self, x_shape, z_shape, sigma_data, label_dim=0, hidden=256, num_layers=4):
        super().__init__()
        self.x_shape, self.z_shape = tuple(x_shape), tuple(z_shape)
        self.z_numel = math.prod(self.z_shape)
        self.net = NoiseConditionedMLP(math.prod(self.x_shape), 2 * self.z_numel, sigma_data,
            label_dim=label_dim, hidden=hidden, num_layers=num_layers)

    def forward(self, x_t, sigma, labels=None):
        out = self.net(x_t, sigma, labels)
        mean, rho = out[:, :self.z_numel], out[:, self.z_numel:]
        return mean.reshape(-1, *self.z_shape), rho.reshape(-1, *self.z_shape)

WEIGHTINGS = dict(sigma2=2, sigma=1, sigma4=4, uniform=0)

class VarDiU(Divergence):
    name = 'vardiu'
    grad_through_networks = True # through the encoder
    default_sigma_init = 1.0
    default_fake_steps = 0
    uses_fake_score = False
    uses_latents = True
    module_phase = 'generator'

    def __init__(self, sigma_data=0.5, fake_steps=0, sigma_min=0.002, sigma_max=0.43, power=2.0,
            power_start=0.1, anneal_kimg=200.0, weight='sigma2', antithetic=True,
            teacher_score='denoised', encoder_hidden=256, encoder_layers=4, encoder_lr=None,
            encoder=None, **kwargs):
        if fake_steps:
            raise ValueError('vardiu learns no fake score: fake steps must be 0 (drop --fake-steps)')
        super().__init__(sigma_data=sigma_data, fake_steps=0, **kwargs)
        if weight not in WEIGHTINGS:
            raise ValueError(f"unknown VarDiU weight '{weight}' (choose from {', '.join(WEIGHTINGS)})")
        if teacher_score not in ('denoised', 'score'):
            raise ValueError(f"teacher_score must be 'denoised' or 'score', got {teacher_score!r}")
        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f'need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}')
        scale = self.sigma_data / 0.5
        self.sigma_min, self.sigma_max = float(sigma_min) * scale, float(sigma_max) * scale
        self.power, self.power_start = float(power), float(power_start)
        self.anneal_kimg = float(anneal_kimg)
        self.weight, self.antithetic, self.teacher_score = weight, bool(antithetic), teacher_score
        self.encoder_hidden, self.encoder_layers = int(encoder_hidden), int(encoder_layers)
        self.module_lr = None if encoder_lr is None else float(encoder_lr)
        self.encoder = encoder
        self.current_power = self.power_start if self.anneal_kimg > 0 else self.power

    # Loop hooks ---------------------------------------------------------------------------

    def setup(self, G, teacher, fake=None):
        if self.encoder is None:
            self.encoder = GaussianEncoder(G.out_shape, G.z_shape, self.sigma_data,
                label_dim=getattr(G, 'label_dim', 0), hidden=self.encoder_hidden, num_layers=self.encoder_layers)

    def trainable_modules(self):
        return [self.encoder] if self.encoder is not None else []

    def set_progress(self, cur_nimg):
        frac = 1.0 if self.anneal_kimg <= 0 else min(cur_nimg / (self.anneal_kimg * 1e3), 1.0)
        self.current_power = self.power_start + frac * (self.power - self.power_start)

    def check_batch(self, batch_per_round):
        """Before any work: antithetic pairs need an even number of samples in every round."""
        if self.antithetic and batch_per_round % 2:
            raise ValueError(f'vardiu draws antithetic pairs: the batch per process and round '
                f'(--batch / --batch-gpu) must be even, got {batch_per_round} (or pass --div-opt antithetic=false)')

    def _pair(self, x):
        """Antithetic pairing: each even-indexed draw repeated for its odd neighbour."""
        if x.shape[0] % 2:
            raise ValueError(f'antithetic pairs need an even batch per process and round, got {x.shape[0]}')
        return x[0::2].repeat_interleave(2, dim=0)

    def draw_latents(self, rnd, z_shape):
        z = rnd.randn(*z_shape)
        return self._pair(z) if self.antithetic else z

    # The bound -----------------------------------------------------------------------------

    def sample_sigma(self, rnd):
        u = rnd.rand()
        sigma = self.sigma_min + u ** self.current_power * (self.sigma_max - self.sigma_min)
        return self._pair(sigma) if self.antithetic else sigma

    def sample_noise(self, rnd, shape):
        eps = rnd.randn(*shape)
        if self.antithetic:
            sign = torch.ones(eps.shape[0], dtype=eps.dtype, device=eps.device)
            sign[1::2] = -1
            eps = self._pair(eps) * noise.expand_like(sign, eps)
        return eps

    def sigma_weight(self, sigma):
        return (sigma / self.sigma_max) ** WEIGHTINGS[self.weight]

    def encoder_log_prob(self, z, x_t, sigma, labels):
        """log q_η(z | x_t, σ) per sample (gradients to η and through x_t)."""
        if self.encoder is None:
            raise RuntimeError('vardiu: call setup(G=..., teacher=...) (the loop does) before using it')
        mean, rho = self.encoder(x_t, sigma, labels)
        std = noise.expand_like(sigma, mean).to(mean.dtype) * F.softplus(rho)
        z = z.to(mean.dtype)
        logp = -0.5 * ((z - mean) / std).square() - std.log() - 0.5 * math.log(2 * math.pi)
        return logp.flatten(1).sum(1)

    def generator_loss(self, teacher, fake, x_g, labels, rnd, z=None):
        if z is None:
            raise ValueError('vardiu needs the latents z of x_g (the loop passes them)')
        sigma = self.sample_sigma(rnd)
        s = noise.expand_like(sigma, x_g)
        x_t = x_g + s * self.sample_noise(rnd, x_g.shape[1:])
        log_q = self.encoder_log_prob(z, x_t, sigma, labels)
        with torch.no_grad():
            d_teacher = teacher(x_t.detach(), sigma, labels)
            anchor = x_g if self.teacher_score == 'denoised' else x_t
            m = (d_teacher - anchor.detach()) / s ** 2
        w = self.sigma_weight(sigma)
        loss = -w * (log_q + (m * x_g).flatten(1).sum(1))
        stats = dict(sigma=sigma, log_q=log_q.detach(), power=torch.full_like(sigma, self.current_power))
        return loss, stats

    def options(self):
        scale = self.sigma_data / 0.5
        return dict(super().options(), sigma_min=self.sigma_min / scale, sigma_max=self.sigma_max / scale,
            power=self.power, power_start=self.power_start, anneal_kimg=self.anneal_kimg, weight=self.weight,
            antithetic=self.antithetic, teacher_score=self.teacher_score)
