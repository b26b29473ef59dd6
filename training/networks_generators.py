"""Generator wrappers with the one interface the refinement loop knows: `G(z, c) -> x`.

Each wrapper exposes `z_shape` and `out_shape` (per-sample shapes), `label_dim` and `is_vector`
(True for vector data such as 2-D mixtures, False for images). They are persistent classes,
so a snapshot pickles them in the NVlabs format together with the network they wrap. Like
every file that ends up inside pickles, this one imports only numpy, torch and
torch_utils.persistence.
"""

import inspect

import torch

from torch_utils import persistence

@persistence.persistent_class
class OneStepGenerator(torch.nn.Module):
    """A denoiser used as a one-step generator: x = D(sigma_init * z, sigma_init, c).

    This is how Diff-Instruct, SiD, DMD and their relatives initialise the student from the
    teacher. `sigma_init` is a training-time constant and is saved with the generator.
    """
    _record_init_args = False # recorded below, referring to `net` rather than copying it

    def __init__(self, net, sigma_init):
        super().__init__()
        self.net = net
        self.sigma_init = float(sigma_init)
        self.label_dim = int(net.label_dim)
        if hasattr(net, 'img_resolution'):
            self.z_shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
        else:
            self.z_shape = (int(net.dim),)
        self.out_shape = self.z_shape
        self.is_vector = len(self.z_shape) == 1
        self._init_args = ()
        self._init_kwargs = dict(net=net, sigma_init=self.sigma_init)

    def forward(self, z, c=None):
        sigma = torch.full([z.shape[0]], self.sigma_init, dtype=torch.float32, device=z.device)
        return self.net(self.sigma_init * z.to(torch.float32), sigma, c)

@persistence.persistent_class
class LatentGenerator(torch.nn.Module):
    """Any latent-variable network `net(z, c)` with attributes z_dim and dim (an MLP, say)."""
    _record_init_args = False

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.label_dim = int(getattr(net, 'label_dim', 0))
        self.z_shape = (int(net.z_dim),)
        self.out_shape = (int(net.dim),)
        self.is_vector = True
        self._init_args = ()
        self._init_kwargs = dict(net=net)

    def forward(self, z, c=None):
        return self.net(z.to(torch.float32), c)

@persistence.persistent_class
class ModuleGenerator(torch.nn.Module):
    """A user's own `torch.nn.Module` as a refinement generator (refine.api.refine).

    `net(z, c)` takes z ~ N(0, I) of shape [N, *z_shape] and c, one-hot float labels
    [N, label_dim] or None for an unconditional model, and returns samples [N, *out_shape] in
    the teacher's data space. The shapes and label count are given explicitly (refine/generators.py
    reads them from the net and checks them against the teacher), so that this wrapper never
    calls into the net to describe it. A net with `trainable_parameters()` trains only those.
    """
    _record_init_args = False

    def __init__(self, net, z_shape, out_shape, label_dim=0):
        super().__init__()
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f'net must be a torch.nn.Module, got {type(net).__name__}')
        self.net = net
        self.z_shape = tuple(int(v) for v in z_shape)
        self.out_shape = tuple(int(v) for v in out_shape)
        self.label_dim = int(label_dim)
        self.is_vector = len(self.out_shape) == 1
        self._init_args = ()
        self._init_kwargs = dict(net=net, z_shape=list(self.z_shape), out_shape=list(self.out_shape),
            label_dim=self.label_dim)

    def trainable_parameters(self):
        if hasattr(self.net, 'trainable_parameters'):
            return list(self.net.trainable_parameters())
        return list(self.net.parameters())

    def forward(self, z, c=None):
        return self.net(z, c)

