"""refine.py end to end: one-step distillation of a tiny EDM teacher, exact resume, generate.py
on its snapshot, and torchrun with 2 processes giving the same generator as 1."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import generate
from torch_utils import persistence, safe_pickle
from training import networks_edm, networks_generators
from tests.scripts import free_port, load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _load_cli():
    return load_script('refine.py', 'refine_cli')

@pytest.fixture(scope='module')
def teacher_pkl(tmp_path_factory):
    torch.manual_seed(0)
    net = networks_edm.EDMPrecond(img_resolution=8, img_channels=1, label_dim=2, model_type='SongUNet',
        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pkl'
    persistence.save_network_pkl(dict(ema=net.eval().requires_grad_(False)), path)
    return str(path)

def _refine(args):
    result = CliRunner().invoke(_load_cli().main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output

def _run_dir(outdir):
    dirs = sorted(glob.glob(os.path.join(outdir, '0*')))
    assert len(dirs) == 1
    return dirs[0]

def _final_G(run_dir):
    states = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))
    return torch.load(states[-1], weights_only=True)['G']

BASE = ['--gen', 'teacher', '--sigma-init', '2.5', '--batch', '8', '--lr', '1e-3', '--glr', '1e-3',
    '--tick', '0.008', '--snap', '2', '--seed', '3']

def test_distil_snapshot_resume_generate(teacher_pkl, tmp_path):
    # Uninterrupted: 4 iterations.
    out = _refine(['--teacher', teacher_pkl, '--outdir', str(tmp_path / 'a'), '--kimg', '0.032', *BASE])
    assert 'tick 4' in out
    run_a = _run_dir(tmp_path / 'a')
    assert os.path.isfile(os.path.join(run_a, 'stats.jsonl'))
    assert glob.glob(os.path.join(run_a, 'samples-*.png'))

    # Interrupted after 2 iterations, then resumed to the same length.
    _refine(['--teacher', teacher_pkl, '--outdir', str(tmp_path / 'b'), '--kimg', '0.016', *BASE])
    run_b = _run_dir(tmp_path / 'b')
    out = _refine(['--resume', run_b, '--kimg', '0.032'])
    assert 'Resuming' in out
    G_a, G_b = _final_G(run_a), _final_G(run_b)
    assert G_a.keys() == G_b.keys()
    assert all(torch.equal(G_a[k], G_b[k]) for k in G_a)
    # ... and training did change the generator.
    teacher = safe_pickle.load_network_pkl(teacher_pkl)['ema']
    assert not torch.equal(G_a['net.model.enc.8x8_conv.weight'], teacher.model.enc['8x8_conv'].weight)

    # The snapshot holds everything needed to use it, and loads safely.
    snap = sorted(glob.glob(os.path.join(run_a, 'network-snapshot-*.pkl')))[-1]
    data = safe_pickle.load_network_pkl(snap)
    assert isinstance(data['G_ema'], networks_generators.OneStepGenerator)
    assert data['G_ema'].sigma_init == 2.5 and data['sigma_init'] == 2.5
    assert data['ema'] is data['G_ema'].net # SiD/DI-style entry, stored once
    assert data['divergence']['name'] == 'di'

    # generate.py reads it.
    result = CliRunner().invoke(generate.main, ['--network', snap, '--outdir', str(tmp_path / 'img'),
        '--seeds', '0-3', '--batch', '2'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'img'))[:4] == ['000000.png', '000001.png', '000002.png', '000003.png']

def test_max_minutes_stops_at_a_tick_with_a_resumable_state(teacher_pkl, tmp_path):
    # A limit shorter than one iteration: the run stops at its first tick instead of 10 kimg,
    # writing the snapshot and the training state that the end of a run writes.
    out = _refine(['--teacher', teacher_pkl, '--outdir', str(tmp_path), '--kimg', '10', '--max-minutes', '1e-6', *BASE])
    assert 'tick 1 ' in out and 'tick 2 ' not in out
    run_dir = _run_dir(tmp_path)
    states = glob.glob(os.path.join(run_dir, 'training-state-*.pt'))
    assert len(states) == 1 and torch.load(states[0], weights_only=True)['cur_nimg'] == 8
    assert glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl'))
    with open(os.path.join(run_dir, 'options.json')) as f:
        assert 'max_minutes' not in json.load(f) # a limit of one invocation, not of the run
    out = _refine(['--resume', run_dir, '--kimg', '0.016'])
    assert 'Resuming' in out and 'tick 2 ' in out

def test_incompatible_generator_is_a_clean_error(teacher_pkl, tmp_path):
    other = networks_edm.EDMPrecond(img_resolution=16, img_channels=1, label_dim=2, model_type='SongUNet',
        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    gen_pkl = tmp_path / 'gen.pkl'
    persistence.save_network_pkl(dict(ema=other), gen_pkl)
    result = CliRunner().invoke(_load_cli().main, ['--teacher', teacher_pkl, '--gen', str(gen_pkl),
        '--sigma-init', '1', '--outdir', str(tmp_path)])
    assert result.exit_code != 0
    assert 'incompatible --gen and --teacher' in result.output and '(1, 16, 16)' in result.output
    assert not os.listdir(tmp_path).count('00000') and 'Traceback' not in result.output

def test_dry_run_prints_options_without_writing(teacher_pkl, tmp_path):
    out = _refine(['--teacher', teacher_pkl, '--outdir', str(tmp_path / 'x'), '--dry-run', *BASE])
    assert '"sigma_init": 2.5' in out and not os.path.exists(tmp_path / 'x')

def test_torchrun_two_processes_match_one(teacher_pkl, tmp_path):
    # Default learning rates: Adam's first steps move every weight by about ±lr whatever the
    # gradient's size, so at lr 1e-3 a rounding-level gradient of either sign would dominate.
    args = ['--teacher', teacher_pkl, '--kimg', '0.024', *BASE, '--lr', '1e-5', '--glr', '1e-5']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    # One process in 2 rounds of 4: the same parts as 2 processes x 4, so that the per-part
    # passes are the same computation (bf16 autocast, on by default where bf16 is native, rounds
    # differently for other batch shapes) and only the gradient sum's order differs.
    one = subprocess.run([sys.executable, 'refine.py', '--outdir', str(tmp_path / 'one'), '--batch-gpu', '4', *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
        f'--master_port={free_port()}', 'refine.py', '--outdir', str(tmp_path / 'two'), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert 'over 2 process(es)' in two.stdout
    G1, G2 = _final_G(_run_dir(tmp_path / 'one')), _final_G(_run_dir(tmp_path / 'two'))
    worst = max(float((G1[k] - G2[k]).abs().max() / G1[k].abs().max().clamp(min=1e-12)) for k in G1)
    print(f'largest relative difference, 2 processes vs 1: {worst:.2e}')
    assert worst < 1e-5
    start = safe_pickle.load_network_pkl(teacher_pkl)['ema'].state_dict()
    assert any(not torch.equal(G1['net.' + k], v) for k, v in start.items()) # it did train

def test_refine_on_ring8_reduces_mmd_tenfold_and_covers_every_mode(tmp_path):
    """The whole CLI path on an exact 2-D teacher: data-free DI must find all 8 modes."""
    _refine(['--teacher', 'gmm:ring8', '--gen', 'mlp', '--outdir', str(tmp_path), '--kimg', '300',
        '--tick', '100', '--seed', '0'])
    from refine import teachers, toy_metrics # pylint: disable=import-outside-toplevel
    teacher = teachers.make_gmm('ring8')
    snap = sorted(glob.glob(os.path.join(_run_dir(tmp_path), 'network-snapshot-*.pkl')))[-1]
    data = safe_pickle.load_network_pkl(snap)
    from refine import run # pylint: disable=import-outside-toplevel
    torch.manual_seed(0) # as refine.py does before building anything
    start = run.prepare(run.resolve_options(dict(teacher='gmm:ring8', gen='mlp', divergence=None,
        allow_pickle_code=False))).G
    before = toy_metrics.evaluate_generator(start, teacher, n=5000)
    after = toy_metrics.evaluate_generator(data['G_ema'], teacher, n=5000)
    assert before['mmd'] / after['mmd'] >= 10, (before['mmd'], after['mmd'])
    assert after['covered'] == 8

def test_metrics_at_snapshots(teacher_pkl, tmp_path):
    """--metrics runs the registry on each snapshot's G_ema and appends metric-<name>.jsonl."""
    import json # pylint: disable=import-outside-toplevel
    from PIL import Image # pylint: disable=import-outside-toplevel
    ref = tmp_path / 'ref'
    ref.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        pixels = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, 'L').save(ref / f'{i:03d}.png')
    out = _refine(['--teacher', teacher_pkl, '--outdir', str(tmp_path / 'run'), '--kimg', '0.016',
        *BASE, '--metrics', 'fd16', '--metric-ref', str(ref)])
    assert 'fd16 at 0.016 kimg' in out
    lines = open(os.path.join(_run_dir(tmp_path / 'run'), 'metric-fd16.jsonl')).read().splitlines()
    record = json.loads(lines[-1])
    assert record['metric'] == 'fd16' and record['results']['fd16'] > 0 and record['kimg'] == 0.016
    assert record['snapshot_pkl'].startswith('network-snapshot-')

