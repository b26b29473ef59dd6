"""Optional real-data terms (`refine.py --data DATASET`): a GAN discriminator on the fake score's
UNet bottleneck, as in SiDA (Zhou et al., ICLR 2025) and DMD2 (Yin et al., NeurIPS 2024).

Data-free is the default; `with_real_data(divergence, images, ...)` wraps any divergence that
learns a fake score and adds, with x_r a real image (and its dataset label), x_g a generated one
(and its label), ℓ(x, σ) the discriminator's logits on the fake score's encoder features at a
noisy x, n = C·H·W, softplus(a) = log(1 + e^a) and ⟨·⟩ the mean over a logit map's positions:

  fake-score update (the discriminator; same σ and the same noise ε for x_r and x_g):
      L_D = w_D · ω(σ) · n · ⟨softplus(−ℓ(x_r + σε, σ)) + softplus(ℓ(sg(x_g) + σε, σ))⟩,
      ω = λ_EDM(σ) = 1/σ² + 1/σ_d² ('edm', SiDA) or 1 ('none', DMD2); σ ~ `sigma`;
  generator update (non-saturating), added to the divergence's own loss:
      L_adv = s · w_G · n · ⟨softplus(−ℓ(x_g + σ'ε', σ'))⟩ / (wf if `normalise`),
      wf = sg(mean |x_g − D_φ(x_g + σ'ε', σ')|), σ' ~ `sigma` ('disc') or the divergence's own
      generator σ ('divergence'); s = the divergence's `loss_scale` (SiD's) or 1.

Gradients of L_D reach the fake score's encoder and the head (trained with the fake score, in
its update); L_adv reaches x_g through the fake score's encoder with its parameters frozen. The
factor n: the published weights are relative to per-element mean losses (DMD2's MSE; SiDA adds
the BCE to a per-pixel loss), while our losses are sums over pixels.

The features are the output of the last encoder block of an EDM SongUNet or DhariwalUNet (the
bottleneck, before the middle blocks), taken by a forward hook that exists only during the call
and stops the forward pass there (the decoder is not run). Heads:
  'mean'  the channel mean of the features, one logit per position (SiDA: no parameters);
  'conv'  3×3 conv, GroupNorm, SiLU, 3×3 conv stride 2, GroupNorm, SiLU, spatial mean, linear:
          one logit per sample (our own small head in the spirit of DMD2's conv branch, whose
          exact layers assume an 8×8, 768-channel ImageNet bottleneck).
`log_ratio(x_t, σ, c)` = ⟨ℓ⟩ is log D/(1 − D), the density-ratio estimate f-distill reads
(real = 1, so r = D/(1 − D) ≈ p_data/p_g).

Real batches: the indices are drawn from the phase's StreamRandom (seed, images seen, phase),
for the whole global batch, each process keeping its slice, like every other draw: a resumed
run and a torchrun run read the same images as one uninterrupted process.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from refine import noise
from refine.divergences.sid import frozen_parameters, mean_abs_normaliser
from torch_utils import training_stats
from training import networks_edm

class RealImages:
    """The images of a dataset (training.dataset.ImageFolderDataset) as float [-1, 1] batches."""

    def __init__(self, dataset, label_dim=0):
        self.dataset = dataset
        self.label_dim = int(label_dim)
        self.path = getattr(dataset, '_path', dataset.name)

    def __len__(self):
        return len(self.dataset)

    def draw(self, rnd, device):
        """This process's part of a global batch of random images (and labels): [N, C, H, W]."""
        index = rnd.randint(len(self.dataset))
        items = [self.dataset[int(i)] for i in index.tolist()]
        x = torch.from_numpy(np.stack([image for image, _ in items])).to(device=device, dtype=torch.float32)
        x = x / 127.5 - 1
        c = None
        if self.label_dim:
            c = torch.from_numpy(np.stack([label for _, label in items])).to(device=device, dtype=torch.float32)
            if c.shape[1] < self.label_dim: # a subset without the last classes: one-hot up to the teacher's
                c = F.pad(c, (0, self.label_dim - c.shape[1]))
        return x, c

class _Stop(Exception):
    """Raised by the feature hook: the rest of the forward pass is not needed."""

