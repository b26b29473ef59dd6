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
  * The encoder (`encoder='auto'`): for vector generators an MLP on [c_in x_t (flattened), noise
    embedding of ln σ/4, labels] with 4 hidden layers of 256 (the code: 4 × 400, on [x, σ]),
    std = σ·softplus(ρ); for image generators whose latent has the image's spatial size (the
    one-step generator) `ConvEncoder`: a fully convolutional net at full resolution, FiLM-
    conditioned on ln σ and the labels, returning μ and ln τ² = −softplus(2(h − ln σ)) per pixel,
    initialised at μ = 0 and τ ≈ 1 (the prior; see its docstring). `encoder=mlp|conv` forces
    one. It is owned by this divergence and trained by the loop's extra optimizer in the
    generator update, at `encoder_lr` (default: the generator's for the MLP, 1e-3 for the conv
    encoder). `encoder_warmup_kimg` > 0 trains the encoder alone for that long first. Why the
    MLP's σ·softplus(ρ) fails on images, and what the conv encoder does on MNIST: docs/divergences.md.
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

class _FiLMBlock(torch.nn.Module):
    """Residual block at full resolution: GN -> FiLM(emb) -> SiLU -> 3x3 (dilated) -> GN -> SiLU -> 3x3."""
    def __init__(self, channels, emb_dim, dilation=1):
        super().__init__()
        groups = math.gcd(channels, 8)
        self.norm0 = torch.nn.GroupNorm(groups, channels)
        self.film = torch.nn.Linear(emb_dim, 2 * channels)
        self.conv0 = torch.nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.norm1 = torch.nn.GroupNorm(groups, channels)
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        torch.nn.init.zeros_(self.film.weight)
        torch.nn.init.zeros_(self.film.bias)

    def forward(self, x, emb):
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv0(F.silu(self.norm0(x) * (1 + scale) + shift))
        h = self.conv1(F.silu(self.norm1(h)))
        return (x + h) / math.sqrt(2)

class ConvEncoder(torch.nn.Module):
    """q_η(z | x_t, σ) = N(μ, diag(τ²)) for image generators whose latent has the image's
    spatial size (the one-step generator's z is image-shaped noise): a fully convolutional net at
    full resolution on c_in x_t, conditioned on ln σ (and the labels) by FiLM in every block.

    Returns (μ, ln τ²), each shaped like z, with ln τ² = −softplus(2(h − ln σ)) for the net's
    second output h: the posterior precision 1/τ² = 1 + g²/σ² of a pixel seen with gain g = e^h
    through noise σ (exact for a linear-Gaussian generator). So τ ≤ 1 (never wider than the
    prior), τ → 1 where the pixel tells little about z (g ≪ σ) and τ ≈ σ/g where it tells a lot,
    whatever σ is: no output has to grow like 1/σ. The output convolution starts at zero, so the
    initial posterior is μ = 0 with gain `init_gain` everywhere, close to the prior (the initial
    generator's gain is below σ_data/(σ_init² + σ_data²) ≈ 0.2 at σ_init = 1).
    """
    returns_log_var = True

    def __init__(self, x_shape, z_shape, sigma_data, label_dim=0, channels=64, blocks=4, emb_dim=128,
            init_gain=0.05):
        super().__init__()
        self.x_shape, self.z_shape = tuple(x_shape), tuple(z_shape)
        if len(self.x_shape) != 3 or len(self.z_shape) != 3 or self.x_shape[1:] != self.z_shape[1:]:
            raise ValueError(f'the convolutional encoder needs image-shaped samples and latents of one '
                f'spatial size, got x {self.x_shape} and z {self.z_shape} (use encoder=mlp)')
        self.sigma_data, self.label_dim = float(sigma_data), int(label_dim)
        self.noise_emb = MLPNoiseEmbedding(64)
        self.emb = torch.nn.Sequential(torch.nn.Linear(64 + self.label_dim, emb_dim), torch.nn.SiLU(),
            torch.nn.Linear(emb_dim, emb_dim), torch.nn.SiLU())
        self.stem = torch.nn.Conv2d(self.x_shape[0], channels, 3, padding=1)
        # Dilations 1, 2, 4, 8, ...: the receptive field covers a 32x32 image in 4 blocks.
        self.blocks = torch.nn.ModuleList([_FiLMBlock(channels, emb_dim, dilation=2 ** (i % 4)) for i in range(blocks)])
        self.norm = torch.nn.GroupNorm(math.gcd(channels, 8), channels)
        self.out = torch.nn.Conv2d(channels, 2 * self.z_shape[0], 3, padding=1)
        torch.nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias.zero_()
            self.out.bias[self.z_shape[0]:] = math.log(init_gain)

    def forward(self, x_t, sigma, labels=None):
        sigma = sigma.to(x_t.dtype).reshape(-1).expand(x_t.shape[0])
        c_in = 1 / (sigma.square() + self.sigma_data ** 2).sqrt()
        parts = [self.noise_emb(sigma.log() / 4).to(x_t.dtype)]
        if self.label_dim:
            parts.append(labels.to(x_t.dtype).reshape(x_t.shape[0], self.label_dim))
        emb = self.emb(torch.cat(parts, dim=1))
        h = self.stem(c_in[:, None, None, None] * x_t)
        for block in self.blocks:
            h = block(h, emb)
        mean, gain = self.out(F.silu(self.norm(h))).chunk(2, dim=1)
        log_var = -F.softplus(2 * (gain - sigma.log()[:, None, None, None]))
        return mean, log_var