def test_unknown_metric_is_a_clean_error(teacher_pkl, tmp_path):
    result = CliRunner().invoke(_load_cli().main, ['--teacher', teacher_pkl, '--outdir', str(tmp_path),
        *BASE, '--metrics', 'fidd10k', '--metric-ref', str(tmp_path)])
    assert result.exit_code != 0 and "unknown metric 'fidd10k'" in result.output
    assert 'Traceback' not in result.output

def test_lr_steps_scale_every_rate_and_can_be_added_on_resume(teacher_pkl, tmp_path):
    args = ['--teacher', teacher_pkl, '--kimg', '0.032', *BASE]
    # A step at 0 kimg with factor 0.5 on twice the rates is the plain run at the rates (halving is exact).
    _refine([*args, '--outdir', str(tmp_path / 'plain')])
    doubled = [a if a != '1e-3' else '2e-3' for a in args]
    _refine([*doubled, '--outdir', str(tmp_path / 'halved'), '--lr-steps', '0:0.5'])
    G_plain, G_halved = _final_G(_run_dir(tmp_path / 'plain')), _final_G(_run_dir(tmp_path / 'halved'))
    assert all(torch.equal(G_plain[k], G_halved[k]) for k in G_plain)

    # A step half-way, from the start or added when resuming there: the same run, bit for bit.
    _refine([*args, '--outdir', str(tmp_path / 'step'), '--lr-steps', '0.016:0.25'])
    _refine([*args[:2], '--kimg', '0.016', *BASE, '--outdir', str(tmp_path / 'late')])
    late = _run_dir(tmp_path / 'late')
    out = _refine(['--resume', late, '--kimg', '0.032', '--lr-steps', '0.016:0.25', '--batch', '4'])
    assert 'Warning: --batch ignored with --resume' in out
    G_step, G_late = _final_G(_run_dir(tmp_path / 'step')), _final_G(late)
    assert all(torch.equal(G_step[k], G_late[k]) for k in G_step)
    assert not all(torch.equal(G_step[k], G_plain[k]) for k in G_step) # the step changed the run
    with open(os.path.join(late, 'options.json')) as f:
        assert json.load(f)['lr_steps'] == '0.016:0.25' # kept for the next --resume
    with open(os.path.join(late, 'stats.jsonl')) as f:
        factors = [json.loads(line)['lr_factor'] for line in f]
    assert factors == [1.0, 1.0, 0.25, 0.25]

