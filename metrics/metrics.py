"""The metrics themselves, on feature arrays (no networks here).

  frechet_distance   FID (Inception features) or FD (any other detector's)
  kernel_distance    KID: unbiased MMD^2, cubic polynomial kernel, averaged over random subsets
  precision_recall   k-NN manifold precision and recall (Kynkaanniemi et al. 2019)
  inception_score    exp(E_x[KL(p(y|x) || p(y))]) over splits
Semantics follow StyleGAN's metrics and EDM's fid.py; see each docstring.
"""

import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch

def frechet_distance(mu, sigma, mu_ref, sigma_ref):
    """|mu - mu_ref|^2 + tr(sigma + sigma_ref - 2 sqrtm(sigma sigma_ref)), real part, as EDM."""
    mu, sigma, mu_ref, sigma_ref = (np.asarray(a, dtype=np.float64) for a in (mu, sigma, mu_ref, sigma_ref))
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape:
        raise ValueError(f'statistics of different sizes: {mu.shape[0]}-d vs {mu_ref.shape[0]}-d '
            '(made with different detectors?)')
    m = np.square(mu - mu_ref).sum()
    s = _sqrtm(np.dot(sigma, sigma_ref))
    return float(np.real(m + np.trace(sigma + sigma_ref - s * 2)))

def _sqrtm(a):
    # EDM calls sqrtm(..., disp=False): no complaint about singular products (few samples).
    # SciPy 1.17 deprecates `disp` (1.18 drops it) and warns regardless; the matrix is the same.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        try:
            return scipy.linalg.sqrtm(a, disp=False)[0]
        except TypeError: # a SciPy without `disp`
            return scipy.linalg.sqrtm(a)

def kernel_distance(gen, real, num_subsets=100, max_subset_size=1000, seed=0):
    """KID: the unbiased MMD^2 between subsets of m = min(N_gen, N_real, max_subset_size) rows,
    with k(x, y) = (x.y / D + 1)^3, averaged over `num_subsets` random subsets (StyleGAN)."""
    gen = np.asarray(gen, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    d = gen.shape[1]
    m = min(len(gen), len(real), max_subset_size)
    if m < 2:
        raise ValueError(f'KID needs at least 2 samples on each side, got {len(gen)} and {len(real)}')
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = gen[rng.choice(len(gen), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        # Within-set sums leave out i == j: that is what makes the estimate unbiased.
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total += within - 2 * kxy.sum() / (m * m)
    return float(total / num_subsets)

def _pairwise_distances(a, b, batch, device):
    """Yield (row slice, distances [rows, len(b)]) in float64, `batch` rows of `a` at a time."""
    b = torch.as_tensor(b, dtype=torch.float64, device=device)
    for start in range(0, len(a), batch):
        rows = torch.as_tensor(a[start:start + batch], dtype=torch.float64, device=device)
        yield slice(start, start + len(rows)), torch.cdist(rows, b)

def _knn_radii(points, k, batch, device):
    """Distance from each point to its k-th nearest other point (k+1-th counting itself)."""
    radii = np.empty(len(points))
    for rows, dist in _pairwise_distances(points, points, batch, device):
        radii[rows] = dist.kthvalue(k + 1, dim=1).values.cpu().numpy()
    return radii

def _coverage(manifold, radii, probes, batch, device):
    """Fraction of probes within the radius of at least one manifold point."""
    radii = torch.as_tensor(radii, dtype=torch.float64, device=device)
    inside = 0
    for _, dist in _pairwise_distances(probes, manifold, batch, device):
        inside += int((dist <= radii[None, :]).any(dim=1).sum())
    return inside / len(probes)

def precision_recall(real, gen, k=3, batch=1024, device='cpu'):
    """Precision: the fraction of generated samples inside the real manifold (the union of balls
    around each real sample reaching its k-th nearest real neighbour); recall: the same with
    the roles swapped. Distances in float64, `batch` rows at a time."""
    real = np.asarray(real, dtype=np.float64)
    gen = np.asarray(gen, dtype=np.float64)
    if min(len(real), len(gen)) <= k:
        raise ValueError(f'precision/recall with k={k} needs more than {k} samples on each side, '
            f'got {len(real)} real and {len(gen)} generated')
    precision = _coverage(real, _knn_radii(real, k, batch, device), gen, batch, device)
    recall = _coverage(gen, _knn_radii(gen, k, batch, device), real, batch, device)
    return precision, recall

def inception_score(probs, num_splits=10):
    """(mean, std) over `num_splits` consecutive splits of exp(mean_x KL(p(y|x) || p(y))), where
    p(y) is the split's mean prediction (StyleGAN's is50k)."""
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    if n < num_splits:
        raise ValueError(f'Inception Score with {num_splits} splits needs at least {num_splits} '
            f'samples, got {n}')
    scores = []
    for i in range(num_splits):
        part = probs[i * n // num_splits:(i + 1) * n // num_splits]
        marginal = part.mean(axis=0, keepdims=True)
        # xlogy gives 0 * log 0 = 0, where a plain log would make NaNs of underflowed classes.
        kl = scipy.special.xlogy(part, part) - scipy.special.xlogy(part, marginal)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