ENCODERS = ('auto', 'mlp', 'conv')

# Adam learning rate of the convolutional encoder unless encoder_lr is given (MNIST, docs/divergences.md).
CONV_ENCODER_LR = 1e-3

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
            teacher_score='denoised', encoder='auto', encoder_hidden=256, encoder_layers=4,
            encoder_channels=64, encoder_blocks=4, encoder_lr=None, encoder_warmup_kimg=0.0, **kwargs):
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
        self.encoder_channels, self.encoder_blocks = int(encoder_channels), int(encoder_blocks)
        self.encoder_lr = None if encoder_lr is None else float(encoder_lr)
        self.module_lr = self.encoder_lr # the loop's learning rate for the encoder (None: the generator's)
        self.encoder_warmup_kimg = float(encoder_warmup_kimg)
        self.cur_nimg = 0
        if isinstance(encoder, torch.nn.Module): # a ready encoder (tests, Python users)
            self.encoder, self.encoder_kind = encoder, 'given'
        elif encoder is None or str(encoder).lower() in ENCODERS:
            self.encoder, self.encoder_kind = None, 'auto' if encoder is None else str(encoder).lower()
        else:
            raise ValueError(f"unknown VarDiU encoder {encoder!r} (choose from {', '.join(ENCODERS)})")
        self.current_power = self.power_start if self.anneal_kimg > 0 else self.power

    # Loop hooks ---------------------------------------------------------------------------

    def resolved_encoder_kind(self, G):
        """'conv' for image generators with image-shaped latents of the image's size, else 'mlp'
        (for encoder='auto'); an explicit choice as given."""
        if self.encoder_kind != 'auto':
            return self.encoder_kind
        x_shape, z_shape = tuple(G.out_shape), tuple(G.z_shape)
        image = not getattr(G, 'is_vector', len(x_shape) == 1) and len(x_shape) == 3
        return 'conv' if image and len(z_shape) == 3 and z_shape[1:] == x_shape[1:] else 'mlp'

    def setup(self, G, teacher, fake=None):
        if self.encoder is not None:
            return
        label_dim = getattr(G, 'label_dim', 0)
        kind = self.resolved_encoder_kind(G)
        if kind == 'conv':
            self.encoder = ConvEncoder(G.out_shape, G.z_shape, self.sigma_data, label_dim=label_dim,
                channels=self.encoder_channels, blocks=self.encoder_blocks)
            if self.encoder_lr is None:
                self.module_lr = CONV_ENCODER_LR
        else:
            self.encoder = GaussianEncoder(G.out_shape, G.z_shape, self.sigma_data,
                label_dim=label_dim, hidden=self.encoder_hidden, num_layers=self.encoder_layers)

    def trainable_modules(self):
        return [self.encoder] if self.encoder is not None else []

    def set_progress(self, cur_nimg):
        frac = 1.0 if self.anneal_kimg <= 0 else min(cur_nimg / (self.anneal_kimg * 1e3), 1.0)
        self.current_power = self.power_start + frac * (self.power - self.power_start)
        self.cur_nimg = cur_nimg

    def warming_up(self):
        """During the encoder warm-up only the encoder learns (the generator gets no gradient)."""
        return self.cur_nimg < self.encoder_warmup_kimg * 1e3

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
        if getattr(self.encoder, 'returns_log_var', False):
            mean, log_var = self.encoder(x_t, sigma, labels)
            z = z.to(mean.dtype)
            logp = -0.5 * (z - mean).square() * torch.exp(-log_var) - 0.5 * log_var - 0.5 * math.log(2 * math.pi)
            return logp.flatten(1).sum(1)
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
        warmup = self.warming_up()
        if warmup: # the encoder alone: no gradient to the generator, no teacher call
            x_g = x_g.detach()
        x_t = x_g + s * self.sample_noise(rnd, x_g.shape[1:])
        log_q = self.encoder_log_prob(z, x_t, sigma, labels)
        w = self.sigma_weight(sigma)
        if warmup:
            stats = dict(sigma=sigma, log_q=log_q.detach(), power=torch.full_like(sigma, self.current_power))
            return -w * log_q, stats
        with torch.no_grad():
            d_teacher = teacher(x_t.detach(), sigma, labels)
            anchor = x_g if self.teacher_score == 'denoised' else x_t
            m = (d_teacher - anchor.detach()) / s ** 2
        loss = -w * (log_q + (m * x_g).flatten(1).sum(1))
        stats = dict(sigma=sigma, log_q=log_q.detach(), power=torch.full_like(sigma, self.current_power))
        return loss, stats

    def options(self):
        scale = self.sigma_data / 0.5
        return dict(super().options(), sigma_min=self.sigma_min / scale, sigma_max=self.sigma_max / scale,
            power=self.power, power_start=self.power_start, anneal_kimg=self.anneal_kimg, weight=self.weight,
            antithetic=self.antithetic, teacher_score=self.teacher_score, encoder=self.encoder_kind,
            encoder_lr=self.encoder_lr, encoder_warmup_kimg=self.encoder_warmup_kimg)