def test_restart_from_ema_continues_the_generator_from_its_ema_at_each_step(teacher_pkl, tmp_path):
    args = ['--teacher', teacher_pkl, *BASE, '--lr-steps', '0.016:0.25']
    _refine([*args, '--kimg', '0.032', '--restart-from-ema', '--outdir', str(tmp_path / 'restart')])
    assert 'the generator continues from its EMA' in open(os.path.join(_run_dir(tmp_path / 'restart'), 'log.txt')).read()
    # The independent computation: stop at the step, put G_ema into G by hand, continue without the flag.
    _refine([*args, '--kimg', '0.016', '--outdir', str(tmp_path / 'by_hand')])
    by_hand = _run_dir(tmp_path / 'by_hand')
    state_path = sorted(glob.glob(os.path.join(by_hand, 'training-state-*.pt')))[-1]
    state = torch.load(state_path, weights_only=True)
    assert not all(torch.equal(state['G'][k], state['G_ema'][k]) for k in state['G'])
    state['G'] = {k: v.clone() for k, v in state['G_ema'].items()}
    torch.save(state, state_path)
    _refine(['--resume', by_hand, '--kimg', '0.032'])
    G_restart, G_by_hand = _final_G(_run_dir(tmp_path / 'restart')), _final_G(by_hand)
    assert all(torch.equal(G_restart[k], G_by_hand[k]) for k in G_restart)
    # Added when resuming at the step, it gives the same run.
    _refine([*args, '--kimg', '0.016', '--outdir', str(tmp_path / 'late')])
    late = _run_dir(tmp_path / 'late')
    _refine(['--resume', late, '--kimg', '0.032', '--restart-from-ema'])
    G_late = _final_G(late)
    assert all(torch.equal(G_restart[k], G_late[k]) for k in G_restart)

