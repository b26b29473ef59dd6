"""generate.py end to end on tiny pickles: the three kinds of network, file layout, and the
one-line errors a user can cause."""

import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from refine import generation
from training.sampler import edm_sampler
from torch_utils.images import to_uint8
from torch_utils import persistence
from training.networks_edm import EDMPrecond

TINY = dict(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8,
    channel_mult=[1], num_blocks=1, attn_resolutions=[])

def _tiny_net(label_dim, seed=0):
    with torch.random.fork_rng(devices=[]): # leave the global RNG as other test files expect it
        torch.manual_seed(seed)
        return EDMPrecond(label_dim=label_dim, **TINY).eval().requires_grad_(False)

@pytest.fixture(scope='module')
def pkls(tmp_path_factory):
    root = tmp_path_factory.mktemp('pkls')
    paths = dict(cond=root / 'cond.pkl', uncond=root / 'uncond.pkl')
    nets = dict(cond=_tiny_net(3), uncond=_tiny_net(0, seed=1))
    for key, net in nets.items():
        persistence.save_network_pkl(dict(ema=net), str(paths[key]))
    return dict(paths={k: str(v) for k, v in paths.items()}, nets=nets)

def _run(*args):
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    return result

def _clean_error(result, *words):
    """Exit status != 0, a one-line message naming `words`, no traceback."""
    text = result.output
    assert result.exit_code != 0, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in text
    for word in words:
        assert word in text, text

