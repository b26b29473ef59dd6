"""diffusers UNets (discrete-time VP models) as EDM denoisers D(x; sigma), and their VAEs.

A diffusers model m = unet(x_t, t) is trained on the variance-preserving (VP) process
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   t = 0 .. T-1,
with abar_t = prod_{k<=t} (1 - beta_k) from its scheduler's beta schedule (DDPM/DDIM/Euler
schedulers share it). EDM's variance-exploding (VE) view writes the same noisy sample as
    x = x_0 + sigma eps,   sigma_t = sqrt((1 - abar_t) / abar_t),   abar_t = 1 / (1 + sigma_t^2),
so x_VP = x / sqrt(1 + sigma^2) and x = x_VP sqrt(1 + sigma^2). The wrapper computes

    m = unet(c_in x, t(sigma)),   c_in = 1 / sqrt(1 + sigma^2),
    D(x; sigma) = x - sigma m                                    (prediction_type 'epsilon')
                = x / (1 + sigma^2) - sigma m / sqrt(1 + sigma^2)  ('v_prediction')
                = m                                              ('sample'),

which is exactly the scheduler's own one-step estimate x_0_hat of `step()` (without its
optional clipping, which belongs to the sampler). sigma -> t, the timestep fed to the UNet:
  * 'interp' (default): diffusers' EulerDiscreteScheduler._sigma_to_t, linear interpolation in
    log sigma between the two neighbouring sigma_i: with l = ln max(sigma, 1e-10), low = the
    largest i with ln sigma_i <= l (clipped to [0, T-2]), high = low + 1,
    w = clip((ln sigma_low - l) / (ln sigma_low - ln sigma_high), 0, 1), t = (1-w) low + w high.
    A fractional t suits the usual sinusoidal ('positional') time embedding. At sigma = sigma_i
    it gives t = i exactly.
  * 'nearest': the integer i minimising |sigma - sigma_i| (EDM's iDDPMPrecond rounding; needed
    for a 'learned' time embedding, which takes integers). `round_sigma` then snaps sigma to
    sigma_i, so EDM's samplers only visit levels the model was trained at.
sigma outside [sigma_min, sigma_max] = [sigma_0, sigma_{T-1}] is clamped to t in [0, T-1].
A variance-learning UNet (2x output channels) contributes its first half only.

Conditioning: `UNet2DModel` with `num_class_embeds` takes one-hot `class_labels` [N, label_dim]
(their argmax is passed on); `UNet2DConditionModel` gets the fixed `encoder_hidden_states`
buffer [1, L, D] (e.g. a prompt embedding), and its class labels the same way.

Pickling. The wrapper is a persistent class, so snapshots that hold copies of it (a one-step
generator or fake score initialised from the teacher) are NVlabs-format pickles. The diffusers
UNet is stored not as diffusers objects but as a tree of `ParamTree` records holding its
parameters and buffers under their own names, plus the UNet's config in the constructor
arguments: `torch_utils.safe_pickle` rebuilds it with no code from the file (diffusers builds
the UNet from the config, the tensors are loaded by name), and NVlabs-style loading does the
same in `__setstate__`. Only numpy, torch and torch_utils.persistence are imported here;
diffusers (an optional dependency) when a network is built.
"""

import copy
import inspect
import math

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------

def import_diffusers():
    try:
        import diffusers # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError("diffusers models need the diffusers package ('pip install diffusers', "
            "or this toolkit's extra: pip install .[diffusers])") from None
    return diffusers

def plain_config(config):
    """A diffusers config (FrozenDict) as plain Python data, without its private '_' keys."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(u) for u in v]
        if isinstance(v, dict):
            return {str(k): plain(u) for k, u in v.items()}
        if isinstance(v, (np.generic,)):
            return v.item()
        return v
    return {k: plain(v) for k, v in dict(config).items() if not k.startswith('_')}

def vp_alphas_cumprod(scheduler_config):
    """abar_i (float32 [T]) exactly as diffusers' DDPMScheduler computes it for this config."""
    diffusers = import_diffusers()
    accepted = set(inspect.signature(diffusers.DDPMScheduler.__init__).parameters)
    config = {k: v for k, v in scheduler_config.items() if k in accepted}
    return diffusers.DDPMScheduler(**config).alphas_cumprod.to(torch.float32).clone()

