"""Build the generator and the fake score that a refinement run starts from.

`--gen` accepts
  * `teacher`: a one-step generator initialised from the teacher, x = D(σ_init z, σ_init, c);
  * `mlp`: an MLP latent-variable generator for vector data (Gaussian-mixture teachers);
  * a pickle path or URL: one of our snapshots (its `G_ema`); a StyleGAN2-ADA or StyleGAN3
    (-t, -r) pickle (its `G_ema`, rebuilt as our networks without running the pickle's code,
    wrapped as `StyleGANGenerator` with truncation, noise mode and the parameters to train;
    its D, augment_pipe and training_set_kwargs are carried into the snapshots); or a
    Diff-Instruct / SiD / EDM pickle whose `ema` network becomes a one-step generator at
    `--sigma-init`.
"""

import copy

from torch_utils import safe_pickle
from training import networks_generators, networks_mlp

class SetupError(ValueError):
    """A user's choice of generator, teacher or options that cannot work; one line."""

# What a StyleGAN snapshot carries besides its generators, carried into the refined pickle so
# that it is again a complete StyleGAN snapshot.
STYLEGAN_COMPANIONS = ('D', 'augment_pipe', 'training_set_kwargs')

def build_generator(spec, teacher, sigma_init=None, allow_code=False, mlp_kwargs=None, stylegan_kwargs=None):
    """Return `(G, companions)`: the generator and, for a StyleGAN pickle, the items of that
    pickle the refined snapshot must carry on (D, augment_pipe, training_set_kwargs); for a
    latent teacher (EDM2 img512, a diffusers pipeline with a VAE) also its `encoder`, which
    decodes the generator's latents to images (generate.py, fid.py)."""
    G, companions = _build_generator(spec, teacher, sigma_init, allow_code, mlp_kwargs, stylegan_kwargs)
    if getattr(teacher, 'encoder', None) is not None:
        companions = dict(companions, encoder=teacher.encoder)
    return G, companions

def _build_generator(spec, teacher, sigma_init, allow_code, mlp_kwargs, stylegan_kwargs):
    if spec == 'teacher':
        if not hasattr(teacher, 'net'):
            raise SetupError("--gen teacher needs a network teacher; for a Gaussian-mixture teacher use --gen mlp")
        return networks_generators.OneStepGenerator(copy.deepcopy(teacher.net), _need_sigma_init(sigma_init)), {}
    if spec == 'mlp':
        if len(teacher.shape) != 1:
            raise SetupError(f'--gen mlp makes vectors, but the teacher makes {tuple(teacher.shape)} images')
        dim = teacher.shape[0]
        net = networks_mlp.MLPGenerator(z_dim=dim, dim=dim, label_dim=teacher.label_dim,
            out_scale=teacher.sigma_data, **(mlp_kwargs or {}))
        return networks_generators.LatentGenerator(net), {}
    return _generator_from_pickle(spec, sigma_init, allow_code, stylegan_kwargs or {})

def _need_sigma_init(sigma_init):
    if sigma_init is None or not sigma_init > 0:
        raise SetupError('--sigma-init must be a positive noise level for a one-step generator')
    return float(sigma_init)

def _generator_from_pickle(path, sigma_init, allow_code, stylegan_kwargs):
    try:
        data = safe_pickle.load_network_pkl(path, allow_code=allow_code)
    except (OSError, safe_pickle.UnsafePickleError) as e:
        raise SetupError(f'--gen {path}: {e}') from None
    if isinstance(data, dict) and 'G_ema' in data:
        G = copy.deepcopy(safe_pickle.require_module(data, 'G_ema', source=path))
        if networks_generators.is_stylegan_generator(G):
            # Options a previous refinement saved are the defaults; explicit ones win.
            kwargs = dict(data.get('generator_options') or {})
            kwargs.update({k: v for k, v in stylegan_kwargs.items() if v is not None})
            try:
                wrapped = networks_generators.StyleGANGenerator(G, **kwargs)
            except (ValueError, TypeError) as e:
                raise SetupError(f'--gen {path}: {e}') from None
            return wrapped, {key: data[key] for key in STYLEGAN_COMPANIONS if key in data}
        if not hasattr(G, 'z_shape'):
            raise SetupError(f"--gen {path}: its 'G_ema' ({type(G).__name__}) is neither one of our "
                'generators nor a StyleGAN generator')
        return G, {}
    if isinstance(data, dict) and 'ema' in data:
        net = safe_pickle.require_module(data, 'ema', source=path)
        if sigma_init is None and isinstance(data.get('sigma_init'), (int, float)):
            sigma_init = data['sigma_init']
        return networks_generators.OneStepGenerator(copy.deepcopy(net), _need_sigma_init(sigma_init)), {}
    raise SetupError(f"--gen {path}: found neither 'G_ema' nor 'ema' in the pickle")

def build_fake_score(teacher, mlp_kwargs=None):
    """D_psi: a trainable copy of the teacher network, or an MLP denoiser for exact teachers."""
    if hasattr(teacher, 'net'):
        fake = copy.deepcopy(teacher.net)
    else:
        fake = networks_mlp.MLPDenoiser(dim=teacher.shape[0], label_dim=teacher.label_dim,
            sigma_data=teacher.sigma_data, **(mlp_kwargs or {}))
    return fake.train().requires_grad_(True)

def check_compatible(G, teacher):
    """Refuse a generator whose samples the teacher cannot score, before any work."""
    problems = []
    if tuple(G.out_shape) != tuple(teacher.shape):
        problems.append(f'the generator makes {tuple(G.out_shape)} samples, the teacher expects {tuple(teacher.shape)}')
    if int(G.label_dim) != int(teacher.label_dim):
        problems.append(f'the generator has {G.label_dim} class labels, the teacher {teacher.label_dim}')
    if problems:
        raise SetupError('incompatible --gen and --teacher: ' + '; '.join(problems))

def count_parameters(module, trainable_only=False):
    """All parameters, or those refinement trains (a generator's `trainable_parameters()`)."""
    params = module.trainable_parameters() if trainable_only and hasattr(module, 'trainable_parameters') else module.parameters()
    return sum(p.numel() for p in params)

