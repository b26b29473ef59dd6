"""Teachers: the denoisers every divergence distils from.

A teacher is `D(x, sigma, class_labels=None) -> denoised x` in EDM's VE convention
(x_t = x + sigma * eps), with the attributes `sigma_min`, `sigma_max`, `sigma_data`,
`label_dim` and `shape` (per-sample shape). The score is (D - x) / sigma^2.

* `EDMTeacher` wraps a network from a pickle (any EDM preconditioner or an `MLPDenoiser`).
* `GMMTeacher` is the exact denoiser of a Gaussian mixture, for benchmarks with a known answer.

Gaussian-mixture presets (`GMM_PRESETS`, `make_gmm`, `load_teacher('gmm:NAME')`):
  ring8    8 modes on a circle of radius 2, isotropic std 0.1 (neighbours ~15 std apart).
  grid25   5x5 grid at {-2,-1,0,1,2}^2 (spacing 1), isotropic std 0.05 (20 std apart).
  mog40    40 modes, means uniform in [-40,40]^2, isotropic std softplus(1) ~ 1.3133: the
           FAB-style MoG40 of VarDiU; means are `(torch.rand(40, 2) - 0.5) * 80` drawn right
           after `torch.manual_seed(0)`, as FAB's GMM(seed=0) does.
  gauss64  8 modes in 64-D, means of norm 5 in random directions, full covariances
           Q diag(lambda) Q^T with lambda log-uniform in [0.25, 2.5] (condition number <= 10),
           weights uniform in [1, 2] normalised; numpy RandomState(0).
Uniform weights except gauss64.

A user's mixture: `load_teacher('gmm:FILE.json')` (`--teacher gmm:FILE.json`) with the JSON object
  {"means": [[...], ...],                        K x d, any d >= 1
   "covariances": [[[...]]]   or   "stds": ...,  K x d x d; or a scalar, [K] or [K, d] stds
   "weights": [...]}                             K positive numbers, normalised (default uniform)
("covs" and "std" are accepted spellings). `save_gmm_json` writes one; `read_gmm_json` checks
one and says, in one line naming the file, what is wrong. A GMMTeacher is a persistent class,
so a pickle holding one (a run's snapshot carries its teacher) loads back as the exact mixture,
never as a network.
"""

import json
import math
import os

import numpy as np
import torch

from torch_utils import persistence, safe_pickle

#----------------------------------------------------------------------------

def sigma_like(sigma, x):
    """sigma (number, [N], [N,1], ...) as a tensor that broadcasts against x [N, ...]."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.numel() == 1:
        return sigma.reshape([1] * x.ndim)
    if sigma.numel() != x.shape[0]:
        raise ValueError(f'sigma has {sigma.numel()} elements for a batch of {x.shape[0]}')
    return sigma.reshape([-1] + [1] * (x.ndim - 1))

class Teacher(torch.nn.Module):
    """The interface divergences use. Subclasses implement forward() and set the attributes."""
    sigma_min = 0.002
    sigma_max = 80.0
    sigma_data = 0.5
    label_dim = 0
    shape = ()

    def forward(self, x, sigma, class_labels=None):
        raise NotImplementedError

    def score(self, x, sigma, class_labels=None):
        """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
        return (self(x, sigma, class_labels) - x) / sigma_like(sigma, x) ** 2

#----------------------------------------------------------------------------

