"""Fingerprints of tiny data-free runs, to show that the optional real-data terms (`--data`)
change nothing when they are not asked for.

`python -m tests.real_data_golden` writes tests/data/data_free_golden.json; it was run once
with the code as it was before the real-data terms existed (commit 578238f), so
tests/test_real_data_terms.py compares today's data-free runs with that code's, bit for bit,
on the same torch build, machine type and CPU capability (float32 kernels round differently
for AVX2 and AVX-512), one entry per build it was run on; elsewhere the comparison is skipped.
"""

import hashlib
import json
import os
import platform
import sys
import tempfile

import torch

from refine import run
from torch_utils import persistence
from training import networks_edm

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'data_free_golden.json')
DIVERGENCES = ('di', 'sid', 'dmd', 'sim', 'fdiv', 'vardiu')

def tiny_teacher(path):
    torch.manual_seed(0)
    net = networks_edm.EDMPrecond(img_resolution=8, img_channels=1, label_dim=2, model_type='SongUNet',
        model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    persistence.save_network_pkl(dict(ema=net.eval().requires_grad_(False)), path)
    return path

def digest_state(state):
    """sha256 over every tensor of a (nested) state dict, in key order."""
    h = hashlib.sha256()
    def feed(value, key=''):
        if isinstance(value, torch.Tensor):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                feed(value[k], f'{key}/{k}')
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                feed(v, f'{key}/{i}')
        elif isinstance(value, (int, float, str, bool)) or value is None:
            h.update(f'{key}={value!r}'.encode())
    feed(state)
    return h.hexdigest()

def tiny_run(divergence, workdir, teacher_pkl, **extra):
    """Three iterations of 4 samples; returns {part of the final training state: digest}."""
    if divergence == 'vardiu' and 'div_opt' not in extra:
        # The fingerprint was made with VarDiU's MLP encoder, the only one then; image
        # generators now get a convolutional encoder by default (refine/divergences/vardiu.py).
        extra['div_opt'] = dict(encoder='mlp')
    # The fingerprint predates sample reuse, bf16 autocast, the fused norm kernel and NHWC
    # layout by default: the computation then.
    extra = {'reuse_samples': False, 'amp': 'off', 'fused_norm': False, 'channels_last': False, **extra}
    o = run.resolve_options(dict(teacher=teacher_pkl, gen='teacher', divergence=divergence, batch=4,
        lr=1e-3, glr=1e-3, kimg=0.012, tick=0.004, snap=3, seed=5, allow_pickle_code=False, **extra))
    torch.manual_seed(o.seed)
    setup = run.prepare(o)
    run_dir = os.path.join(workdir, divergence)
    os.makedirs(run_dir)
    run.launch(setup, run_dir, log=lambda *_: None)
    states = sorted(f for f in os.listdir(run_dir) if f.startswith('training-state-'))
    state = torch.load(os.path.join(run_dir, states[-1]), weights_only=True)
    return {key: digest_state(value) for key, value in sorted(state.items())}

def cpu_vendor():
    # Intel's and AMD's cores run different oneDNN kernels at the same capability level, so their
    # float32 bits differ: a build's digests hold for one vendor.
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('vendor_id')), platform.processor())
    except OSError:
        return platform.processor()

def environment():
    return dict(torch=torch.__version__, machine=platform.machine(), cpu=torch.backends.cpu.get_cpu_capability(),
        vendor=cpu_vendor())

def saved_runs():
    """(environment, runs) of every build GOLDEN holds."""
    with open(GOLDEN, encoding='utf-8') as f:
        return [(b['environment'], b['runs']) for b in json.load(f)['builds']]

def main():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = tiny_teacher(os.path.join(tmp, 'teacher.pkl'))
        runs = {name: tiny_run(name, tmp, teacher) for name in DIVERGENCES}
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    builds = [dict(environment=e, runs=r) for e, r in (saved_runs() if os.path.exists(GOLDEN) else [])
        if e != environment()]
    with open(GOLDEN, 'w', encoding='utf-8') as f:
        json.dump(dict(builds=builds + [dict(environment=environment(), runs=runs)]), f, indent=1)
    print(f'wrote {GOLDEN}', file=sys.stderr)

if __name__ == '__main__':
    main()