@persistence.persistent_class
class StyleGANGenerator(torch.nn.Module):
    """A StyleGAN generator (`G(z, c, truncation_psi, noise_mode=...)`) as a refinement generator.

    `train_params` chooses what refinement may change: 'all' (mapping and synthesis),
    'synthesis' (the mapping network frozen) or 'mapping' (only the mapping network, so only
    the distribution of w moves). The running average `mapping.w_avg`, which StyleGAN tools
    use for truncation, is tracked in training-mode calls exactly when the mapping network is
    trained, so it stays the mean w of the generator that is saved. StyleGAN3's per-layer
    `magnitude_ema` input normalisation is never updated here: the saved generator is the
    very function whose gradients refinement followed. `noise_mode` defaults to
    'random', the distribution the GAN was trained to produce. fp16 blocks compute in fp32
    off CUDA (`force_fp32=None`), where half-precision convolutions are slow or missing.
    """
    _record_init_args = False
    TRAIN_CHOICES = ('all', 'synthesis', 'mapping')
    NOISE_CHOICES = ('random', 'const', 'none')

    def __init__(self, G, truncation_psi=1.0, noise_mode='random', train_params='all', force_fp32=None):
        super().__init__()
        if train_params not in self.TRAIN_CHOICES:
            raise ValueError(f"train_params must be one of {', '.join(self.TRAIN_CHOICES)}, got {train_params!r}")
        if noise_mode not in self.NOISE_CHOICES:
            raise ValueError(f"noise_mode must be one of {', '.join(self.NOISE_CHOICES)}, got {noise_mode!r}")
        self.G = G
        self.truncation_psi = float(truncation_psi)
        self.noise_mode = noise_mode
        self.train_params = train_params
        self.force_fp32 = force_fp32
        self.label_dim = int(G.c_dim)
        self.z_shape = (int(G.z_dim),)
        self.out_shape = (int(G.img_channels), int(G.img_resolution), int(G.img_resolution))
        self.is_vector = False
        # StyleGAN3-style code tracks w_avg only when told (`update_emas`); StyleGAN2-ADA code
        # has no such keyword and tracks it whenever the mapping network is in training mode.
        self._pass_update_emas = 'update_emas' in inspect.signature(G.mapping.forward).parameters
        self._init_args = ()
        self._init_kwargs = dict(G=G, **self.options())

    def options(self):
        return dict(truncation_psi=self.truncation_psi, noise_mode=self.noise_mode,
            train_params=self.train_params, force_fp32=self.force_fp32)

    def snapshot_items(self, G):
        """Snapshot entries (this is G_ema, `G` the trained copy): the bare StyleGAN networks,
        so StyleGAN tools read the snapshot as theirs, and the options to wrap them again."""
        return dict(G=G.G, G_ema=self.G, generator_options=self.options())

    def trainable_parameters(self):
        """The parameters refinement updates; the rest stay frozen."""
        if self.train_params == 'synthesis':
            return list(self.G.synthesis.parameters())
        if self.train_params == 'mapping':
            return list(self.G.mapping.parameters())
        return list(self.G.parameters())

    def train(self, mode=True):
        super().train(mode)
        self.G.mapping.train(mode and self.train_params != 'synthesis') # the ADA rule for w_avg
        return self

    def forward(self, z, c=None):
        if c is None:
            c = torch.zeros([z.shape[0], self.label_dim], device=z.device)
        force_fp32 = (z.device.type != 'cuda') if self.force_fp32 is None else bool(self.force_fp32)
        if self._pass_update_emas:
            # What G(z, c) computes, with update_emas for w_avg only (StyleGAN3's synthesis
            # would update its magnitude EMAs too).
            ws = self.G.mapping(z.to(torch.float32), c, truncation_psi=self.truncation_psi,
                update_emas=self.G.mapping.training)
            return self.G.synthesis(ws, noise_mode=self.noise_mode, force_fp32=force_fp32)
        return self.G(z.to(torch.float32), c, truncation_psi=self.truncation_psi,
            noise_mode=self.noise_mode, force_fp32=force_fp32)

def is_stylegan_generator(module):
    """StyleGAN2/3 generators, whichever code built them (checked by attribute)."""
    return all(hasattr(module, name) for name in ('mapping', 'synthesis', 'z_dim', 'c_dim', 'img_resolution'))