class EDMTeacher(Teacher):
    """A pretrained denoiser network D(x, sigma, class_labels) as a teacher.

    The network is frozen (no parameter gradients) and put in eval mode; gradients with respect
    to x still flow, for divergences that backpropagate through the teacher. Call `.train()`
    explicitly for methods that keep the teacher's dropout active.
    """
    def __init__(self, net):
        super().__init__()
        if hasattr(net, 'img_resolution'):
            self.shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
        elif hasattr(net, 'dim'):
            self.shape = (int(net.dim),)
        else:
            raise ValueError(f'{type(net).__name__} is not a denoiser network (it has neither '
                'img_resolution nor dim)')
        self.net = net.eval().requires_grad_(False)
        self.label_dim = int(getattr(net, 'label_dim', 0) or 0)
        self.sigma_data = float(getattr(net, 'sigma_data', 0.5))
        # EDMPrecond claims [0, inf); use EDM's sampling range, scaled with the data.
        scale = self.sigma_data / 0.5
        sigma_min = float(getattr(net, 'sigma_min', 0) or 0)
        sigma_max = float(getattr(net, 'sigma_max', math.inf))
        self.sigma_min = sigma_min if sigma_min > 0 else 0.002 * scale
        self.sigma_max = sigma_max if math.isfinite(sigma_max) else 80.0 * scale

    def forward(self, x, sigma, class_labels=None):
        # The EDM networks want sigma as a tensor with 1 or N elements.
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
        return self.net(x, sigma, class_labels).to(x.dtype)

#----------------------------------------------------------------------------

