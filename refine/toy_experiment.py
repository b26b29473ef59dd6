"""One refinement run on a Gaussian-mixture preset, evaluated: what bench/gmm.py and the demo do.

Uses exactly refine.py's code path (options -> run.prepare -> the loop) in this process.
"""

import os
import time

import torch

import dnnlib
from refine import run, toy_metrics
from refine.sampling import save_scatter_png

def refine_preset(preset, outdir, divergence='di', kimg=300, seed=0, log=None, **overrides):
    """Refine an MLP generator on gmm:PRESET; returns the metrics before and after, and timing."""
    opts = dict(teacher=f'gmm:{preset}', gen='mlp', outdir=outdir, divergence=divergence, kimg=kimg,
        seed=seed, tick=max(kimg / 10, 1), snap=10 ** 9, allow_pickle_code=False, resume=None, dry_run=False)
    opts.update(overrides)
    o = run.resolve_options(opts)
    torch.manual_seed(seed)
    setup = run.prepare(o)
    before = toy_metrics.evaluate_generator(setup.G, setup.teacher, seed=seed)
    run_dir = os.path.join(outdir, f'{preset}-{divergence}')
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    result = run.launch(setup, run_dir, log=log or (lambda *_: None))
    seconds = time.time() - start
    after = toy_metrics.evaluate_generator(result.G_ema, setup.teacher, seed=seed)
    save_scatter_png(before['samples'][:, :2].numpy(), os.path.join(run_dir, 'before.png'))
    save_scatter_png(after['samples'][:, :2].numpy(), os.path.join(run_dir, 'after.png'))
    true = setup.teacher.sample(10000, generator=torch.Generator().manual_seed(seed + 1))
    save_scatter_png(true[:, :2].numpy(), os.path.join(run_dir, 'target.png'))
    return dnnlib.EasyDict(preset=preset, divergence=divergence, kimg=kimg, seconds=seconds,
        before=before, after=after, run_dir=run_dir)
