"""What a run folder must survive: kill -9 (exact resume, no stale temporary files, no duplicate
statistics), sub-kimg ticks (every snapshot kept), and NaN/inf (a clean stop that saves nothing
non-finite, after which the last good state resumes)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from refine import run, teachers
from torch_utils import train_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# gmm:ring8 with an MLP: ticks of 0.256 kimg, a snapshot and state every tick.
ARGS = ['--teacher', 'gmm:ring8', '--gen', 'mlp', '--batch', '64', '--tick', '0.256', '--snap', '1', '--seed', '5']

def _refine(*args, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'refine.py'), *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        return out
    return proc

def _run_dir(outdir):
    (name,) = [d for d in os.listdir(outdir) if d[:5].isdigit()]
    return os.path.join(outdir, name)

def _records(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]

def test_kill_9_then_resume_is_exact_and_leaves_a_clean_folder(tmp_path):
    _refine(*ARGS, '--kimg', '2.048', '--outdir', str(tmp_path / 'a'))
    whole = _run_dir(tmp_path / 'a')

    proc = _refine(*ARGS, '--kimg', '2.048', '--outdir', str(tmp_path / 'b'), wait=False)
    deadline = time.time() + 240
    while time.time() < deadline: # kill it once a few states exist, mid-run
        if (tmp_path / 'b').exists() and os.listdir(tmp_path / 'b'):
            states = train_utils.numbered_files(_run_dir(tmp_path / 'b'), 'training-state', 'pt')
            if len(states) >= 3:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cut = _run_dir(tmp_path / 'b')
    # What a kill during a save leaves: a temporary file of a dead process (and one of a live
    # process, which must be kept), and maybe a record beyond the last state.
    dead = os.path.join(cut, 'training-state-000001.tmp-999999999')
    live = os.path.join(cut, f'network-snapshot-000009.pkl.tmp-{os.getpid()}-abcdef12')
    for path in (dead, live):
        with open(path, 'wb') as f:
            f.write(b'partial')
    _refine('--resume', cut)

    assert not os.path.exists(dead) and os.path.exists(live)
    a = torch.load(train_utils.latest_training_state(whole), weights_only=True)
    b = torch.load(train_utils.latest_training_state(cut), weights_only=True)
    assert a['cur_nimg'] == b['cur_nimg'] == 2048
    for key in ('G', 'G_ema', 'fake'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # NVlabs' training_stats layout beside our flat keys, for their log readers.
    record = _records(whole)[-1]
    assert record['Progress/kimg'] == dict(num=1, mean=2.048, std=0.0) and record['Progress/tick']['mean'] == 8
    assert set(record['Loss/fake']) == {'num', 'mean', 'std'} and 'Loss/gen' in record and record['timestamp'] > 1e9
    assert record['Timing/sec_per_kimg']['mean'] == record['sec_per_kimg']
    ticks = [r['tick'] for r in _records(cut)]
    assert ticks == list(range(1, len(ticks) + 1)) == [r['tick'] for r in _records(whole)]
    # Ticks of 0.256 kimg: 8 snapshots, none overwritten by the next one in the same kimg.
    snaps = [os.path.basename(p) for _, p in train_utils.numbered_files(whole, 'network-snapshot', 'pkl')]
    assert snaps == ['network-snapshot-000000_256.pkl', 'network-snapshot-000000_512.pkl',
        'network-snapshot-000000_768.pkl', 'network-snapshot-000001.pkl', 'network-snapshot-000001_280.pkl',
        'network-snapshot-000001_536.pkl', 'network-snapshot-000001_792.pkl', 'network-snapshot-000002.pkl']
    assert len(train_utils.numbered_files(whole, 'training-state', 'pt')) == 8
    assert sorted(os.listdir(whole)) == sorted(os.listdir(whole), key=lambda n: (n.split('-')[0], n)) # name order = kimg order
    assert snaps == sorted(snaps)

def test_snapshot_tags_never_repeat():
    # Any tick length, any batch: the tags of consecutive tick ends are distinct.
    for batch in (1, 7, 32, 96):
        for tick in (0.05, 0.256, 1.0, 2.5):
            ends, nimg, start, tags = [], 0, 0, []
            while nimg < 6000:
                nimg += batch
                if nimg >= start + tick * 1000:
                    tags.append(train_utils.snapshot_tag(nimg, start))
                    start = nimg
            assert len(tags) == len(set(tags)), (batch, tick)
    assert train_utils.snapshot_tag(2048, 1024) == '000002'
    assert train_utils.snapshot_tag(2560, 2048) == '000002_560'

def test_truncated_latest_state_falls_back_to_the_newest_complete_one(tmp_path):
    _refine(*ARGS, '--kimg', '0.768', '--outdir', str(tmp_path / 'r'))
    run_dir = _run_dir(tmp_path / 'r')
    states = [p for _, p in train_utils.numbered_files(run_dir, 'training-state', 'pt')]
    with open(states[-1], 'rb') as f:
        data = f.read()
    with open(states[-1], 'wb') as f:
        f.write(data[:len(data) // 2])
    messages = []
    assert train_utils.latest_training_state(run_dir, log=messages.append) == states[-2]
    assert 'truncated' in messages[0] and os.path.basename(states[-1]) in messages[0]
    out = _refine('--resume', run_dir, '--kimg', '1.024')
    assert 'Skipping' in out and f'Resuming from {states[-2]}' in out

#----------------------------------------------------------------------------
# Non-finite values.

class NaNAfterCalls(teachers.GMMTeacher):
    """The ring8 teacher, returning NaN for large σ once it has been called `after` times."""
    calls = 0
    after = 6 # iterations: 2 per tick, the first snapshot at tick 2

    def forward(self, x, sigma, class_labels=None, **kwargs):
        out = super().forward(x, sigma, class_labels, **kwargs)
        NaNAfterCalls.calls += 1
        if NaNAfterCalls.calls > NaNAfterCalls.after:
            sigma = torch.as_tensor(sigma, dtype=out.dtype).reshape(-1, *[1] * (out.ndim - 1)).expand(out.shape[0], 1)
            out = torch.where(sigma > 0.5, torch.full_like(out, float('nan')), out)
        return out

def _options(outdir, **overrides):
    o = run.resolve_options(dict(dict(teacher='gmm:ring8', gen='mlp', batch=64, kimg=1.28, tick=0.128,
        snap=2, seed=1, allow_pickle_code=False, outdir=str(outdir)), **overrides))
    torch.manual_seed(o.seed)
    return o

def _all_finite(run_dir):
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.endswith('.pt'):
            state = torch.load(path, weights_only=True)
            tensors = [t for key in ('G', 'G_ema', 'fake') for t in state[key].values()]
        elif name.endswith('.pkl'):
            from torch_utils import safe_pickle # pylint: disable=import-outside-toplevel
            data = safe_pickle.load_network_pkl(path)
            tensors = [t for key in ('G', 'G_ema', 'fake') for t in data[key].state_dict().values()]
        else:
            continue
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), name

@pytest.mark.parametrize('cause', ['teacher', 'learning-rate'])
def test_non_finite_stops_cleanly_and_the_last_good_state_resumes(tmp_path, cause):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    if cause == 'teacher':
        o = _options(tmp_path)
        setup = run.prepare(o)
        setup.teacher.__class__ = NaNAfterCalls
        NaNAfterCalls.calls = 0
    else:
        o = _options(tmp_path, glr=1e30, lr=1e30)
        setup = run.prepare(o)
    with pytest.raises(train_utils.NonFiniteError) as info:
        run.launch(setup, str(run_dir), log=lambda *_: None)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and 'non-finite' in message and 'at tick' in message
    _all_finite(run_dir)
    states = train_utils.numbered_files(str(run_dir), 'training-state', 'pt')
    if cause == 'teacher':
        # It stopped after at least one good snapshot, which the message names.
        assert states and os.path.basename(train_utils.numbered_files(str(run_dir), 'network-snapshot', 'pkl')[-1][1]) in message
        o = _options(tmp_path, kimg=states[-1][0] + 0.256)
        setup = run.prepare(o) # a healthy teacher: the run continues from the last good state
        result = run.launch(setup, str(run_dir), resume_state=states[-1][1], log=lambda *_: None)
        assert result.cur_nimg > round(states[-1][0] * 1000)
        _all_finite(run_dir)
    else:
        assert 'last good snapshot: none' in message and not states

def test_run_folders_made_by_the_library_resume_with_refine_py(tmp_path):
    # demo.py and the bench scripts make their folders with run.make_run_dir / run.save_options.
    demo = open(os.path.join(ROOT, 'demo.py')).read()
    assert 'run.make_run_dir(' in demo
    o = _options(tmp_path, kimg=0.256)
    setup = run.prepare(o)
    run_dir = run.make_run_dir(o, 'library-made')
    run.launch(setup, run_dir, log=lambda *_: None)
    out = _refine('--resume', run_dir, '--kimg', '0.512')
    assert 'Resuming from' in out and 'Finished at 0.512 kimg' in out
    assert os.path.isfile(os.path.join(run_dir, 'log.txt'))