def bottleneck_block(fake):
    """The last encoder block of an EDM preconditioner's SongUNet/DhariwalUNet; ValueError otherwise."""
    model = getattr(fake, 'model', None)
    if not isinstance(model, (networks_edm.SongUNet, networks_edm.DhariwalUNet)):
        inner = type(model).__name__ if model is not None else type(fake).__name__
        raise ValueError(f'--data: the discriminator reads the fake score\'s UNet bottleneck, which needs an '
            f'EDM SongUNet or DhariwalUNet teacher; this fake score is {type(fake).__name__} ({inner})')
    return list(model.enc.values())[-1]

def bottleneck_features(fake, x, sigma, labels):
    """The output of `fake`'s last encoder block at (x, σ, labels); the decoder is skipped."""
    block, found = bottleneck_block(fake), []
    def hook(_module, _inputs, output):
        found.append(output)
        raise _Stop
    handle = block.register_forward_hook(hook)
    try:
        fake(x, sigma, labels)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not found:
        raise RuntimeError('the fake score ran without reaching its bottleneck')
    return found[0]

def _groups(channels):
    return math.gcd(32, channels)

class DiscriminatorHead(torch.nn.Module):
    """Logits from bottleneck features [N, C, H, W]: [N, H, W] ('mean') or [N] ('conv')."""
    module_phase = 'fake' # trained in the fake-score update, with the fake score

    def __init__(self, channels, kind='conv', lr=None):
        super().__init__()
        if kind not in ('mean', 'conv'):
            raise ValueError(f"unknown discriminator head '{kind}' (mean or conv)")
        self.kind, self.channels = kind, int(channels)
        self.module_lr = lr # None: the fake score's learning rate
        if kind == 'conv':
            c = self.channels
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.GroupNorm(_groups(c), c), torch.nn.SiLU(),
                torch.nn.Conv2d(c, c, 3, stride=2, padding=1), torch.nn.GroupNorm(_groups(c), c), torch.nn.SiLU(),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 1))

    def forward(self, features):
        if self.kind == 'mean':
            return features.to(torch.float32).mean(1)
        return self.net(features.to(torch.float32)).reshape(-1)

def per_sample(values):
    """Mean over every axis but the first (a logit map's positions), [N]."""
    return values.reshape(values.shape[0], -1).mean(1)

# The options of the real-data terms (refine.py --div-opt gan_KEY=VALUE), with the generic
# defaults (DMD2's); a divergence class may override them in `adversarial_defaults`.
GAN_DEFAULTS = dict(weight=3e-3, disc_weight=1e-2, sigma='karras', u_min=0.0, u_max=1.0, gen_sigma='disc',
    head='conv', normalise=False, disc_weighting='none', lr=None)