@persistence.persistent_class
class GMMTeacher(Teacher):
    """Exact denoiser of p_0 = sum_k pi_k N(mu_k, Sigma_k).

    Noised: p_sigma = sum_k pi_k N(mu_k, Sigma_k + sigma^2 I), so
    D(x, sigma) = x - sigma^2 sum_k gamma_k(x) (Sigma_k + sigma^2 I)^-1 (x - mu_k).
    Each Sigma_k is eigendecomposed once (U_k diag(lambda_k) U_k^T); Sigma_k + sigma^2 I then
    shares U_k, so per-sample sigmas cost no new factorisation. Computed in float64,
    responsibilities by softmax of log-densities.
    """
    def __init__(self, means, covs=None, weights=None, std=None):
        super().__init__()
        f64 = torch.float64
        means = torch.as_tensor(means, dtype=f64)
        if means.ndim != 2:
            raise ValueError(f'means must be [K, d], got shape {tuple(means.shape)}')
        K, d = means.shape
        if (covs is None) == (std is None):
            raise ValueError('give exactly one of covs ([K, d, d]) and std (scalar, [K] or [K, d])')
        if covs is not None:
            covs = torch.as_tensor(covs, dtype=f64)
            if covs.shape != (K, d, d):
                raise ValueError(f'covs must be [{K}, {d}, {d}], got {tuple(covs.shape)}')
            covs = 0.5 * (covs + covs.transpose(1, 2))
        else:
            std = torch.as_tensor(std, dtype=f64)
            if std.ndim == 0 or std.shape == (1,):
                std = std.reshape(1, 1).expand(K, d)
            elif std.shape == (K,):
                std = std[:, None].expand(K, d)
            elif std.shape != (K, d):
                raise ValueError(f'std must be a scalar, [{K}] or [{K}, {d}], got {tuple(std.shape)}')
            covs = torch.diag_embed(std ** 2)
        weights = torch.ones(K, dtype=f64) if weights is None else torch.as_tensor(weights, dtype=f64)
        if weights.shape != (K,) or not bool((weights > 0).all()):
            raise ValueError(f'weights must be [{K}] and positive')
        eigvals, eigvecs = torch.linalg.eigh(covs)
        if not bool((eigvals > 0).all()):
            raise ValueError('covariances must be positive definite')

        self.register_buffer('means', means.clone())
        self.register_buffer('covs', covs.clone())
        self.register_buffer('weights', weights / weights.sum())
        self.register_buffer('eigvals', eigvals)
        self.register_buffer('eigvecs', eigvecs)
        self.shape = (d,)
        self.label_dim = 0
        _, total_cov = self.moments()
        self.sigma_data = float(total_cov.diagonal().mean().sqrt())
        self.sigma_min = 0.002 * self.sigma_data / 0.5
        self.sigma_max = 80.0 * self.sigma_data / 0.5

    @property
    def num_components(self):
        return self.means.shape[0]

    def to_dict(self):
        """{'means', 'covariances', 'weights'} as nested lists: what `save_gmm_json` writes."""
        return dict(means=self.means.tolist(), covariances=self.covs.tolist(), weights=self.weights.tolist())

    @property
    def dim(self):
        return self.means.shape[1]

    def moments(self):
        """Mean [d] and covariance [d, d] of p_0 (float64)."""
        pi, mu = self.weights, self.means
        mean = pi @ mu
        second = torch.einsum('k,kij->ij', pi, self.covs + mu[:, :, None] * mu[:, None, :])
        return mean, second - mean[:, None] * mean[None, :]

    # Shared pieces: x [N, d] in float64, y = U_k^T (x - mu_k) [N, K, d], v = lambda_k + sigma^2.
    def _prepare(self, x, sigma):
        x64 = x.to(torch.float64).reshape(-1, self.dim)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x64.device).reshape(-1)
        if s.numel() not in (1, x64.shape[0]):
            raise ValueError(f'sigma has {s.numel()} elements for a batch of {x64.shape[0]}')
        y = torch.einsum('nkd,kde->nke', x64[:, None, :] - self.means.to(x64)[None], self.eigvecs.to(x64))
        v = self.eigvals.to(x64)[None] + s.square()[:, None, None]
        return x64, s, y, v

    def _log_joint(self, y, v):
        quad = (y.square() / v).sum(-1)
        logdet = v.log().sum(-1)
        return self.weights.to(y).log() - 0.5 * (quad + logdet + self.dim * math.log(2 * math.pi))

    def log_joint(self, x, sigma=0.0):
        """log pi_k + log N(x; mu_k, Sigma_k + sigma^2 I), [N, K] float64."""
        _, _, y, v = self._prepare(x, sigma)
        return self._log_joint(y, v)

    def responsibilities(self, x, sigma=0.0):
        """Posterior component probabilities gamma_k(x) under p_sigma, [N, K] float64."""
        return self.log_joint(x, sigma).softmax(dim=1)

    def mahalanobis_sq(self, x, sigma=0.0):
        """(x - mu_k)^T (Sigma_k + sigma^2 I)^-1 (x - mu_k), [N, K] float64."""
        _, _, y, v = self._prepare(x, sigma)
        return (y.square() / v).sum(-1)

    def log_prob(self, x, sigma=0.0):
        """log p_sigma(x), [N] in x's dtype."""
        return self.log_joint(x, sigma).logsumexp(dim=1).to(x.dtype)

    def _weighted_back(self, gamma, t):
        # sum_k gamma_k U_k t_k: back from the eigenbases, [N, d].
        return torch.einsum('nk,nke,kde->nd', gamma, t, self.eigvecs.to(t))

    def forward(self, x, sigma, class_labels=None):
        x64, s, y, v = self._prepare(x, sigma)
        gamma = self._log_joint(y, v).softmax(dim=1)
        # sigma^2 (Sigma_k + sigma^2 I)^-1 (x - mu_k), written so huge sigma does not overflow.
        shrink = (s.square()[:, None, None] / v) * y
        return (x64 - self._weighted_back(gamma, shrink)).to(x.dtype).reshape(x.shape)

    def score(self, x, sigma, class_labels=None):
        """Exact score, computed directly (no (D - x) / sigma^2 cancellation at small sigma)."""
        _, _, y, v = self._prepare(x, sigma)
        gamma = self._log_joint(y, v).softmax(dim=1)
        return (-self._weighted_back(gamma, y / v)).to(x.dtype).reshape(x.shape)

    @torch.no_grad()
    def sample(self, n, generator=None, return_components=False):
        """n exact samples of p_0 as [n, d] float32 (and their component ids if asked)."""
        device = generator.device if generator is not None else self.means.device
        comp = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        eps = torch.randn([n, self.dim], dtype=torch.float64, device=device, generator=generator)
        x = torch.empty_like(eps)
        for k in range(self.num_components): # grouped by component: no [n, d, d] gather
            idx = (comp == k).nonzero().flatten()
            scaled = eps[idx] * self.eigvals[k].to(device).sqrt()
            x[idx] = self.means[k].to(device) + scaled @ self.eigvecs[k].to(device).T
        x = x.to(torch.float32)
        return (x, comp) if return_components else x