def build_unet(unet_class, unet_config):
    diffusers = import_diffusers()
    if unet_class not in ('UNet2DModel', 'UNet2DConditionModel'):
        raise ValueError(f'unsupported diffusers model {unet_class!r} (UNet2DModel or UNet2DConditionModel)')
    return getattr(diffusers, unet_class).from_config(unet_config)

#----------------------------------------------------------------------------
# A foreign module tree as plain records of tensors.

@persistence.persistent_class
class ParamTree(torch.nn.Module):
    """Holds the parameters and persistent buffers of one module of a foreign (diffusers) tree,
    under the same names, and its children as ParamTrees: pickled, it is data only."""

def to_param_tree(module):
    tree = ParamTree()
    tree.training = module.training
    for name, p in module._parameters.items():
        tree._parameters[name] = p
    for name, b in module._buffers.items():
        if name not in module._non_persistent_buffers_set:
            tree._buffers[name] = b
    for name, child in module._modules.items():
        tree._modules[name] = None if child is None else to_param_tree(child)
    return tree

def _module_from_tree(unet_class, unet_config, tree):
    with torch.random.fork_rng(devices=[]): # building must not disturb the caller's RNG
        unet = build_unet(unet_class, unet_config)
    unet.load_state_dict(tree.state_dict(), strict=True)
    modules = dict(unet.named_modules())
    for path, node in tree.named_modules():
        if path in modules:
            modules[path].training = node.training
    for name, p in unet.named_parameters():
        p.requires_grad_(tree.get_parameter(name).requires_grad)
    return unet

#----------------------------------------------------------------------------

