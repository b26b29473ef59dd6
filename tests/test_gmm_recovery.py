"""End to end on a user's mixture: refine.py --teacher gmm:FILE.json must improve the unbiased
MMD^2 tenfold and recover the weights (TV <= 0.05, every component within 30%); the per-tick
metrics callback and the scatter PNG with the teacher's ellipses."""

import glob
import json
import os

import numpy as np
import PIL.Image
import pytest
import scipy.stats
import torch
from click.testing import CliRunner

import dnnlib
from refine import run, teachers, toy_metrics
from refine.plots import _nice_ticks, save_scatter_png
from tests.scripts import load_script
from torch_utils import safe_pickle

# Three 2-D components, unequal weights (5:3:2) and widths.
MIXTURE = dict(means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], stds=[0.4, 0.3, 0.5], weights=[0.5, 0.3, 0.2])

def _bayes_masses(x, spec):
    """Bayes-cell masses computed here with scipy, independently of toy_metrics."""
    logs = np.stack([np.log(w) + scipy.stats.multivariate_normal(m, s * s * np.eye(2)).logpdf(x)
        for m, s, w in zip(spec['means'], spec['stds'], np.array(spec['weights']) / sum(spec['weights']))], axis=1)
    return np.bincount(logs.argmax(1), minlength=len(spec['means'])) / len(x)

def test_json_mixture_run_recovers_weights_and_improves_unbiased_mmd(tmp_path):
    path = tmp_path / 'three.json'
    path.write_text(json.dumps(MIXTURE))
    spec = f'gmm:{path}'
    result = CliRunner().invoke(load_script('refine.py', 'refine_cli').main, ['--teacher', spec, '--gen', 'mlp',
        '--outdir', str(tmp_path / 'runs'), '--kimg', '30', '--tick', '15', '--seed', '0'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir, = glob.glob(str(tmp_path / 'runs' / '0*'))
    snap = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1]
    G = safe_pickle.load_network_pkl(snap)['G_ema']
    torch.manual_seed(0) # refine.py's initial generator
    start = run.prepare(run.resolve_options(dict(teacher=spec, gen='mlp', allow_pickle_code=False))).G
    teacher = teachers.load_teacher(spec)
    z = torch.randn(6000, *G.z_shape, generator=torch.Generator().manual_seed(1))
    assert tuple(start.z_shape) == tuple(G.z_shape) == (3,) # two data dimensions and the slot coordinate
    y = teacher.sample(6000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, after = toy_metrics.mmd_rbf_unbiased(start(z), y), toy_metrics.mmd_rbf_unbiased(G(z), y)
        x = G(z).numpy()
    assert before >= 10 * after, (before, after)
    masses = _bayes_masses(x, MIXTURE)
    np.testing.assert_allclose(toy_metrics.component_masses(torch.from_numpy(x), teacher)['masses'], masses, atol=1e-12)
    weights = np.array(MIXTURE['weights'])
    assert 0.5 * np.abs(masses - weights).sum() <= 0.05, masses
    assert (np.abs(masses / weights - 1) <= 0.3).all(), masses

def test_tick_logger_records_and_writes_jsonl(tmp_path):
    teacher = teachers.GMMTeacher(MIXTURE['means'], std=MIXTURE['stds'], weights=MIXTURE['weights'])
    class Exact(torch.nn.Module): # a "generator" that returns exact samples of component 0 only
        z_shape = (2,)
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros([]))
        def forward(self, z):
            return teacher.means[0].float() + 0.4 * z
    lines = []
    logger = toy_metrics.TickLogger(teacher, n=500, log=lines.append)
    logger(dnnlib.EasyDict(G_ema=Exact(), cur_nimg=2048, run_dir=str(tmp_path)))
    record, = [json.loads(line) for line in open(tmp_path / 'gmm-metrics.jsonl')]
    assert record == logger.records[0] and record['kimg'] == 2.048
    assert record['covered'] == 1 and record['modes'] == 3
    assert record['weight_tv'] == pytest.approx(0.5, abs=0.02) and record['worst'] == 1
    assert record['mmd2_unbiased'] > 0.05 and 'weight TV 0.4' in lines[0] and '\n' not in lines[0]

def test_scatter_png_draws_component_ellipses_under_samples_and_round_ticks(tmp_path):
    teacher = teachers.GMMTeacher([[0.0, 0.0], [10.0, 0.0]], std=[1.0, 0.5])
    path = str(tmp_path / 's.png')
    save_scatter_png(np.array([[0.0, 0.0]]), path, components=teacher)
    arr = np.asarray(PIL.Image.open(path))
    orange = (arr == (255, 127, 14)).all(axis=2)
    assert orange.sum() > 200 # two ellipse outlines drawn
    # The window fits the ellipses, not just the one sample: the right one's outline (x = 9..11) shows.
    cols = np.nonzero(orange.any(axis=0))[0]
    assert cols.max() - cols.min() > 300
    # The sample dot is drawn over everything.
    assert ((arr == (31, 119, 180)).all(axis=2)).sum() >= 4
    # Round tick values: spans of any size get 1/2/5 x 10^k steps.
    for lo, hi in [(-3.37, 12.9), (0.0013, 0.0071), (-400, 250)]:
        ticks = [t for t, _ in _nice_ticks(lo, hi)]
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** np.floor(np.log10(step))
        assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6 and 3 <= len(ticks) <= 11
        assert all(lo <= t <= hi for t in ticks)
        assert all(abs(t / step - round(t / step)) < 1e-6 for t in ticks)

def test_bench_gmm_weights_prints_tv_and_masses_for_every_divergence(tmp_path):
    path = tmp_path / 'three.json'
    path.write_text(json.dumps(MIXTURE))
    bench = load_script('bench/gmm_weights.py', 'bench_gmm_weights')
    divergences = 'di,sid,dmd,sim,fdiv,vardiu'
    result = CliRunner().invoke(bench.main, ['--teachers', f'gmm:{path}', '--divergences', divergences,
        '--kimg', '0.3', '--eval-n', '400', '--mass-n', '20000', '--outdir', str(tmp_path / 'out'), '--reference'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.output
    for name in ['reference (SW fit)'] + divergences.split(','):
        row = next(line for line in out.splitlines() if line.startswith(f'| {name} | three.json |'))
        tv, exact_tv = float(row.split('|')[7]), float(row.split('|')[8])
        assert 0 <= tv <= 1 and 0 <= exact_tv < 0.02 # an exact sampler's TV on 20k samples: noise only
        masses = next(line for line in out.splitlines() if line.startswith(f"{name.split(' ')[0]} on three.json: mass/weight"))
        assert len(masses.split(': ')[-1].split()) == 3
    assert os.path.isfile(tmp_path / 'out' / 'three-di' / 'after.png')
    bad = CliRunner().invoke(bench.main, ['--teachers', f'gmm:{tmp_path}/none.json'])
    assert bad.exit_code != 0 and 'none.json' in bad.output