@pytest.mark.parametrize('value, message', [('30', 'KIMG:FACTOR'), ('30:0', 'FACTOR > 0'),
    ('30:0.2,10:0.1', 'must increase'), ('a:b', 'KIMG:FACTOR'), ('30:nan', 'KIMG:FACTOR')])
def test_bad_lr_steps_are_one_line_errors(teacher_pkl, tmp_path, value, message):
    result = CliRunner().invoke(_load_cli().main, ['--teacher', teacher_pkl, '--outdir', str(tmp_path),
        '--lr-steps', value])
    assert result.exit_code != 0 and '--lr-steps' in result.output and message in result.output
    assert 'Traceback' not in result.output and not os.listdir(tmp_path)

def test_raw_reads_the_trained_generator_of_a_snapshot(teacher_pkl, tmp_path):
    from refine import generation # pylint: disable=import-outside-toplevel
    _refine(['--teacher', teacher_pkl, '--outdir', str(tmp_path), '--kimg', '0.016', *BASE])
    snap = sorted(glob.glob(os.path.join(_run_dir(tmp_path), 'network-snapshot-*.pkl')))[-1]
    data = safe_pickle.load_network_pkl(snap)
    as_ema = tmp_path / 'g-as-ema.pkl' # the independent path: the raw G saved where G_ema goes
    persistence.save_network_pkl(dict(G_ema=data['G'], sigma_init=data['sigma_init']), as_ema)
    raw, _ = generation.load_for_generation(snap, raw=True)
    expected, _ = generation.load_for_generation(str(as_ema))
    ema, _ = generation.load_for_generation(snap)
    assert torch.equal(raw([0, 1, 2], 1), expected([0, 1, 2], 1))
    assert not torch.equal(raw([0, 1, 2], 1), ema([0, 1, 2], 1))
    result = CliRunner().invoke(generate.main, ['--network', teacher_pkl, '--outdir', str(tmp_path / 'img'),
        '--seeds', '0', '--raw'])
    assert result.exit_code != 0 and '--raw' in result.output and "no raw generator 'G'" in result.output
    assert 'Traceback' not in result.output
