"""EDM sampler math, per-seed random draws, image writing; and the small distributed and
training-statistics helpers that generate.py and the refine loop share."""

import json
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch

from refine.plots import CURVE_COLOURS, save_curve_png, save_scatter_png
from torch_utils.images import save_image_grid, save_side_by_side, to_uint8
from torch_utils.rng import StackedRandomGenerator
from training.sampler import edm_sampler, karras_sigmas
from tests.scripts import free_port
from torch_utils import distributed, training_stats

class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data x ~ N(m, s^2) per pixel: D(x, sigma) = (s^2 x + sigma^2 m) / (s^2 + sigma^2).

    Records every sigma it is called with. `round_sigma` can quantise, to check that the
    sampler passes its noise levels through it.
    """
    def __init__(self, m=0.3, s=0.7, sigma_min=0.0, sigma_max=float('inf'), quantum=None):
        super().__init__()
        self.m, self.s = m, s
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.quantum = quantum
        self.seen = []

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        return sigma if self.quantum is None else (sigma / self.quantum).round() * self.quantum

    def forward(self, x, sigma, class_labels=None):
        self.seen.append(float(sigma))
        s2, sig2 = self.s ** 2, torch.as_tensor(sigma, dtype=torch.float64) ** 2
        return (s2 * x + sig2 * self.m) / (s2 + sig2)

def _closed_form_steps(n, smin, smax, rho, quantum=None):
    """t_i of Karras et al. (eq. 5), written out independently of the implementation."""
    out = []
    for i in range(n):
        t = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        out.append(round(t / quantum) * quantum if quantum else t)
    return out

#----------------------------------------------------------------------------
# Schedule and evaluation count.

@pytest.mark.parametrize('num_steps', [2, 5, 18])
def test_sampler_evaluates_karras_steps(num_steps):
    # The net's range (0.01, 50) is narrower than the sampler's defaults: it must win.
    net = GaussianDenoiser(sigma_min=0.01, sigma_max=50, quantum=1e-3)
    edm_sampler(net, torch.ones(2, 1, 2, 2, dtype=torch.float64), num_steps=num_steps)
    t = _closed_form_steps(num_steps, 0.01, 50, 7, quantum=1e-3)
    # Euler at t_0, then (Heun at t_{i+1}, Euler at t_{i+1}) for each step but the last.
    expected = [t[0]] + [ti for ti in t[1:] for _ in range(2)]
    assert len(net.seen) == 2 * num_steps - 1
    np.testing.assert_allclose(net.seen, expected, rtol=1e-12, atol=1e-12)

def test_karras_sigmas_end_in_zero():
    t = karras_sigmas(18)
    assert t.dtype == torch.float64 and t.shape == (19,)
    assert float(t[0]) == pytest.approx(80) and float(t[-2]) == pytest.approx(0.002) and float(t[-1]) == 0
    assert bool((t[:-1] > t[1:]).all())

def test_sampler_returns_float64():
    out = edm_sampler(GaussianDenoiser(), torch.ones(2, 1, 2, 2), num_steps=3)
    assert out.dtype == torch.float64

#----------------------------------------------------------------------------
# Correctness against an exact denoiser.

def _ode_solution(latents, net, t0):
    # For Gaussian data the probability-flow ODE is linear: x(0) = m + (x(t0) - m) s / sqrt(s^2 + t0^2).
    x_t0 = latents.to(torch.float64) * t0
    return net.m + (x_t0 - net.m) * net.s / math.sqrt(net.s ** 2 + t0 ** 2)

def test_heun_converges_to_exact_ode_solution_at_second_order():
    net = GaussianDenoiser()
    latents = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    exact = _ode_solution(latents, net, 80.0)
    err = {n: float((edm_sampler(net, latents, num_steps=n) - exact).abs().max()) for n in (32, 128, 1024)}
    # Heun: error ~ 1/N^2 (measured 2.4e-2, 1.3e-3, 1.4e-5); Euler alone only ~ 1/N (3.6e-2 at 128).
    assert err[32] / err[128] > 12
    assert err[128] < 2e-3 and err[1024] < 3e-5

def test_heun_samples_have_data_moments():
    net = GaussianDenoiser(m=0.3, s=0.7)
    n = 16384
    latents = torch.randn(n // 16, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    x = edm_sampler(net, latents, num_steps=64).flatten()
    # Tolerances: 5 standard errors of the mean and of the std for n draws (plus the tiny bias
    # from starting at N(0, t0^2) rather than N(m, s^2 + t0^2)).
    assert abs(float(x.mean()) - 0.3) < 5 * 0.7 / math.sqrt(n) + 0.003
    assert abs(float(x.std()) - 0.7) < 5 * 0.7 / math.sqrt(2 * n) + 0.001

def test_churn_adds_noise_only_between_s_min_and_s_max():
    net = GaussianDenoiser()
    gen = torch.Generator().manual_seed(3) # tests leave the global RNG alone
    latents = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=gen)
    calls = []
    def counting_randn_like(x):
        calls.append(1)
        return torch.randn(x.shape, dtype=x.dtype, generator=gen)
    base = edm_sampler(net, latents, num_steps=6)
    same = edm_sampler(net, latents, num_steps=6, S_churn=40, S_min=1e3, randn_like=counting_randn_like)
    # S_min above every t: gamma = 0 everywhere, noise drawn (EDM's stream) but multiplied by 0.
    assert torch.equal(base, same) and len(calls) == 6
    churned = edm_sampler(net, latents, num_steps=6, S_churn=40, randn_like=counting_randn_like)
    assert not torch.allclose(base, churned)

#----------------------------------------------------------------------------
# Per-seed random draws.

def test_stacked_generator_matches_per_seed_generators():
    seeds = [0, 7, 2**32 + 5]
    rnd = StackedRandomGenerator('cpu', seeds)
    z = rnd.randn([3, 2, 4])
    labels = rnd.randint(10, size=[3])
    for k, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed % 2**32)
        assert torch.equal(z[k], torch.randn([2, 4], generator=gen))
        assert torch.equal(labels[k], torch.randint(10, size=[], generator=gen))
    like = rnd.randn_like(torch.zeros(3, 5, dtype=torch.float64))
    assert like.dtype == torch.float64 and like.shape == (3, 5)

def _sample_seeds(net, seeds, **kwargs):
    rnd = StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([len(seeds), 1, 4, 4])
    return edm_sampler(net, latents, randn_like=rnd.randn_like, num_steps=5, **kwargs)

def test_sampler_output_independent_of_batch_composition():
    net = GaussianDenoiser()
    alone = _sample_seeds(net, [3], S_churn=20)
    for batch in ([1, 3, 5], [3, 9], [8, 7, 6, 5, 3]):
        together = _sample_seeds(net, batch, S_churn=20)
        assert torch.equal(together[batch.index(3)], alone[0])

def test_sampler_batch_independent_with_unet():
    from training.networks_edm import EDMPrecond # pylint: disable=import-outside-toplevel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = EDMPrecond(img_resolution=4, img_channels=1, model_type='SongUNet', model_channels=8,
            channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval()
    with torch.no_grad():
        alone = _sample_seeds(net, [3])
        together = _sample_seeds(net, [1, 3, 5])
    torch.testing.assert_close(together[1], alone[0], rtol=0, atol=1e-5)

#----------------------------------------------------------------------------
# Images.

def test_to_uint8_is_the_edm_conversion():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
    expected = np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8)
    assert to_uint8(x).dtype == torch.uint8
    assert to_uint8(x).tolist() == expected.tolist() == [0, 0, 64, 128, 255, 255, 255]

@pytest.mark.parametrize('channels', [1, 3])
def test_save_image_grid_layout(tmp_path, channels):
    n, h, w = 5, 3, 4
    images = torch.arange(n, dtype=torch.uint8).mul(40).reshape(n, 1, 1, 1).expand(n, channels, h, w)
    path = tmp_path / 'grid.png'
    save_image_grid(images, str(path), grid_w=2)
    with PIL.Image.open(path) as im:
        assert im.size == (2 * w, 3 * h) and im.mode == ('L' if channels == 1 else 'RGB')
        arr = np.asarray(im).reshape(3 * h, 2 * w, -1)
    for k in range(n):
        row, col = divmod(k, 2)
        assert (arr[row * h:(row + 1) * h, col * w:(col + 1) * w] == 40 * k).all()
    assert (arr[2 * h:, w:] == 0).all() # the empty sixth cell
    assert os.listdir(tmp_path) == ['grid.png'] # no temporary file left behind

def test_save_image_grid_accepts_float_images(tmp_path):
    path = tmp_path / 'g.png'
    save_image_grid(torch.zeros(4, 3, 2, 2) - 1, str(path))
    with PIL.Image.open(path) as im:
        assert im.size == (4, 4) and np.asarray(im).max() == 0

def test_save_scatter_png(tmp_path):
    path = tmp_path / 's.png'
    pts = np.array([[0.0, 0.0], [1.0, 2.0], [np.nan, 1.0]])
    save_scatter_png(pts, str(path))
    with PIL.Image.open(path) as im:
        assert im.size == (512, 512) and im.mode == 'RGB'
        arr = np.asarray(im)
    assert ((arr == (31, 119, 180)).all(axis=2)).sum() >= 8 # two 2x2 dots

def test_save_side_by_side_places_each_grid_and_a_grey_gap(tmp_path):
    left = torch.full([4, 1, 2, 3], 10, dtype=torch.uint8)
    right = torch.full([2, 1, 2, 3], 200, dtype=torch.uint8) # one row fewer: padded with black
    path = tmp_path / 'pair.png'
    save_side_by_side([left, right], str(path), grid_w=2, gap=5)
    with PIL.Image.open(path) as im:
        arr = np.asarray(im)
    assert arr.shape == (4, 6 + 5 + 6)
    assert (arr[:, :6] == 10).all() and (arr[:, 6:11] == 128).all()
    assert (arr[:2, 11:] == 200).all() and (arr[2:, 11:] == 0).all()

def test_save_curve_png_draws_series_and_reference_line(tmp_path):
    path = tmp_path / 'curve.png'
    save_curve_png({'student': ([0, 1, 2], [300.0, 100.0, 50.0])}, str(path),
        hlines={'teacher': 80.0}, xlabel='kimg', ylabel='FD', log_y=True)
    with PIL.Image.open(path) as im:
        arr = np.asarray(im)
    assert arr.shape == (440, 720, 3)
    blue = (arr == CURVE_COLOURS[0]).all(axis=2)
    red = (arr == CURVE_COLOURS[1]).all(axis=2)
    assert blue.sum() > 100 and red.sum() > 100
    # The dashed teacher line is horizontal: its pixels inside the frame share a few rows only.
    rows = np.nonzero(red[:, 100:400].any(axis=1))[0] # left of the legend
    assert rows.max() - rows.min() <= 2
    # On a log axis 80 lies between 50 and 100, i.e. below the middle point (100) on screen.
    mid_row = np.nonzero(blue[:, 360])[0].mean()
    assert rows.min() > mid_row

def test_curve_png_log_x_places_points_by_their_logarithm(tmp_path):
    path = tmp_path / 'curve.png'
    save_curve_png({'a': ([1, 10, 100], [5.0, 5.0, 5.0])}, str(path), log_x=True)
    with PIL.Image.open(path) as im:
        arr = np.asarray(im)
    blue = (arr == CURVE_COLOURS[0]).all(axis=2)[100:] # below the legend
    tall = np.nonzero(blue.sum(axis=0) >= 5)[0] # the dots are 7 px tall, the line 2 px
    groups = np.split(tall, np.nonzero(np.diff(tall) > 1)[0] + 1)
    centres = [g.mean() for g in groups]
    assert len(centres) == 3 and abs(centres[1] - (centres[0] + centres[2]) / 2) < 1.5

#----------------------------------------------------------------------------
# training_stats and distributed (single process, and two gloo processes).

def test_collector_moments(tmp_path):
    training_stats.reset()
    training_stats.report('a', torch.tensor([1.0, 2.0, 3.0]))
    training_stats.report('a', 4)
    training_stats.report('b', np.float32(5))
    training_stats.report('empty', torch.zeros(0))
    stats = training_stats.Collector(regex='a|empty').update().as_dict()
    assert set(stats) == {'a'}
    assert stats['a']['num'] == 4 and stats['a']['mean'] == pytest.approx(2.5)
    assert stats['a']['std'] == pytest.approx(np.std([1, 2, 3, 4]))
    # 'b' was left for another collector; 'a' starts afresh.
    stats = training_stats.default_collector.update().as_dict()
    assert set(stats) == {'b'} and stats['b'] == dict(num=1, mean=5.0, std=0.0)

    path = tmp_path / 'stats.jsonl'
    training_stats.append_jsonl(str(path), dict(kimg=1, x=torch.tensor(2.0), **stats))
    training_stats.append_jsonl(str(path), dict(kimg=2))
    lines = path.read_text().splitlines()
    assert [json.loads(line)['kimg'] for line in lines] == [1, 2]
    assert json.loads(lines[0])['b']['mean'] == 5.0 and json.loads(lines[0])['x'] == 2.0

def test_distributed_single_process_no_ops(monkeypatch):
    for name in ['RANK', 'WORLD_SIZE', 'LOCAL_RANK']:
        monkeypatch.delenv(name, raising=False)
    distributed.init()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and distributed.all_reduce_mean(t).tolist() == [1.0, 2.0]
    assert distributed.all_gather_object('x') == ['x']
    distributed.barrier()
    distributed.shutdown()

def _two_rank_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank),
        MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    distributed.init()
    # Ranks report different names and counts: the union must be reduced consistently.
    training_stats.report('shared', torch.full([rank + 1], float(rank)))
    training_stats.report(f'only{rank}', 10.0 * (rank + 1))
    stats = training_stats.default_collector.update().as_dict()
    t = torch.tensor([float(rank + 1)])
    distributed.all_reduce_mean(t)
    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight.fill_(rank)
    distributed.broadcast_module(module)
    result = dict(stats=stats, mean=t.item(), weight=module.weight.sum().item(),
        gathered=distributed.all_gather_object(rank * 10))
    with open(os.path.join(out_dir, f'{rank}.json'), 'w') as f:
        json.dump(result, f)
    distributed.shutdown()

def test_distributed_two_gloo_processes(tmp_path):
    torch.multiprocessing.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f'{r}.json').read_text()) for r in range(2)]
    for res in results:
        assert res['stats']['shared'] == dict(num=3, mean=pytest.approx(2 / 3), std=pytest.approx(np.std([0, 1, 1])))
        assert res['stats']['only0']['mean'] == 10 and res['stats']['only1']['mean'] == 20
        assert res['mean'] == 1.5 and res['weight'] == 0 and res['gathered'] == [0, 10]
