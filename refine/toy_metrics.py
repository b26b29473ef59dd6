"""Metrics for vector samples against a Gaussian-mixture teacher (methods brief, section 11).

* `mmd_rbf`: multi-bandwidth RBF MMD^2, the biased V-statistic of VarDiU's evaluation. Its
  "noise floor" (two exact sample sets) is mostly the bias, about 2 (1 - E k(x, x')) / n.
* `mmd_rbf_unbiased`: the same MMD^2 as the unbiased U-statistic (diagonal terms left out):
  zero in expectation for exact samples, so it can be negative; use this one to compare.
* `component_masses`: the fraction of samples in each component's Bayes cell (the samples whose
  most responsible component it is), its total-variation distance to the weights and the worst
  relative error: whether mixture *weights* are recovered, whatever the shapes.
* `mode_coverage`: which modes the samples reach and with what weights; log-likelihood alone
  is blind to a dropped mode.
* `mean_log_likelihood`: mean log p_0(x) under the exact mixture.
"""

import math

import scipy.stats
import torch

#----------------------------------------------------------------------------

def _sq_dists(a, b):
    # The expanded form in float64, in place: fine for toy coordinates up to ~1e3.
    d2 = a @ b.T
    return d2.mul_(-2).add_(a.square().sum(1)[:, None]).add_(b.square().sum(1)[None, :]).clamp_(min=0)

def _kernel_sums(d2, bandwidths):
    """sum over entries of exp(-d2 / (2 h^2)) for each h (sorted descending), [B] float64.

    When h^2 shrinks by a power of two, the kernel is the previous one squared that many
    times: one exp serves the default bandwidths (0.25..4), which are 4x apart in h^2.
    """
    sums, e, prev = [], None, None
    for h in bandwidths:
        m = math.log2(prev ** 2 / h ** 2) if prev is not None else -1
        if e is not None and abs(m - round(m)) < 1e-9 and 1 <= round(m) <= 10:
            for _ in range(round(m)):
                e.mul_(e)
        else:
            e = torch.exp(d2 * (-0.5 / h ** 2))
        sums.append(e.sum())
        prev = h
    return torch.stack(sums)

def _kernel_mean(a, b, bandwidths, chunk, diagonal=True):
    """mean over all pairs (a_i, b_j) and bandwidths of the RBF kernel, in row chunks of a.

    b=None means b=a: only the upper triangle is computed, off-diagonal blocks count twice;
    with diagonal=False the pairs (a_i, a_i) are left out (the U-statistic's mean over i != j).
    """
    symmetric = b is None
    b = a if symmetric else b
    total = torch.zeros([], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], chunk):
        rows = a[start:start + chunk]
        if symmetric:
            w = rows.shape[0]
            total += _kernel_sums(_sq_dists(rows, b[start:start + w]), bandwidths).sum()
            if start + w < b.shape[0]:
                total += 2 * _kernel_sums(_sq_dists(rows, b[start + w:]), bandwidths).sum()
        else:
            total += _kernel_sums(_sq_dists(rows, b), bandwidths).sum()
    if symmetric and not diagonal:
        n = a.shape[0] # k(a_i, a_i) = 1 for every bandwidth
        return (total - n * len(bandwidths)) / (n * (n - 1) * len(bandwidths))
    return total / (a.shape[0] * b.shape[0] * len(bandwidths))

