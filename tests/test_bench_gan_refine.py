"""bench/gan_refine.py end to end on a tiny StyleGAN2 and teacher: the refined pickle moves G_ema,
the grids show the same latents before and after, and result.json records the run."""

import json
import os

import torch
from click.testing import CliRunner
from PIL import Image

from torch_utils import safe_pickle
from tests.scripts import load_script
from tests.test_stylegan_refine import C_DIM, RES, pickles # pylint: disable=unused-import

def _load_bench():
    return load_script('bench/gan_refine.py', 'gan_refine')

def test_gan_refine_runs_and_writes_grids_and_result(pickles, tmp_path): # pylint: disable=redefined-outer-name
    bench = _load_bench()
    result = CliRunner().invoke(bench.main, ['--gan', pickles['gan'], '--teacher', pickles['teacher'],
        '--outdir', str(tmp_path), '--kimg', '0.008', '--batch', '4', '--tick', '0.004', '--fake-warmup', '0.004',
        '--metrics', 'none'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir, = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    info = json.load(open(os.path.join(run_dir, 'result.json')))
    assert info['kimg'] == 0.008 and info['glr'] == 2e-3 and info['fake_warmup'] == 0.004
    refined = info['refined']
    gan_G = safe_pickle.load_network_pkl(pickles['gan'])['G_ema'].state_dict()
    new_G = safe_pickle.load_network_pkl(refined)['G_ema'].state_dict()
    assert any(not torch.equal(gan_G[k], new_G[k]) for k in gan_G if gan_G[k].is_floating_point())

    # Grids: one row of 10 per class, the same latents and constant noise, so the same pickle
    # gives the same grid and the refined one a different grid of the same shape.
    device = torch.device('cpu')
    before, again, after = (bench.class_grid(p, device) for p in (pickles['gan'], pickles['gan'], refined))
    assert before.shape == after.shape == (10 * C_DIM, 1, RES, RES)
    assert torch.equal(before, again) and not torch.equal(before, after)
    sizes = {name: Image.open(os.path.join(run_dir, f'{name}.png')).size for name in ('before', 'after', 'before-after')}
    assert sizes['before'] == sizes['after'] and sizes['before-after'][0] > 2 * sizes['before'][0] - 1

def test_gan_refine_names_a_missing_pickle(tmp_path):
    result = CliRunner().invoke(_load_bench().main, ['--gan', str(tmp_path / 'nope.pkl'), '--metrics', 'none'])
    assert result.exit_code != 0 and 'nope.pkl: no such file' in result.output and '--gan' in result.output
    assert 'Traceback' not in result.output
