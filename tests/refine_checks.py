"""Shared by the teacher-type tests: a short refine.py run through a teacher that snapshots,
resumes exactly and generates (tests/test_networks_edm2.py, tests/test_teachers_diffusers.py)."""

import glob
import os

import PIL.Image
import torch
from click.testing import CliRunner

import generate
from refine import teachers
from tests.scripts import load_script
from torch_utils import safe_pickle

# 2 iterations of 4 samples, one per tick, a snapshot every tick.
BASE = ['--gen', 'teacher', '--sigma-init', '2.5', '--batch', '4', '--lr', '1e-3', '--glr', '1e-3',
    '--tick', '0.004', '--snap', '1', '--seed', '1']

def run_refine(args):
    result = CliRunner().invoke(load_script('refine.py', 'refine_cli').main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output

def only(pattern):
    found = sorted(glob.glob(pattern))
    assert found, pattern
    return found

def refine_snapshot_resume_generate(teacher_spec, tmp_path, image_size, net_type, extra_args=()):
    """A 2-iteration run, and the same run stopped after 1 and resumed: equal generators. The
    last snapshot loads safely with a G_ema around `net_type`, and generate.py writes
    image_size x image_size PNGs from it. Returns (snapshot path, its data, the PNG folder)."""
    run_refine(['--teacher', teacher_spec, '--outdir', str(tmp_path / 'a'), '--kimg', '0.008', *BASE, *extra_args])
    run_refine(['--teacher', teacher_spec, '--outdir', str(tmp_path / 'b'), '--kimg', '0.004', *BASE, *extra_args])
    run_b = only(str(tmp_path / 'b' / '0*'))[0]
    assert 'Resuming' in run_refine(['--resume', run_b, '--kimg', '0.008', *extra_args])
    run_a = only(str(tmp_path / 'a' / '0*'))[0]
    finals = [torch.load(only(os.path.join(r, 'training-state-*.pt'))[-1], weights_only=True)['G'] for r in (run_a, run_b)]
    assert finals[0].keys() == finals[1].keys() and all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    start = teachers.load_teacher(teacher_spec).net.state_dict()
    assert any(not torch.equal(finals[0]['net.' + k], v.float()) for k, v in start.items()) # it trained

    snap = only(os.path.join(run_a, 'network-snapshot-*.pkl'))[-1]
    data = safe_pickle.load_network_pkl(snap)
    assert isinstance(data['G_ema'].net, net_type) and isinstance(data['fake'], net_type)
    assert only(os.path.join(run_a, 'samples-*.png'))
    out = tmp_path / 'img'
    result = CliRunner().invoke(generate.main, ['--network', snap, '--outdir', str(out), '--seeds', '0-3',
        '--batch', '2'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    images = [PIL.Image.open(p) for p in only(str(out / '*.png'))]
    assert len(images) == 4 and all(im.size == (image_size, image_size) for im in images)
    return snap, data, out