class AdversarialTerms:
    """A divergence plus the real-data GAN terms (see the module docstring); every other
    attribute and hook is the wrapped divergence's, so the loop sees one divergence."""

    def __init__(self, base, images, weight=3e-3, disc_weight=1e-2, sigma='karras', u_min=0.0, u_max=1.0,
            gen_sigma='disc', head='conv', normalise=False, disc_weighting='none', lr=None):
        if not getattr(base, 'uses_fake_score', True) or base.fake_steps < 1:
            raise ValueError(f"--data: divergence '{base.name}' learns no fake score, so there is no "
                'bottleneck for a discriminator')
        if gen_sigma not in ('disc', 'divergence'):
            raise ValueError(f"gan_gen_sigma must be 'disc' or 'divergence', got {gen_sigma!r}")
        if gen_sigma == 'divergence' and not hasattr(base, 'gen_sigma'):
            raise ValueError(f"gan_gen_sigma=divergence: divergence '{base.name}' has no generator σ distribution")
        if disc_weighting not in ('edm', 'none'):
            raise ValueError(f"gan_disc_weighting must be 'edm' or 'none', got {disc_weighting!r}")
        if head not in ('mean', 'conv'):
            raise ValueError(f"unknown gan_head '{head}' (mean or conv)")
        if sigma not in ('karras', 'lognormal'):
            raise ValueError(f"gan_sigma must be 'karras' or 'lognormal', got {sigma!r}")
        for name, value in (('gan_weight', weight), ('gan_disc_weight', disc_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f'{name} must be a finite number >= 0, got {value}')
        self.base, self.images = base, images
        self.weight, self.disc_weight = float(weight), float(disc_weight)
        self.sigma_name, self.u_min, self.u_max = sigma, float(u_min), float(u_max)
        self.gen_sigma_name, self.head_kind = gen_sigma, head
        self.normalise, self.disc_weighting = bool(normalise), disc_weighting
        self.lr = None if lr is None else float(lr)
        scale = base.sigma_data / 0.5
        self.disc_sigma = noise.KarrasUniformSigma(u_min=self.u_min, u_max=self.u_max, scale=scale) \
            if sigma == 'karras' else noise.LogNormalSigma(scale=scale)
        self.adv_sigma = base.gen_sigma if gen_sigma == 'divergence' else self.disc_sigma
        self.head = None
        self.fake_module = None

    def __getattr__(self, name): # everything else is the wrapped divergence's
        if name.startswith('__') or 'base' not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__['base'], name)

    grad_through_networks = True # the adversarial term goes through the fake score's encoder

    # Loop hooks ---------------------------------------------------------------------------

    def setup(self, G, teacher, fake=None):
        if hasattr(self.base, 'setup'):
            self.base.setup(G=G, teacher=teacher, fake=fake)
        if fake is None:
            raise ValueError('the real-data terms need the fake score (the loop passes fake=)')
        block = bottleneck_block(fake)
        self.fake_module = fake
        if self.head is None:
            self.head = DiscriminatorHead(block.out_channels, self.head_kind, lr=self.lr)
        if getattr(self.base, 'ratio', None) == 'disc':
            self.base.disc_log_ratio = self.log_ratio # f-distill's r = D/(1 − D)

    def trainable_modules(self):
        own = [self.head] if self.head is not None and any(True for _ in self.head.parameters()) else []
        base = list(self.base.trainable_modules()) if hasattr(self.base, 'trainable_modules') else []
        return base + own

    # The discriminator ---------------------------------------------------------------------

    def logits(self, x, sigma, labels):
        if self.head is None:
            raise RuntimeError('call setup(G=..., teacher=..., fake=...) (the loop does) first')
        return self.head(bottleneck_features(self.fake_module, x, sigma, labels))

    def log_ratio(self, x_t, sigma, labels):
        """log D/(1 − D) per sample: the discriminator's estimate of log p_data/p_g at x_t, [N]."""
        with torch.no_grad():
            return per_sample(self.logits(x_t, sigma, labels))

    def disc_loss(self, x_real, c_real, x_g, labels, rnd):
        """Per-sample L_D (unweighted BCE sum, and the weight), real and generated at one σ and ε."""
        sigma = self.disc_sigma.sample(rnd)
        eps = rnd.randn(*x_g.shape[1:])
        s = noise.expand_like(sigma, x_g)
        x_in = torch.cat([x_real + s * eps, x_g.detach() + s * eps])
        c_in = None if labels is None else torch.cat([c_real, labels])
        logit = self.logits(x_in, torch.cat([sigma, sigma]), c_in)
        real, fake = logit[:x_g.shape[0]], logit[x_g.shape[0]:]
        bce = per_sample(F.softplus(-real)) + per_sample(F.softplus(fake))
        omega = noise.edm_weight(sigma, self.base.sigma_data) if self.disc_weighting == 'edm' else torch.ones_like(sigma)
        return bce, self.disc_weight * math.prod(x_g.shape[1:]) * omega

    def adversarial_loss(self, teacher, x_g, labels, rnd):
        """Per-sample L_adv and the unweighted softplus(−ℓ) (for the statistics)."""
        sigma = self.adv_sigma.sample(rnd)
        x_t = x_g + noise.expand_like(sigma, x_g) * rnd.randn(*x_g.shape[1:])
        with frozen_parameters(self.fake_module, self.head), torch.enable_grad():
            bce = per_sample(F.softplus(-self.logits(x_t, sigma, labels)))
        loss = bce * (getattr(self.base, 'loss_scale', 1.0) * self.weight * math.prod(x_g.shape[1:]))
        if self.normalise:
            with torch.no_grad():
                wf = mean_abs_normaliser(x_g, teacher(x_t.detach(), sigma, labels)).flatten(1)[:, 0]
            loss = loss / wf
        return loss, bce.detach()

    # Losses -------------------------------------------------------------------------------

    def fake_loss(self, fake, x_g, labels, rnd):
        loss = self.base.fake_loss(fake, x_g, labels, rnd)
        x_real, c_real = self.images.draw(rnd, x_g.device)
        bce, weight = self.disc_loss(x_real, c_real, x_g, labels, rnd)
        training_stats.report('loss_disc', bce.detach())
        return loss + weight * bce

    def generator_loss(self, teacher, fake, x_g, labels, rnd, **kwargs):
        loss, stats = self.base.generator_loss(teacher, fake, x_g, labels, rnd, **kwargs)
        adv, bce = self.adversarial_loss(teacher, x_g, labels, rnd)
        return loss + adv, dict(stats, loss_adv=bce)

    def options(self):
        return dict(self.base.options(), real_data=dict(path=self.images.path, images=len(self.images),
            gan_weight=self.weight, gan_disc_weight=self.disc_weight, gan_sigma=self.sigma_name,
            gan_u_min=self.u_min, gan_u_max=self.u_max, gan_gen_sigma=self.gen_sigma_name,
            gan_head=self.head_kind, gan_normalise=self.normalise, gan_disc_weighting=self.disc_weighting,
            gan_lr=self.lr))