#----------------------------------------------------------------------------
# Presets.

GMM_PRESETS = {
    'ring8':   dict(kind='ring', modes=8, radius=2.0, std=0.1),
    'grid25':  dict(kind='grid', side=5, spacing=1.0, std=0.05),
    'mog40':   dict(kind='box', modes=40, dim=2, half_width=40.0, std=math.log1p(math.e), seed=0),
    'gauss64': dict(kind='random', modes=8, dim=64, mean_norm=5.0, eig_min=0.25, eig_max=2.5, seed=0),
}

def _ring(modes, radius, std):
    angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    return dict(means=radius * torch.stack([angle.cos(), angle.sin()], dim=1), std=std)

def _grid(side, spacing, std):
    ticks = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    gx, gy = torch.meshgrid(ticks, ticks, indexing='ij')
    return dict(means=torch.stack([gx.flatten(), gy.flatten()], dim=1), std=std)

def _box(modes, dim, half_width, std, seed):
    # The same draw as FAB's GMM after torch.manual_seed(seed), without touching the global RNG.
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand((modes, dim), generator=g) - 0.5) * 2 * half_width
    return dict(means=means.to(torch.float64), std=std)

def _random(modes, dim, mean_norm, eig_min, eig_max, seed):
    rs = np.random.RandomState(seed) # legacy RandomState: its stream never changes
    means = rs.randn(modes, dim)
    means *= mean_norm / np.linalg.norm(means, axis=1, keepdims=True)
    covs = []
    for _ in range(modes):
        q, r = np.linalg.qr(rs.randn(dim, dim))
        q *= np.sign(np.diag(r)) # unique Q whatever the LAPACK sign convention
        lam = np.exp(rs.uniform(np.log(eig_min), np.log(eig_max), dim))
        covs.append((q * lam) @ q.T)
    weights = rs.uniform(1, 2, modes)
    return dict(means=means, covs=np.stack(covs), weights=weights / weights.sum())

_BUILDERS = dict(ring=_ring, grid=_grid, box=_box, random=_random)

def make_gmm(name, **overrides):
    """The GMMTeacher of a preset; keyword arguments override its parameters."""
    if name not in GMM_PRESETS:
        raise ValueError(f"unknown Gaussian-mixture preset '{name}'; valid: {', '.join(GMM_PRESETS)}")
    params = dict(GMM_PRESETS[name], **overrides)
    kind = params.pop('kind')
    return GMMTeacher(**_BUILDERS[kind](**params))

#----------------------------------------------------------------------------
# User mixtures as JSON.

_JSON_KEYS = dict(means='means', covariances='covariances', covs='covariances', stds='stds',
    std='stds', weights='weights')

def _numeric_array(value, what):
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f'{what} must be numbers in nested lists of equal lengths') from None
    if array.dtype == object or not np.isfinite(array).all():
        raise ValueError(f'{what} must be finite numbers in nested lists of equal lengths')
    return array