@torch.no_grad()
def mmd_rbf(x, y, bandwidths=(0.25, 0.5, 1, 2, 4), max_n=10000, chunk=None):
    """Biased MMD^2 between samples x [N, d] and y [M, d] with k(a,b) = exp(-|a-b|^2/(2h^2)),
    averaged over the bandwidths h. Only the first `max_n` rows of each are used; memory is
    bounded by processing `chunk` rows at a time (default: about 4M kernel entries)."""
    x = x.reshape(x.shape[0], -1)[:max_n].to(torch.float64)
    y = y.reshape(y.shape[0], -1)[:max_n].to(device=x.device, dtype=torch.float64)
    if chunk is None:
        chunk = max(1, (1 << 22) // max(x.shape[0], y.shape[0]))
    bw = sorted((float(h) for h in bandwidths), reverse=True)
    value = _kernel_mean(x, None, bw, chunk) + _kernel_mean(y, None, bw, chunk) - 2 * _kernel_mean(x, y, bw, chunk)
    return float(value)

@torch.no_grad()
def mmd_rbf_unbiased(x, y, bandwidths=(0.25, 0.5, 1, 2, 4), max_n=10000, chunk=None):
    """Unbiased MMD^2 (U-statistic) with `mmd_rbf`'s kernel: the within-set means leave out
    i = j, so two exact sample sets score 0 in expectation (and a value may be negative).
    Needs at least 2 rows in each set."""
    x = x.reshape(x.shape[0], -1)[:max_n].to(torch.float64)
    y = y.reshape(y.shape[0], -1)[:max_n].to(device=x.device, dtype=torch.float64)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f'the unbiased MMD needs at least 2 samples in each set, got {x.shape[0]} and {y.shape[0]}')
    if chunk is None:
        chunk = max(1, (1 << 22) // max(x.shape[0], y.shape[0]))
    bw = sorted((float(h) for h in bandwidths), reverse=True)
    value = _kernel_mean(x, None, bw, chunk, diagonal=False) + _kernel_mean(y, None, bw, chunk, diagonal=False) \
        - 2 * _kernel_mean(x, y, bw, chunk)
    return float(value)

#----------------------------------------------------------------------------

def _mahalanobis_radius(threshold_std, dim):
    """Radius holding, in `dim` dimensions, the mass of +-threshold_std in one dimension.

    A plain Mahalanobis radius of 3 would reject most exact samples of a 64-D Gaussian (their
    radius is about sqrt(64) = 8), so the threshold is matched by probability instead; in 1-D
    it is exactly threshold_std, in 2-D 3 -> 3.44.
    """
    mass = math.erf(threshold_std / math.sqrt(2))
    return math.sqrt(scipy.stats.chi2.ppf(mass, dim))

@torch.no_grad()
def mode_coverage(x, teacher, threshold_std=3.0, min_fraction=0.1):
    """Per-mode coverage of samples x [N, d] under a GMMTeacher.

    Each sample goes to its most responsible component, and counts only if it lies within the
    `threshold_std` region of that component (Mahalanobis distance, matched by probability to
    the dimension, see `_mahalanobis_radius`). A mode is covered if it gets at least
    `min_fraction` of its expected count N*pi_k (and at least one sample).

    Returns dict(covered, total, weights, weight_error, quality): `weights[k]` is the fraction
    of all N samples counted for mode k; `quality` = sum of weights (the rest are off-mode);
    `weight_error` is the total variation between (weights, off-mode fraction) and (pi, 0).
    """
    x = x.reshape(x.shape[0], -1)
    n, K = x.shape[0], teacher.num_components
    log_joint = teacher.log_joint(x)
    best = log_joint.argmax(dim=1)
    maha_sq = teacher.mahalanobis_sq(x).gather(1, best[:, None]).squeeze(1)
    good = maha_sq < _mahalanobis_radius(threshold_std, teacher.dim) ** 2
    counts = torch.bincount(best[good], minlength=K).to(torch.float64)
    pi = teacher.weights.to(counts)
    weights = counts / max(n, 1)
    covered = int(((counts >= 1) & (counts >= min_fraction * n * pi)).sum())
    quality = float(weights.sum())
    weight_error = 0.5 * (float((weights - pi).abs().sum()) + (1 - quality))
    return dict(covered=covered, total=K, weights=weights.cpu().tolist(),
        weight_error=weight_error, quality=quality)

@torch.no_grad()
def component_masses(x, teacher, chunk=65536):
    """Mass the samples x [N, d] give each component of a GMMTeacher, by Bayes cell.

    Every sample goes to its most responsible component under p_0 (argmax of log pi_k +
    log N(x; mu_k, Sigma_k)); nothing is discarded, so the masses sum to 1 and compare with
    the weights directly, whatever the spread of each component.

    Returns dict(masses [K] list, weights [K] list, tv, max_rel_error, worst): tv = 1/2 sum
    |masses - weights|; max_rel_error = max_k |mass_k / pi_k - 1|, reached at component `worst`.
    """
    x = x.reshape(x.shape[0], -1)
    K = teacher.num_components
    counts = torch.zeros(K, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        best = teacher.log_joint(x[start:start + chunk]).argmax(dim=1).cpu()
        counts += torch.bincount(best, minlength=K).to(torch.float64)
    masses = counts / max(x.shape[0], 1)
    pi = teacher.weights.detach().cpu().to(torch.float64)
    rel = (masses / pi - 1).abs()
    return dict(masses=masses.tolist(), weights=pi.tolist(), tv=0.5 * float((masses - pi).abs().sum()),
        max_rel_error=float(rel.max()), worst=int(rel.argmax()))

@torch.no_grad()
def mean_log_likelihood(x, teacher):
    """Mean of log p_0(x) under the teacher's mixture (higher is better; blind to dropped modes)."""
    return float(teacher.log_prob(x.reshape(x.shape[0], -1).to(torch.float64)).mean())

#----------------------------------------------------------------------------

@torch.no_grad()
def evaluate_generator(G, teacher, n=10000, seed=0):
    """Every toy metric of a vector generator against its Gaussian-mixture teacher.

    Student and reference samples are 10k each by default; the noise floor is the MMD between
    two independent exact sample sets of the same size.
    """
    g = torch.Generator().manual_seed(seed)
    x = G(torch.randn([n, *G.z_shape], generator=g)).cpu()
    y = teacher.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    y2 = teacher.sample(n, generator=torch.Generator().manual_seed(seed + 2))
    coverage = mode_coverage(x, teacher)
    return dict(mmd=mmd_rbf(x, y), mmd_floor=mmd_rbf(y2, y), covered=coverage['covered'],
        modes=coverage['total'], on_mode=coverage['quality'], weight_error=coverage['weight_error'],
        loglik=mean_log_likelihood(x, teacher), loglik_true=mean_log_likelihood(y, teacher), samples=x)

#----------------------------------------------------------------------------

class TickLogger:
    """`on_tick` callback for runs on a GMMTeacher: at every tick, the EMA generator's unbiased
    MMD^2, mode coverage, Bayes-cell weight error (TV) and worst component on `n` samples,
    logged in one line and appended to RUN_DIR/gmm-metrics.jsonl (fixed latents and reference
    samples, so ticks compare). `records` keeps them; `seconds` is the time spent here."""
    def __init__(self, teacher, n=2000, seed=0, log=print, filename='gmm-metrics.jsonl'):
        self.teacher, self.n, self.seed, self.log, self.filename = teacher, int(n), seed, log, filename
        self.reference = teacher.sample(self.n, generator=torch.Generator().manual_seed(seed + 1))
        self.records, self.seconds = [], 0.0

    @torch.no_grad()
    def __call__(self, info):
        import json, os, time # pylint: disable=import-outside-toplevel,multiple-imports
        start = time.time()
        G = info.G_ema
        z = torch.randn([self.n, *G.z_shape], generator=torch.Generator().manual_seed(self.seed))
        x = G(z.to(next(G.parameters()).device)).cpu().to(torch.float32)
        masses = component_masses(x, self.teacher)
        coverage = mode_coverage(x, self.teacher)
        record = dict(kimg=info.cur_nimg / 1e3, mmd2_unbiased=mmd_rbf_unbiased(x, self.reference),
            covered=coverage['covered'], modes=coverage['total'], on_mode=coverage['quality'],
            weight_tv=masses['tv'], max_rel_error=masses['max_rel_error'], worst=masses['worst'])
        self.records.append(record)
        if self.log is not None:
            self.log(f"gmm kimg {record['kimg']:<8.1f} mmd2_unbiased {record['mmd2_unbiased']:<10.4g} "
                f"modes {record['covered']}/{record['modes']} on-mode {record['on_mode']:.2f} "
                f"weight TV {record['weight_tv']:.3f} worst mass error {record['max_rel_error']:.0%} (component {record['worst']})")
        run_dir = getattr(info, 'run_dir', None)
        if run_dir:
            with open(os.path.join(run_dir, self.filename), 'a', encoding='utf-8') as f:
                f.write(json.dumps(record) + '\n')
        self.seconds += time.time() - start