def gan_defaults(divergence_class):
    """The real-data options of a divergence class: GAN_DEFAULTS, then its own."""
    return dict(GAN_DEFAULTS, **getattr(divergence_class, 'adversarial_defaults', {}))

def with_real_data(divergence, images, **gan_options):
    """`divergence` plus the real-data terms, with its class's defaults and `gan_options` (no
    'gan_' prefix)."""
    options = dict(gan_defaults(type(divergence)), **gan_options)
    return AdversarialTerms(divergence, images, **options)

CACHE_BYTES = 1 << 30

def open_images(path, teacher):
    """The dataset at `path` (dataset_tool.py's format, ZIP or folder) as RealImages, checked
    against the teacher before any work: every image readable and alike, the teacher's
    resolution and channels, and class labels for a class-conditional teacher. One-line
    ValueErrors naming --data."""
    from refine.divergences import DataError # pylint: disable=import-outside-toplevel (a cycle)
    from training.dataset import ImageFolderDataset # pylint: disable=import-outside-toplevel
    where = f'--data {path}'
    if len(teacher.shape) != 3:
        raise DataError(f'{where}: the real-data terms need an image teacher; this one makes '
            f'{tuple(teacher.shape)} vectors')
    label_dim = int(teacher.label_dim)
    try:
        dataset = ImageFolderDataset(path, use_labels=label_dim > 0)
        dataset.check_images()
        # Keep decoded images in memory when they all fit in CACHE_BYTES (MNIST, CIFAR-10).
        dataset._cache = len(dataset) * math.prod(dataset.image_shape) <= CACHE_BYTES # pylint: disable=protected-access
        has_labels = dataset.has_labels if label_dim else False
    except OSError as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = message[len(path):].lstrip(': ') if message.startswith(path) else message
        raise DataError(f'{where}: {message}') from None
    channels, height, width = teacher.shape
    c, h, w = dataset.image_shape
    if [c, h, w] != [channels, height, width]:
        raise DataError(f'{where}: images are {w}x{h} with {c} channel(s), but the teacher makes '
            f'{width}x{height} with {channels}')
    if label_dim:
        if not has_labels:
            raise DataError(f'{where}: the teacher is class-conditional ({label_dim} classes) but the dataset '
                'has no labels (dataset.json)')
        if dataset.has_onehot_labels and dataset.label_dim > label_dim:
            raise DataError(f'{where}: labels go up to class {dataset.label_dim - 1}, but the teacher has '
                f'{label_dim} classes')
        if not dataset.has_onehot_labels and dataset.label_dim != label_dim:
            raise DataError(f'{where}: label vectors of {dataset.label_dim} values, but the teacher has '
                f'{label_dim} classes')
    return RealImages(dataset, label_dim)