def gmm_from_dict(spec):
    """A GMMTeacher from {'means', 'covariances' | 'stds', 'weights'} (see the module docstring);
    ValueError with a one-line message for anything malformed."""
    if not isinstance(spec, dict):
        raise ValueError(f'expected a JSON object with means, covariances or stds, and weights; got a {type(spec).__name__}')
    unknown = [k for k in spec if k not in _JSON_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (valid: means, covariances or stds, weights)")
    fields = {}
    for key, value in spec.items():
        name = _JSON_KEYS[key]
        if name in fields:
            raise ValueError(f"'{name}' given twice (as '{key}' and another spelling)")
        fields[name] = value
    if 'means' not in fields:
        raise ValueError("no 'means' ([K, d] list of component means)")
    means = _numeric_array(fields['means'], 'means')
    if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
        raise ValueError(f'means must be a [K, d] list of lists (K components, d dimensions), got shape {list(means.shape)}')
    K, d = means.shape
    if ('covariances' in fields) == ('stds' in fields):
        raise ValueError("give exactly one of 'covariances' ([K, d, d]) and 'stds' (a number, [K] or [K, d])")
    covs = std = None
    if 'covariances' in fields:
        covs = _numeric_array(fields['covariances'], 'covariances')
        if covs.shape != (K, d, d):
            raise ValueError(f'covariances must be [K, d, d] = [{K}, {d}, {d}] for {K} means of dimension {d}, '
                f'got shape {list(covs.shape)}')
        for k in range(K):
            c = covs[k]
            scale = max(float(np.abs(c).max()), 1e-300)
            if float(np.abs(c - c.T).max()) > 1e-8 * scale:
                raise ValueError(f'covariance {k} is not symmetric')
            smallest = float(np.linalg.eigvalsh(c).min())
            if not smallest > 1e-12 * scale:
                raise ValueError(f'covariance {k} is not positive definite (smallest eigenvalue {smallest:.3g})')
    else:
        std = _numeric_array(fields['stds'], 'stds')
        if std.shape not in ((), (1,), (K,), (K, d)):
            raise ValueError(f'stds must be a number, [K] = [{K}] or [K, d] = [{K}, {d}], got shape {list(std.shape)}')
        if not (std > 0).all():
            raise ValueError('stds must be positive')
    weights = None
    if 'weights' in fields:
        weights = _numeric_array(fields['weights'], 'weights')
        if weights.shape != (K,):
            raise ValueError(f'weights must be a list of K = {K} numbers (one per mean), got shape {list(weights.shape)}')
        if not (weights > 0).all():
            raise ValueError('weights must be positive (they are normalised to sum to 1; drop a component '
                'rather than give it weight 0)')
    return GMMTeacher(means, covs=covs, weights=weights, std=std)

def read_gmm_json(path):
    """The GMMTeacher a JSON file describes; ValueError naming the file if anything is wrong."""
    try:
        with open(path, encoding='utf-8') as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"teacher 'gmm:{path}': no such file (a mixture JSON, or one of the presets "
            f"{', '.join('gmm:' + n for n in GMM_PRESETS)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"teacher 'gmm:{path}': cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"teacher 'gmm:{path}': not valid JSON ({e})") from None
    try:
        return gmm_from_dict(spec)
    except ValueError as e:
        raise ValueError(f"teacher 'gmm:{path}': {e}") from None

def save_gmm_json(teacher, path):
    """Write a GMMTeacher (or a dict accepted by `gmm_from_dict`) as a mixture JSON file."""
    spec = teacher.to_dict() if isinstance(teacher, GMMTeacher) else dict(teacher)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(spec, f)

def is_vector_teacher(spec):
    """Whether a --teacher value (string or Teacher) gets the vector (MLP) defaults."""
    if isinstance(spec, Teacher):
        return len(spec.shape) == 1
    return isinstance(spec, str) and spec.startswith('gmm:')

def _as_gmm(value):
    """A pickled Gaussian mixture teacher as our GMMTeacher, else None.

    Loaded with allow_code=True its class is the pickle's own copy of GMMTeacher, so this goes
    by name and buffers; it must never pass for a network (it has sigma_min and dim too).
    """
    if isinstance(value, GMMTeacher):
        return value
    if isinstance(value, torch.nn.Module) and type(value).__name__ == 'GMMTeacher' and \
            all(hasattr(value, k) for k in ('means', 'covs', 'weights')):
        return GMMTeacher(value.means.detach().cpu(), covs=value.covs.detach().cpu(),
            weights=value.weights.detach().cpu())
    return None

def _is_denoiser(value):
    # EDM preconditioners and MLPDenoiser; generators (StyleGAN, one-step, MLP) lack sigma_min.
    if _as_gmm(value) is not None or isinstance(value, Teacher):
        return False
    return isinstance(value, torch.nn.Module) and hasattr(value, 'sigma_min') and \
        (hasattr(value, 'img_resolution') or hasattr(value, 'dim'))

