"""Turn a network pickle into a sampler: the library side of generate.py.

`load_for_generation` recognises three kinds of pickle:
  * an EDM teacher (`ema` is an EDM preconditioner): the EDM Heun sampler;
  * a one-step generator snapshot of our refine loop (`G_ema`, a `G(z, c)` module): one call;
  * a StyleGAN2/3 pickle (`G_ema` with mapping and synthesis), ours or NVlabs': one call of
    `G(z, c)` at truncation 1 and random noise unless told otherwise;
  * a SiD / Diff-Instruct one-step pickle (`ema`, used at a noise level `sigma_init`): one call
    of `ema(sigma_init * z, sigma_init, c)`. A Diff-Instruct pickle (it has `Sg`, the fake
    score) is read this way at sigma_init 1; a bare `ema` pickle only when `sigma_init` is
    given, because nothing in the file tells a SiD generator apart from a teacher.
Every sample draws its latents (and random label) from a generator seeded with its own seed,
so a seed gives the same output whatever batch or process it lands in.
"""

import torch

import dnnlib
from refine import teachers_edm2
from torch_utils.rng import StackedRandomGenerator
from training.sampler import edm_sampler
from torch_utils import safe_pickle
from training import networks_generators

DIFF_INSTRUCT_SIGMA_INIT = 1.0 # the generator's input noise level in Diff-Instruct's own code

class GenerationError(ValueError):
    """A one-line problem a user can fix; `param` names the option at fault (without --)."""
    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param

# What an EDM-style denoiser has (checked by attribute, since pickles loaded with their own
# code bring their own classes).
_DENOISER_ATTRS = ('round_sigma', 'sigma_min', 'sigma_max', 'img_resolution', 'img_channels',
    'label_dim')

def _is_edm_denoiser(module):
    return all(hasattr(module, name) for name in _DENOISER_ATTRS)

def check_class_idx(class_idx, label_dim):
    """Refuse a class index that the network cannot take."""
    if class_idx is None:
        return
    if not label_dim:
        raise GenerationError('the network is unconditional and takes no class', param='class')
    if not 0 <= class_idx < label_dim:
        raise GenerationError(f'{class_idx} is out of range: the network has {label_dim} classes '
            f'(0 to {label_dim - 1})', param='class')

def _labels(rnd, label_dim, class_idx, batch_size, device):
    """One-hot labels, random per seed; `class_idx` then overrides them all.

    The random draw happens even with `class_idx`, as in EDM's generate.py, so that any later
    draw from the same generators (churn noise) matches EDM's for the same seed.
    """
    if not label_dim:
        return None
    labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[batch_size])]
    if class_idx is not None:
        labels[:] = 0
        labels[:, class_idx] = 1
    return labels

#----------------------------------------------------------------------------
# The three kinds of sampler.

def _teacher_sampler(net, device, sampler_kwargs):
    shape = [net.img_channels, net.img_resolution, net.img_resolution]

    @torch.no_grad()
    def sample(seeds, class_idx=None):
        check_class_idx(class_idx, net.label_dim)
        rnd = StackedRandomGenerator(device, seeds)
        latents = rnd.randn([len(seeds), *shape])
        labels = _labels(rnd, net.label_dim, class_idx, len(seeds), device)
        return edm_sampler(net, latents, labels, randn_like=rnd.randn_like, **sampler_kwargs)
    return sample

def _one_step_edm_sampler(net, device, sigma_init):
    shape = [net.img_channels, net.img_resolution, net.img_resolution]

    @torch.no_grad()
    def sample(seeds, class_idx=None):
        check_class_idx(class_idx, net.label_dim)
        rnd = StackedRandomGenerator(device, seeds)
        z = rnd.randn([len(seeds), *shape])
        labels = _labels(rnd, net.label_dim, class_idx, len(seeds), device)
        sigma = torch.full([len(seeds), 1, 1, 1], sigma_init, dtype=torch.float64, device=device)
        return net(sigma_init * z.to(torch.float64), sigma, labels)
    return sample

def _generator_z_shape(G, source):
    if hasattr(G, 'z_shape'):
        return [int(v) for v in G.z_shape]
    if hasattr(G, 'z_dim'): # StyleGAN-style generators
        return [int(G.z_dim)]
    raise GenerationError(f"{source}: its 'G_ema' has neither z_shape nor z_dim", param='network')

def _generator_label_dim(G):
    return int(getattr(G, 'label_dim', getattr(G, 'c_dim', 0)) or 0)

def _one_step_generator_sampler(G, device, z_shape, label_dim):
    @torch.no_grad()
    def sample(seeds, class_idx=None):
        check_class_idx(class_idx, label_dim)
        rnd = StackedRandomGenerator(device, seeds)
        z = rnd.randn([len(seeds), *z_shape])
        labels = _labels(rnd, label_dim, class_idx, len(seeds), device)
        return G(z, labels)
    return sample

#----------------------------------------------------------------------------

def _load(path, allow_code):
    try:
        return safe_pickle.load_network_pkl(path, allow_code=allow_code)
    except safe_pickle.UnsafePickleError as e:
        raise GenerationError(f'{path}: {e}', param='network') from None
    except FileNotFoundError:
        raise GenerationError(f'{path}: no such file', param='network') from None
    except OSError as e: # includes dnnlib.util.DownloadError
        raise GenerationError(f'cannot read {path}: {e}', param='network') from None
    except Exception as e: # pylint: disable=broad-except
        # A corrupt or foreign file can fail in many ways inside pickle; say which file it was.
        raise GenerationError(f'{path} is not a loadable network pickle '
            f'({type(e).__name__}: {e})', param='network') from None

