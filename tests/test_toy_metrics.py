"""Toy metrics: MMD against a naive double loop, mode coverage on dropped modes, log-likelihood."""

import math

import numpy as np
import pytest
import torch

from refine import teachers as T
from refine import toy_metrics as M

def _naive_mmd(x, y, bandwidths):
    x, y = x.double().tolist(), y.double().tolist()
    def k(a, b, h):
        return math.exp(-sum((u - v) ** 2 for u, v in zip(a, b)) / (2 * h * h))
    def mean_k(A, B, h):
        return sum(k(a, b, h) for a in A for b in B) / (len(A) * len(B))
    values = [mean_k(x, x, h) + mean_k(y, y, h) - 2 * mean_k(x, y, h) for h in bandwidths]
    return sum(values) / len(values)

@pytest.mark.parametrize('bandwidths', [(0.25, 0.5, 1, 2, 4), (0.3, 1.7), (4, 2, 1, 0.7)])
@pytest.mark.parametrize('chunk', [None, 1, 3])
def test_mmd_matches_naive_double_loop(bandwidths, chunk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 2, generator=g)
    y = torch.randn(7, 2, generator=g) * 1.5 + 0.4
    expected = _naive_mmd(x, y, bandwidths)
    assert M.mmd_rbf(x, y, bandwidths=bandwidths, chunk=chunk) == pytest.approx(expected, rel=1e-10, abs=1e-13)

def test_mmd_identical_shifted_and_max_n():
    teacher = T.make_gmm('ring8')
    g = torch.Generator().manual_seed(0)
    x, y = teacher.sample(1500, generator=g), teacher.sample(1500, generator=g)
    assert M.mmd_rbf(x, x) == pytest.approx(0, abs=1e-12)
    same = M.mmd_rbf(x, y)
    shifted = M.mmd_rbf(x, y + 0.3)
    assert 0 <= same < 0.01 and shifted > 10 * same
    assert M.mmd_rbf(x, y, max_n=100) == pytest.approx(M.mmd_rbf(x[:100], y[:100]), rel=1e-12)

def test_mode_coverage_counts_dropped_mode():
    teacher = T.make_gmm('ring8')
    x, comp = teacher.sample(8000, generator=torch.Generator().manual_seed(0), return_components=True)
    full = M.mode_coverage(x, teacher)
    assert full['covered'] == 8 and full['total'] == 8
    assert full['weight_error'] < 0.03 and full['quality'] > 0.98

    dropped = M.mode_coverage(x[comp != 3], teacher)
    assert dropped['covered'] == 7 and dropped['weights'][3] == 0
    # The other seven modes share the mass: TV = 0.5 * (1/8 + 7 * (1/7 - 1/8)) = 1/8.
    assert dropped['weight_error'] == pytest.approx(0.125, abs=0.03)

    # A handful of stray samples does not make a mode covered.
    stray = torch.cat([x[comp != 3], x[comp == 3][:3]])
    assert M.mode_coverage(stray, teacher)['covered'] == 7

    # Samples between the modes count for none of them.
    far = M.mode_coverage(x * 0.5, teacher)
    assert far['covered'] == 0 and far['quality'] < 0.01 and far['weight_error'] > 0.99

def test_mode_coverage_high_dimensional_exact_samples():
    # Exact samples of a 64-D mixture must count as covered (threshold matched by probability).
    teacher = T.make_gmm('gauss64')
    x = teacher.sample(4000, generator=torch.Generator().manual_seed(0))
    result = M.mode_coverage(x, teacher)
    assert result['covered'] == 8 and result['quality'] > 0.99 and result['weight_error'] < 0.05
    assert M._mahalanobis_radius(3.0, 1) == pytest.approx(3.0)

def test_mean_log_likelihood():
    teacher = T.make_gmm('grid25')
    x = teacher.sample(2000, generator=torch.Generator().manual_seed(0))
    ll = M.mean_log_likelihood(x, teacher)
    assert ll == pytest.approx(float(teacher.log_prob(x.double()).mean()))
    blurred = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert M.mean_log_likelihood(blurred, teacher) < ll - 1

def _naive_mmd_unbiased(x, y, bandwidths):
    x, y = x.double().tolist(), y.double().tolist()
    def k(a, b, h):
        return math.exp(-sum((u - v) ** 2 for u, v in zip(a, b)) / (2 * h * h))
    def within(A, h):
        return sum(k(a, b, h) for i, a in enumerate(A) for j, b in enumerate(A) if i != j) / (len(A) * (len(A) - 1))
    values = [within(x, h) + within(y, h) - 2 * sum(k(a, b, h) for a in x for b in y) / (len(x) * len(y))
        for h in bandwidths]
    return sum(values) / len(values)

@pytest.mark.parametrize('chunk', [None, 1, 4])
def test_unbiased_mmd_matches_naive_u_statistic(chunk):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 2, generator=g)
    y = torch.randn(6, 2, generator=g) * 1.3 + 0.2
    for bw in [(0.25, 0.5, 1, 2, 4), (0.3, 1.7)]:
        expected = _naive_mmd_unbiased(x, y, bw)
        assert M.mmd_rbf_unbiased(x, y, bandwidths=bw, chunk=chunk) == pytest.approx(expected, rel=1e-10, abs=1e-13)
    with pytest.raises(ValueError, match='at least 2'):
        M.mmd_rbf_unbiased(x[:1], y)

def test_unbiased_mmd_is_centred_where_the_biased_one_has_a_floor():
    teacher = T.make_gmm('ring8')
    values, biased = [], []
    for seed in range(6):
        a = teacher.sample(600, generator=torch.Generator().manual_seed(2 * seed))
        b = teacher.sample(600, generator=torch.Generator().manual_seed(2 * seed + 1))
        values.append(M.mmd_rbf_unbiased(a, b))
        biased.append(M.mmd_rbf(a, b))
    # The biased statistic's floor is its bias, > 0 for every pair; the unbiased one averages ~0.
    assert min(biased) > 0 and abs(sum(values) / len(values)) < 0.2 * (sum(biased) / len(biased))
    assert M.mmd_rbf_unbiased(a, b + 1.0) > 50 * max(abs(v) for v in values)

def test_component_masses_by_bayes_cell():
    means, covs = torch.tensor([[0.0, 0.0], [3.0, 0.0]], dtype=torch.float64), torch.stack([
        torch.eye(2, dtype=torch.float64) * 0.25, torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)])
    teacher = T.GMMTeacher(means, covs=covs, weights=[3.0, 1.0])
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 1
    # Independent Bayes cells: scipy log-densities plus log-weights, argmax.
    import scipy.stats # pylint: disable=import-outside-toplevel
    logs = np.stack([np.log(w) + scipy.stats.multivariate_normal(m.numpy(), c.numpy()).logpdf(x.numpy())
        for m, c, w in zip(means, covs, [0.75, 0.25])], axis=1)
    expected = np.bincount(logs.argmax(1), minlength=2) / len(x)
    result = M.component_masses(x, teacher, chunk=700)
    np.testing.assert_allclose(result['masses'], expected, rtol=0, atol=1e-12)
    assert result['tv'] == pytest.approx(0.5 * np.abs(expected - [0.75, 0.25]).sum())
    rel = np.abs(expected / [0.75, 0.25] - 1)
    assert result['max_rel_error'] == pytest.approx(rel.max()) and result['worst'] == int(rel.argmax())
    # Exact samples: every mass close to its weight, off-mode samples included.
    exact = teacher.sample(20000, generator=torch.Generator().manual_seed(1))
    assert M.component_masses(exact, teacher)['tv'] < 0.02