def _pick_gmm(data):
    """The Gaussian mixture a pickle holds (itself, its 'ema' or 'teacher' entry), else None."""
    if isinstance(data, dict):
        for key in ('ema', 'teacher'):
            if key in data and _as_gmm(data[key]) is not None:
                return _as_gmm(data[key])
        if 'ema' not in data:
            return next((_as_gmm(v) for v in data.values() if _as_gmm(v) is not None), None)
        return None
    return _as_gmm(data)

def _pick_network(data):
    """data['ema'], else the first denoiser network among the pickle's values."""
    if isinstance(data, dict) and 'ema' in data:
        net = safe_pickle.require_module(data, 'ema', 'the pickle')
    elif isinstance(data, dict):
        net = next((v for v in data.values() if _is_denoiser(v)), None)
        unknown = [k for k, v in data.items() if isinstance(v, safe_pickle.UnknownPersistentObject)]
        if net is None and unknown:
            safe_pickle.require_module(data, unknown[0], 'the pickle') # raises, naming the class
        if net is None:
            raise ValueError(f"it holds no denoiser network (keys: {', '.join(map(str, data))})")
    else:
        net = data
    if not _is_denoiser(net):
        raise ValueError(f'its network is a {type(net).__name__}, not a denoiser (EDM preconditioner or MLPDenoiser)')
    return net

def load_teacher(spec, allow_code=False, device='cpu'):
    """A teacher from 'gmm:PRESET', 'gmm:FILE.json' (a user's mixture, see the module
    docstring), a Teacher object (returned as it is), or a network pickle path/URL (EDM format).

    Pickles load with `safe_pickle` (nothing from the file runs unless allow_code=True); the
    network is `data['ema']`, or else the first denoiser network in the pickle. A pickle that
    holds a GMMTeacher (itself, as 'ema', or as a snapshot's 'teacher') gives that mixture.
    """
    presets = ', '.join(f'gmm:{name}' for name in GMM_PRESETS)
    if isinstance(spec, Teacher):
        return spec.to(device)
    if isinstance(spec, torch.nn.Module) and _as_gmm(spec) is not None:
        return _as_gmm(spec).to(device)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f'teacher must be a network pickle path/URL, gmm:FILE.json or one of {presets}, got {spec!r}')
    if spec.startswith('gmm:'):
        name = spec[len('gmm:'):]
        if name in GMM_PRESETS:
            return make_gmm(name).to(device)
        if name.lower().endswith('.json') or os.path.isfile(name):
            return read_gmm_json(name).to(device)
        raise ValueError(f"unknown teacher '{spec}'; valid: gmm:FILE.json (a mixture file) or a preset: {presets}")
    if spec.startswith('diffusers:'): # a diffusers UNet + scheduler (+ VAE): refine/teachers_diffusers.py
        try:
            from refine import teachers_diffusers # pylint: disable=import-outside-toplevel (optional dependency)
            return teachers_diffusers.load_diffusers_teacher(spec[len('diffusers:'):], device=device)
        except Exception as e: # pylint: disable=broad-except
            raise ValueError(f"teacher '{spec}': {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e
    if '://' not in spec and not os.path.isfile(spec):
        raise ValueError(f"teacher '{spec}': no such file (give a network pickle path/URL, gmm:FILE.json or one of {presets})")
    if spec.lower().endswith('.json'):
        raise ValueError(f"teacher '{spec}': a JSON file is read as a Gaussian mixture only as gmm:{spec}")
    try:
        data = safe_pickle.load_network_pkl(spec, allow_code=allow_code)
        gmm = _pick_gmm(data)
        if gmm is not None:
            return gmm.to(device)
        from refine import teachers_edm2 # pylint: disable=import-outside-toplevel (it imports this module)
        if teachers_edm2.is_edm2_snapshot(data):
            return teachers_edm2.EDM2Teacher.from_snapshot(data).to(device)
        return EDMTeacher(_pick_network(data)).to(device)
    except Exception as e: # broken, unsafe or unsuitable pickle: one line naming the file
        raise ValueError(f"teacher '{spec}': {e}") from e

if __name__ == 'refine.teachers': # not in the copy a pickle's embedded source would run
    safe_pickle.register_class(GMMTeacher)

#----------------------------------------------------------------------------