@persistence.persistent_class
class DiffusersDenoiser(torch.nn.Module):
    """EDM denoiser D(x; sigma) of a diffusers UNet and its VP schedule (module docstring).

    `unet_class` 'UNet2DModel' or 'UNet2DConditionModel', `unet_config` and `scheduler_config`
    plain dicts; `unet` an already built (pretrained) UNet of that config, else one is built.
    `sigma_data` is the data's std in the model's space (0.5 for images in [-1, 1], 1.0 for
    scaled VAE latents); `cond_shape` [L, D] of the fixed encoder_hidden_states of a
    UNet2DConditionModel.
    """
    _record_init_args = False # recorded below, without the UNet module

    def __init__(self, unet_class, unet_config, scheduler_config, sigma_data=0.5, timestep_mode=None,
            cond_shape=None, unet=None):
        super().__init__()
        unet_config = plain_config(unet_config)
        scheduler_config = plain_config(scheduler_config)
        time_embedding = unet_config.get('time_embedding_type', 'positional')
        if time_embedding == 'fourier':
            raise ValueError("time_embedding_type 'fourier' marks a score-SDE (VE) model, which "
                'takes sigma itself; only discrete VP models are supported')
        if timestep_mode is None:
            timestep_mode = 'nearest' if time_embedding == 'learned' else 'interp'
        if timestep_mode not in ('interp', 'nearest'):
            raise ValueError(f"timestep_mode must be 'interp' or 'nearest', got {timestep_mode!r}")
        self.prediction_type = scheduler_config.get('prediction_type', 'epsilon')
        if self.prediction_type not in ('epsilon', 'v_prediction', 'sample'):
            raise ValueError(f'unsupported prediction_type {self.prediction_type!r}')
        if unet_config.get('class_embed_type') is not None:
            raise ValueError(f"class_embed_type {unet_config['class_embed_type']!r} is not supported "
                '(class labels through num_class_embeds are)')
        if unet_class == 'UNet2DConditionModel' and unet_config.get('addition_embed_type') is not None:
            raise ValueError(f"addition_embed_type {unet_config['addition_embed_type']!r} (SDXL-style "
                'added conditions) is not supported')

        size = unet_config.get('sample_size')
        size = size if isinstance(size, (list, tuple)) else [size, size]
        if size[0] is None or size[0] != size[1]:
            raise ValueError(f'the UNet must have a square sample_size, got {unet_config.get("sample_size")!r}')
        self.img_resolution = int(size[0])
        self.img_channels = int(unet_config.get('in_channels', 3))
        self.label_dim = int(unet_config.get('num_class_embeds') or 0)
        self.sigma_data = float(sigma_data)
        self.timestep_mode = timestep_mode
        self.unet_class = unet_class
        out_channels = int(unet_config.get('out_channels', self.img_channels) or self.img_channels)
        self.learned_variance = out_channels == 2 * self.img_channels
        if not self.learned_variance and out_channels != self.img_channels:
            raise ValueError(f'the UNet maps {self.img_channels} to {out_channels} channels')

        self.register_buffer('alphas_cumprod', vp_alphas_cumprod(scheduler_config))
        sigmas = self.vp_sigmas()
        self.num_train_timesteps = int(sigmas.numel())
        self.sigma_min = float(sigmas[0])
        self.sigma_max = float(sigmas[-1])
        if cond_shape is not None:
            cond_shape = [int(v) for v in cond_shape]
            self.register_buffer('encoder_hidden_states', torch.zeros([1, *cond_shape]))
        elif unet_class == 'UNet2DConditionModel':
            raise ValueError('a UNet2DConditionModel needs cond_shape [L, D] of its encoder_hidden_states')
        self.unet = build_unet(unet_class, unet_config) if unet is None else unet
        self._init_args = ()
        self._init_kwargs = dict(unet_class=unet_class, unet_config=unet_config,
            scheduler_config=scheduler_config, sigma_data=self.sigma_data, timestep_mode=timestep_mode,
            cond_shape=cond_shape)

    # --- the schedule -----------------------------------------------------------------------

    def vp_sigmas(self):
        """sigma_i = sqrt((1 - abar_i)/abar_i), float32 [T], increasing (diffusers' formula)."""
        ac = self.alphas_cumprod
        return ((1 - ac) / ac) ** 0.5

    def sigma_to_t(self, sigma):
        """The timestep for each sigma ([N] tensor): fractional ('interp') or integer ('nearest')."""
        sigmas = self.vp_sigmas().to(sigma.device)
        if self.timestep_mode == 'nearest':
            return (sigma.to(torch.float64)[:, None] - sigmas.to(torch.float64)[None]).abs().argmin(dim=1)
        log_sigmas = sigmas.to(torch.float64).log() # in float64: t(sigma_i) = i exactly
        log_sigma = sigma.to(torch.float64).clamp(min=1e-10).log()
        low = ((log_sigmas[None] <= log_sigma[:, None]).sum(dim=1) - 1).clamp(0, len(sigmas) - 2)
        high = low + 1
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
        return ((1 - w) * low + w * high).to(torch.float32)

    def t_to_sigma(self, t):
        """sigma of integer timesteps t (the VE noise level the model saw at t)."""
        return self.vp_sigmas().to(torch.as_tensor(t).device)[torch.as_tensor(t, dtype=torch.long)]

    def round_sigma(self, sigma):
        """EDM samplers' hook: the nearest trained level in 'nearest' mode, else sigma itself."""
        sigma = torch.as_tensor(sigma)
        if self.timestep_mode != 'nearest':
            return sigma
        sigmas = self.vp_sigmas().to(sigma.device)
        idx = self.sigma_to_t(sigma.reshape(-1).to(sigmas.device))
        return sigmas[idx].reshape(sigma.shape).to(sigma.dtype)

    # --- the denoiser -----------------------------------------------------------------------

    def forward(self, x, sigma, class_labels=None, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        t = self.sigma_to_t(sigma)
        s = sigma.reshape(-1, 1, 1, 1)
        c_in = 1 / (1 + s ** 2).sqrt()
        kwargs = dict(unet_kwargs)
        if self.label_dim:
            if class_labels is None:
                raise ValueError(f'the model is class-conditional ({self.label_dim} classes) and needs class_labels')
            labels = class_labels.reshape(x.shape[0] if class_labels.numel() > self.label_dim else 1, self.label_dim)
            kwargs['class_labels'] = labels.argmax(dim=1).expand(x.shape[0])
        if self.unet_class == 'UNet2DConditionModel':
            kwargs['encoder_hidden_states'] = self.encoder_hidden_states.expand(x.shape[0], -1, -1)
        dtype = self.unet.dtype
        m = self.unet((c_in * x).to(dtype), t, return_dict=False, **kwargs)[0].to(torch.float32)
        if self.learned_variance:
            m = m[:, :self.img_channels]
        if self.prediction_type == 'epsilon':
            return x - s * m
        if self.prediction_type == 'v_prediction':
            return x / (1 + s ** 2) - s * m / (1 + s ** 2).sqrt()
        return m

    # --- pickling ---------------------------------------------------------------------------

    def __getstate__(self):
        state = self.__dict__.copy()
        modules = state['_modules'].copy()
        if not isinstance(modules.get('unet'), ParamTree):
            modules['unet'] = to_param_tree(modules['unet'])
        state['_modules'] = modules
        return state

    def __setstate__(self, state):
        unet = state['_modules'].get('unet')
        if isinstance(unet, ParamTree): # loaded (NVlabs-style) or copied: build the UNet again
            kwargs = state['_init_kwargs']
            state = dict(state)
            state['_modules'] = copy.copy(state['_modules'])
            state['_modules']['unet'] = _module_from_tree(kwargs['unet_class'], kwargs['unet_config'], unet)
        super().__setstate__(state)

    def __deepcopy__(self, memo):
        # Copies the diffusers UNet as it is, instead of through the pickled form.
        cls = type(self)
        obj = cls.__new__(cls)
        memo[id(self)] = obj
        for key, value in self.__dict__.items():
            obj.__dict__[key] = copy.deepcopy(value, memo)
        return obj

#----------------------------------------------------------------------------

@persistence.persistent_class
class DiffusersVAEEncoder:
    """A diffusers AutoencoderKL with the library's latent convention, as an EDM2-style encoder.

    Images are in [-1, 1] for the VAE; diffusion latents z = (z_raw - shift_factor) * scaling_factor
    (shift 0 if None); decoding inverts that and returns uint8 pixels. `encode_pixels` gives the
    8-channel raw latents [posterior mean, std], `encode_latents` samples and scales them. The VAE
    (`vae_name`, `subfolder`: a local folder or a hub id) is loaded on first use, not pickled.
    """
    def __init__(self, vae_name, subfolder=None, scaling_factor=0.18215, shift_factor=None, batch_size=8):
        self.vae_name = vae_name
        self.subfolder = subfolder
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = None if shift_factor is None else float(shift_factor)
        self.batch_size = int(batch_size)
        self._vae = None

    def __getstate__(self):
        return dict(self.__dict__, _vae=None)

    def init(self, device):
        if self._vae is None:
            diffusers = import_diffusers()
            kwargs = dict(subfolder=self.subfolder) if self.subfolder else {}
            try:
                vae = diffusers.AutoencoderKL.from_pretrained(self.vae_name, local_files_only=True, **kwargs)
            except Exception: # pylint: disable=broad-except
                vae = diffusers.AutoencoderKL.from_pretrained(self.vae_name, **kwargs) # not cached yet
            self._vae = vae.eval().requires_grad_(False)
        self._vae.to(torch.device(device))

    def _chunks(self, fn, x):
        with torch.no_grad():
            return torch.cat([fn(chunk) for chunk in x.split(self.batch_size)])

    def encode_pixels(self, x):
        self.init(x.device)
        def encode(chunk):
            dist = self._vae.encode(chunk)['latent_dist']
            return torch.cat([dist.mean, dist.std], dim=1)
        return self._chunks(encode, x.to(torch.float32) / 127.5 - 1)

    def encode_latents(self, x):
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * std
        return (z - (self.shift_factor or 0)) * self.scaling_factor

    def encode(self, x):
        return self.encode_latents(self.encode_pixels(x))

    def decode(self, x):
        self.init(x.device)
        z = x.to(torch.float32) / self.scaling_factor + (self.shift_factor or 0)
        images = self._chunks(lambda chunk: self._vae.decode(chunk)['sample'], z)
        return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------

def euler_sampler(net, noise, sigmas, class_labels=None):
    """Deterministic first-order sampler over the given noise levels (then 0): DDIM with eta=0.

    In the VE view DDIM's update is x_next = D + (sigma_next / sigma) (x - D). `noise` is unit
    Gaussian; the state starts at noise * sigma_0 (a VP sampler starting from x_T = noise is the
    same state, times sqrt(1 + sigma_0^2) instead: pass `vp_start=True` to euler_sampler_vp).
    """
    sigmas = [float(s) for s in sigmas]
    x = noise.to(torch.float64) * sigmas[0]
    return _euler_steps(net, x, sigmas, class_labels)

def euler_sampler_vp(net, x_T, sigmas, class_labels=None):
    """The same, from a VP sample x_T at sigmas[0] (what diffusers' pipelines start from)."""
    sigmas = [float(s) for s in sigmas]
    x = x_T.to(torch.float64) * math.sqrt(1 + sigmas[0] ** 2)
    return _euler_steps(net, x, sigmas, class_labels)

def _euler_steps(net, x, sigmas, class_labels):
    for sigma, sigma_next in zip(sigmas, sigmas[1:] + [0.0]):
        denoised = net(x, torch.tensor(sigma, dtype=torch.float64), class_labels).to(torch.float64)
        x = denoised + (sigma_next / sigma) * (x - denoised)
    return x

#----------------------------------------------------------------------------