def _per_seed_draws(seed, z_shape, label_dim, class_idx=None):
    """What generate.py should draw for `seed`, written out without StackedRandomGenerator."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(z_shape, generator=gen)[None]
    labels = None
    if label_dim:
        k = int(torch.randint(label_dim, size=[], generator=gen))
        labels = torch.eye(label_dim)[[class_idx if class_idx is not None else k]]
    return z, labels

def _png(path):
    with PIL.Image.open(path) as im:
        return np.asarray(im).copy(), im.mode

def _assert_png_is(path, image_float):
    arr, mode = _png(path)
    assert mode == 'L' and arr.shape == (8, 8)
    expected = to_uint8(image_float[0, 0]).numpy().astype(int)
    # Batches of different sizes may round differently in the last float bit.
    assert np.abs(arr.astype(int) - expected).max() <= 1

#----------------------------------------------------------------------------
# EDM teacher: Heun sampler.

def test_teacher_images_grid_and_progress(pkls, tmp_path):
    out, grid = tmp_path / 'out', tmp_path / 'g' / 'grid.png'
    result = _run('--network', pkls['paths']['cond'], '--outdir', out, '--seeds', '0-4',
        '--batch', 2, '--steps', 2, '--grid', grid, '--device', 'cpu')
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f'{s:06d}.png' for s in range(5)]
    net = pkls['nets']['cond']
    for seed in range(5): # every seed as if sampled alone: batch composition does not matter
        z, labels = _per_seed_draws(seed, [1, 8, 8], 3)
        with torch.no_grad():
            _assert_png_is(out / f'{seed:06d}.png', edm_sampler(net, z, labels, num_steps=2))
    arr, _ = _png(grid)
    assert arr.shape == (16, 24) # 3 columns, 2 rows of 8x8
    assert np.array_equal(arr[8:16, 0:8], _png(out / '000003.png')[0])
    # A progress line before the first batch (long jobs show life at once), and at the end.
    assert 'batches of this process: 0/3 (0%)' in result.stderr and 'batches of this process: 3/3' in result.stderr and '3 network calls' in result.stderr

def test_teacher_class_and_subdirs(pkls, tmp_path):
    result = _run('--network', pkls['paths']['cond'], '--outdir', tmp_path, '--seeds', '999-1000',
        '--class', 2, '--steps', 2, '--subdirs')
    assert result.exit_code == 0, result.output
    net = pkls['nets']['cond']
    for seed in (999, 1000):
        z, labels = _per_seed_draws(seed, [1, 8, 8], 3, class_idx=2)
        with torch.no_grad():
            _assert_png_is(tmp_path / f'{seed - seed % 1000:06d}' / f'{seed:06d}.png',
                edm_sampler(net, z, labels, num_steps=2))

#----------------------------------------------------------------------------
# SiD / Diff-Instruct one-step pickle: ema(sigma_init z, sigma_init, c).

def _one_step_expected(net, seed, sigma):
    z, labels = _per_seed_draws(seed, [1, 8, 8], net.label_dim)
    with torch.no_grad():
        return net(sigma * z.to(torch.float64), sigma * torch.ones([1, 1, 1, 1], dtype=torch.float64), labels)

def test_sigma_init_one_step(pkls, tmp_path):
    result = _run('--network', pkls['paths']['cond'], '--outdir', tmp_path, '--seeds', '0-2',
        '--sigma-init', 2.5)
    assert result.exit_code == 0, result.output
    net = pkls['nets']['cond']
    for seed in range(3):
        _assert_png_is(tmp_path / f'{seed:06d}.png', _one_step_expected(net, seed, 2.5))
    # The library returns the floats themselves.
    sample, meta = generation.load_for_generation(pkls['paths']['cond'], sigma_init=2.5)
    assert (meta.kind, meta.nfe, meta.label_dim) == ('one-step-edm', 1, 3)
    got = sample([0, 1, 2])
    for seed in range(3):
        torch.testing.assert_close(got[seed:seed + 1], _one_step_expected(net, seed, 2.5), rtol=0, atol=1e-5)

def test_diff_instruct_pickle_is_one_step_and_a_bare_ema_gets_a_hint(pkls, tmp_path):
    # Diff-Instruct's own pickles are dict(ema=G, Sg=fake score): one call at sigma 1.
    net = pkls['nets']['cond']
    path = tmp_path / 'di.pkl'
    persistence.save_network_pkl(dict(ema=net, Sg=_tiny_net(3, seed=5)), str(path))
    result = _run('--network', path, '--outdir', tmp_path / 'di', '--seeds', '0-1')
    assert result.exit_code == 0, result.output
    assert "Diff-Instruct one-step pickle (it has 'Sg')" in result.stderr and '1 network calls' in result.stderr
    for seed in range(2):
        _assert_png_is(tmp_path / 'di' / f'{seed:06d}.png', _one_step_expected(net, seed, 1.0))
    result = _run('--network', pkls['paths']['cond'], '--outdir', tmp_path / 't', '--seeds', '0', '--steps', '2')
    assert result.exit_code == 0 and 'pass --sigma-init (SiD 2.5, Diff-Instruct 1.0)' in result.stderr

def test_library_reports_teacher_nfe(pkls):
    _, meta = generation.load_for_generation(pkls['paths']['uncond'], sampler_kwargs=dict(num_steps=18))
    assert (meta.kind, meta.nfe, meta.label_dim, meta.is_vector) == ('edm-teacher', 35, 0, False)

#----------------------------------------------------------------------------
# Snapshots of the refine loop: G_ema(z, c).

def test_one_step_generator_snapshot(pkls, tmp_path):
    networks_generators = pytest.importorskip('training.networks_generators')
    net = pkls['nets']['cond']
    G = networks_generators.OneStepGenerator(net, sigma_init=1.5).eval()
    path = tmp_path / 'snap.pkl'
    persistence.save_network_pkl(dict(G_ema=G), str(path))
    out = tmp_path / 'out'
    # The wrapper's class may not be on the safe loader's list: run its (our) code explicitly.
    result = _run('--network', path, '--outdir', out, '--seeds', '4,5', '--allow-pickle-code')
    assert result.exit_code == 0, result.output
    for seed in (4, 5):
        z, labels = _per_seed_draws(seed, list(G.z_shape), 3)
        with torch.no_grad():
            _assert_png_is(out / f'{seed:06d}.png', G(z, labels))

def test_vector_generator_snapshot(tmp_path):
    networks_generators = pytest.importorskip('training.networks_generators')
    networks_mlp = pytest.importorskip('training.networks_mlp')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        G = networks_generators.LatentGenerator(networks_mlp.MLPGenerator(z_dim=2, dim=2, hidden=16,
            num_layers=1)).eval()
    path = tmp_path / 'gmm.pkl'
    persistence.save_network_pkl(dict(G_ema=G), str(path))
    result = _run('--network', path, '--outdir', tmp_path / 'out', '--seeds', '0-99', '--batch', 32,
        '--allow-pickle-code', '--grid', tmp_path / 'grid.png')
    assert result.exit_code == 0, result.output
    samples = np.load(tmp_path / 'out' / 'samples.npy')
    assert samples.shape == (100, 2)
    with torch.no_grad():
        expected = torch.cat([G(_per_seed_draws(s, [2], 0)[0], None) for s in range(100)])
    np.testing.assert_allclose(samples, expected.numpy(), rtol=0, atol=1e-5)
    for png in (tmp_path / 'out' / 'scatter.png', tmp_path / 'grid.png'):
        arr, mode = _png(png)
        assert mode == 'RGB' and arr.shape == (512, 512, 3)
    assert not list((tmp_path / 'out').glob('*.png'))[1:] # only scatter.png, no per-seed images

class TinyVectorG(torch.nn.Module):
    """A generator class the safe loader cannot know (plain pickle, defined in a test)."""
    z_shape = (3,)
    is_vector = True
    label_dim = 0

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([2.0, -1.0, 0.5]))

    def forward(self, z, c=None):
        assert c is None
        return z * self.scale

def test_untrusted_generator_needs_allow_pickle_code(tmp_path):
    path = tmp_path / 'plain.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(G_ema=TinyVectorG()), f)
    _clean_error(_run('--network', path, '--outdir', tmp_path / 'a'), '--allow-pickle-code')
    assert not (tmp_path / 'a' / 'samples.npy').exists()
    result = _run('--network', path, '--outdir', tmp_path / 'b', '--seeds', '0-9', '--allow-pickle-code')
    assert result.exit_code == 0, result.output
    expected = torch.cat([_per_seed_draws(s, [3], 0)[0] for s in range(10)]) * torch.tensor([2.0, -1.0, 0.5])
    np.testing.assert_allclose(np.load(tmp_path / 'b' / 'samples.npy'), expected.numpy(), atol=1e-6)
    # --sigma-init needs an EDM 'ema' network, which this pickle lacks.
    _clean_error(_run('--network', path, '--outdir', tmp_path / 'c', '--allow-pickle-code',
        '--sigma-init', 2.5), '--sigma-init')

#----------------------------------------------------------------------------
# Errors a user can cause.

def test_class_out_of_range(pkls, tmp_path):
    _clean_error(_run('--network', pkls['paths']['cond'], '--outdir', tmp_path, '--class', 5), '--class', '3 classes')
    _clean_error(_run('--network', pkls['paths']['cond'], '--outdir', tmp_path, '--class', -1), '--class')
    assert not list(tmp_path.glob('*.png'))

def test_class_on_unconditional_network(pkls, tmp_path):
    _clean_error(_run('--network', pkls['paths']['uncond'], '--outdir', tmp_path, '--class', 0),
        '--class', 'unconditional')

def test_missing_and_foreign_pickles(tmp_path):
    missing = tmp_path / 'nope.pkl'
    _clean_error(_run('--network', missing, '--outdir', tmp_path / 'o'), '--network', 'nope.pkl')
    garbage = tmp_path / 'garbage.pkl'
    garbage.write_bytes(b'\x00not a pickle at all')
    _clean_error(_run('--network', garbage, '--outdir', tmp_path / 'o'), '--network', 'garbage.pkl')
    other = tmp_path / 'other.pkl'
    with open(other, 'wb') as f:
        pickle.dump(dict(weights=[1, 2]), f)
    _clean_error(_run('--network', other, '--outdir', tmp_path / 'o'), '--network', "'G_ema'", 'weights')

@pytest.mark.parametrize('seeds', ['a-b', '5-2', '', '-3'])
def test_bad_seeds(pkls, tmp_path, seeds):
    _clean_error(_run('--network', pkls['paths']['cond'], '--outdir', tmp_path, '--seeds', seeds), '--seeds')

def test_bad_sigma_init(pkls, tmp_path):
    _clean_error(_run('--network', pkls['paths']['cond'], '--outdir', tmp_path, '--sigma-init', 0), '--sigma-init')