def _module(data, key, path):
    try:
        return safe_pickle.require_module(data, key, source=path)
    except safe_pickle.UnsafePickleError as e:
        raise GenerationError(str(e), param='network') from None

def _wrap_stylegan(G, data, generator_kwargs, path):
    """A StyleGAN G_ema as G(z, c): options saved by a refinement first, then the caller's."""
    kwargs = {k: v for k, v in (data.get('generator_options') or {}).items() if k != 'train_params'}
    kwargs.update({k: v for k, v in (generator_kwargs or {}).items() if v is not None})
    try:
        return networks_generators.StyleGANGenerator(G, **kwargs)
    except (ValueError, TypeError) as e:
        raise GenerationError(f'{path}: {e}', param='network') from None

def load_for_generation(path, allow_code=False, sigma_init=None, device='cpu', sampler_kwargs=None,
        generator_kwargs=None, raw=False):
    """Load `path` and return `(sample, meta)`.

    `sample(seeds, class_idx=None)` returns the outputs for a list of seeds: float images
    NCHW in [-1, 1], or vectors [N, d]. `meta` is an EasyDict: kind ('edm-teacher',
    'one-step-edm' or 'generator'), label_dim, is_vector, nfe (network calls per sample) and
    network (the module). `sampler_kwargs` go to `edm_sampler` (teachers only);
    `generator_kwargs` (truncation_psi, noise_mode) to StyleGAN generators, whose noise is
    drawn from torch's global generator (seed it for repeatable 'random' noise). `raw`: a
    refinement snapshot's trained generator `G` instead of its EMA `G_ema`.
    """
    device = torch.device(device)
    if sigma_init is not None and not sigma_init > 0:
        raise GenerationError(f'must be a positive noise level, got {sigma_init}', param='sigma-init')
    data = _load(path, allow_code)
    if not isinstance(data, dict):
        raise GenerationError(f'{path} holds a {type(data).__name__}, not a dict of networks',
            param='network')

    if raw and (sigma_init is not None or 'G' not in data or 'G_ema' not in data):
        raise GenerationError(f"{path} has no raw generator 'G' beside a 'G_ema' (refine.py snapshots have both)"
            if sigma_init is None else 'reads the G of a refinement snapshot, not an EDM pickle at --sigma-init', param='raw')
    if sigma_init is None and 'G_ema' in data:
        G = _module(data, 'G' if raw else 'G_ema', path)
        if networks_generators.is_stylegan_generator(G):
            G = _wrap_stylegan(G, data, generator_kwargs, path)
        G = G.eval().requires_grad_(False).to(device)
        z_shape, label_dim = _generator_z_shape(G, path), _generator_label_dim(G)
        sample = teachers_edm2.decoded_sampler(_one_step_generator_sampler(G, device, z_shape, label_dim), data, device)
        return sample, dnnlib.EasyDict(kind='generator', label_dim=label_dim,
            is_vector=bool(getattr(G, 'is_vector', False)), nfe=1, network=G)

    if 'ema' not in data:
        keys = ', '.join(map(str, data)) or 'nothing'
        if sigma_init is not None:
            raise GenerationError(f"applies to EDM-style pickles with an 'ema' network; {path} "
                f'has: {keys}', param='sigma-init')
        raise GenerationError(f"{path} has neither 'G_ema' (a generator snapshot) nor 'ema' "
            f'(an EDM network); it has: {keys}', param='network')
    # Diff-Instruct's one-step pickles are dict(ema=G, Sg=fake score): no teacher has an Sg.
    diff_instruct = sigma_init is None and 'Sg' in data
    if diff_instruct:
        sigma_init = DIFF_INSTRUCT_SIGMA_INIT
    net = _module(data, 'ema', path)
    if teachers_edm2.is_edm2_network(net): # EDM2 snapshot: EDM's sampler, latents decoded
        net = teachers_edm2.EDM2SamplingNet(net)
    if not _is_edm_denoiser(net):
        raise GenerationError(f"{path}: 'ema' is a {type(net).__name__}, not an EDM "
            'preconditioner (EDMPrecond, VPPrecond, VEPrecond or iDDPMPrecond)', param='network')
    net = net.eval().requires_grad_(False).to(device)
    meta = dnnlib.EasyDict(label_dim=int(net.label_dim), is_vector=False, network=net)
    if sigma_init is not None:
        meta.update(kind='one-step-edm', nfe=1)
        if diff_instruct:
            meta.note = (f"{path} is a Diff-Instruct one-step pickle (it has 'Sg'): one call at noise "
                f'level {DIFF_INSTRUCT_SIGMA_INIT:g} (--sigma-init changes it)')
        return teachers_edm2.decoded_sampler(_one_step_edm_sampler(net, device, float(sigma_init)), data, device), meta
    sampler_kwargs = dict(sampler_kwargs or {})
    meta.update(kind='edm-teacher', nfe=2 * sampler_kwargs.get('num_steps', 18) - 1,
        note=f"{path}: sampling its 'ema' as an EDM teacher; if it is a SiD or Diff-Instruct one-step "
            'generator, pass --sigma-init (SiD 2.5, Diff-Instruct 1.0)')
    return teachers_edm2.decoded_sampler(_teacher_sampler(net, device, sampler_kwargs), data, device), meta
