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

From Python (refine/api.py), any `torch.nn.Module` `net(z, c)` with `z_shape` (or `z_dim`) and
`label_dim`, wrapped as `ModuleGenerator` after `wrap_module` has checked it against the teacher;
such a run's options.json names it `python:MODULE.CLASS`, which only Python can resume.
"""

import copy
import io
import pickle

import torch

from torch_utils import persistence, safe_pickle
from training import networks_generators, networks_mlp

class SetupError(ValueError):
    """A user's choice of generator, teacher or options that cannot work; one line."""

# What a StyleGAN snapshot carries besides its generators, carried into the refined pickle so
# that it is again a complete StyleGAN snapshot.
STYLEGAN_COMPANIONS = ('D', 'augment_pipe', 'training_set_kwargs')

def build_generator(spec, teacher, sigma_init=None, allow_code=False, mlp_kwargs=None, stylegan_kwargs=None,
        module=None):
    """Return `(G, companions)`: the generator and, for a StyleGAN pickle, the items of that
    pickle the refined snapshot must carry on (D, augment_pipe, training_set_kwargs); for a
    latent teacher (EDM2 img512, a diffusers pipeline with a VAE) also its `encoder`, which
    decodes the generator's latents to images (generate.py, fid.py). `module`: a user's
    `torch.nn.Module` (refine/api.py), checked by `wrap_module`; `spec` is then its `python:` name."""
    if module is not None:
        G, companions = wrap_module(module, teacher), {}
    elif isinstance(spec, str) and spec.startswith(PYTHON_PREFIX):
        raise SetupError(f'--gen {spec}: this run trains a Python module; resume it from Python: '
            'refine.api.refine(generator=<a new module of that class>, resume=RUN)')
    else:
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
        kwargs = dict(mlp_kwargs or {})
        slots = kwargs['slots'] = auto_slots(teacher) if kwargs.get('slots') == 'auto' else int(kwargs.get('slots') or 0)
        if slots < 0:
            raise SetupError(f'--mlp-slots must be 0 or more, got {slots}')
        # With slots one more latent coordinate picks the slot; the rest stay one per data dimension.
        net = networks_mlp.MLPGenerator(z_dim=dim + (1 if slots else 0), dim=dim, label_dim=teacher.label_dim,
            out_scale=teacher.sigma_data, **kwargs)
        return networks_generators.LatentGenerator(net), {}
    return _generator_from_pickle(spec, sigma_init, allow_code, stylegan_kwargs or {})

def auto_slots(teacher):
    """The MLP generator's default slot count: 8 per mixture component, at least 64 (fewer slots
    converge faster) and at most 512 (more resolve small weights better). docs/gmm-benchmark.md."""
    components = len(getattr(teacher, 'weights', ()))
    return int(min(512, max(64, 8 * components)))

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

PYTHON_PREFIX = 'python:'

def python_spec(module):
    """'python:MODULE.CLASS', what options.json records as the --gen of a user's module."""
    cls = type(module)
    return f'{PYTHON_PREFIX}{cls.__module__}.{cls.__qualname__}'

class _Discard(io.RawIOBase):
    def writable(self):
        return True
    def write(self, b):
        return len(b)

def wrap_module(module, teacher):
    """A user's `torch.nn.Module` as a `ModuleGenerator` for `teacher`, or a one-line SetupError.

    The contract (docs/generators.md): `module(z, c)` maps z ~ N(0, I) [N, *z_shape] and one-hot
    labels c [N, label_dim] (None when label_dim is 0) to samples [N, *teacher.shape] in the
    teacher's data space; it has `z_shape` (or `z_dim`), and `label_dim` if the teacher is
    class-conditional; an `out_shape`, if it has one, must be the teacher's shape. Its snapshots
    pickle it: a persistent class (torch_utils.persistence) travels with its source, another class
    by name (it must be importable where the snapshot is loaded, so not one of `__main__`).
    The module is deep-copied: the caller's object is left as it was.
    """
    if not isinstance(module, torch.nn.Module):
        raise SetupError(f'generator must be a torch.nn.Module, got {type(module).__name__}')
    name = type(module).__name__
    z_shape = getattr(module, 'z_shape', None)
    if z_shape is None and getattr(module, 'z_dim', None) is not None:
        z_shape = (module.z_dim,)
    try:
        z_shape = tuple(int(v) for v in z_shape)
        assert z_shape and min(z_shape) > 0
    except (TypeError, ValueError, AssertionError):
        raise SetupError(f'generator {name} needs z_shape (a tuple of positive ints, the shape of one '
            f'latent) or z_dim (an int), got {z_shape!r}') from None
    label_dim = getattr(module, 'label_dim', 0) or 0
    if not isinstance(label_dim, int) or label_dim < 0:
        raise SetupError(f'generator {name}: label_dim must be a non-negative int, got {label_dim!r}')
    if label_dim != int(teacher.label_dim):
        raise SetupError(f'generator {name} has label_dim {label_dim}, the teacher {teacher.label_dim} classes')
    shape = tuple(int(v) for v in teacher.shape)
    declared = getattr(module, 'out_shape', None)
    if declared is not None and tuple(declared) != shape:
        raise SetupError(f'generator {name} declares out_shape {tuple(declared)}, the teacher expects {shape}')
    for sub in module.modules():
        if type(sub).__module__ == '__main__' and not persistence.is_persistent(sub):
            raise SetupError(f'generator {name}: class {type(sub).__name__} is defined in __main__, so '
                'snapshots could not be loaded elsewhere; move it to a module, or decorate it with '
                '@torch_utils.persistence.persistent_class')
    try:
        net = copy.deepcopy(module)
    except Exception as e: # pylint: disable=broad-exception-caught
        raise SetupError(f'generator {name} cannot be copied: {_first_line(e)}') from None
    # One forward on a batch of 2, in eval mode, without touching any random stream.
    params = list(net.parameters()) + list(net.buffers())
    device = params[0].device if params else torch.device('cpu')
    training = net.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            z = torch.randn([2, *z_shape], device=device)
            c = torch.eye(label_dim, device=device)[[0, 1 % label_dim]] if label_dim else None
            x = net.eval()(z, c)
    except Exception as e: # pylint: disable=broad-exception-caught
        raise SetupError(f'generator {name}(z, c) failed on z of shape {(2, *z_shape)}: {_first_line(e)}') from None
    finally:
        net.train(training)
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise SetupError(f'generator {name}(z, c) must return a float tensor, got {type(x).__name__}'
            + (f' of {x.dtype}' if isinstance(x, torch.Tensor) else ''))
    if tuple(x.shape) != (2, *shape):
        raise SetupError(f'generator {name}(z, c) makes samples of shape {tuple(x.shape[1:])}, '
            f'the teacher expects {shape}')
    try: # snapshots pickle it: find out now, not at the first snapshot
        G = networks_generators.ModuleGenerator(net, z_shape=z_shape, out_shape=shape, label_dim=label_dim)
        pickle.Pickler(_Discard()).dump(G)
    except Exception as e: # pylint: disable=broad-exception-caught
        raise SetupError(f'generator {name} cannot be pickled into snapshots: {_first_line(e)}') from None
    return G

def _first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0]

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

