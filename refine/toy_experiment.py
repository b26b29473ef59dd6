"""One refinement run on a Gaussian-mixture preset, evaluated: what bench/gmm.py and the demo do.

Uses exactly refine.py's code path (options -> run.prepare -> the loop) in this process.
With `curve_every`, the loop's `on_tick` hook evaluates the EMA generator's MMD every that many
kimg on `curve_n` samples, which gives the learning curve and the training time (evaluation time
excluded) to reach twice the noise floor of the same sample size.
"""

import os
import time

import torch

import dnnlib
from refine import run, toy_metrics
from refine.plots import save_scatter_png

def noise_floor(teacher, n, seed=0, pairs=3):
    """Mean MMD between independent exact sample sets of size n (what a perfect student scores)."""
    values = []
    for k in range(pairs):
        a = teacher.sample(n, generator=torch.Generator().manual_seed(seed + 1000 + 2 * k))
        b = teacher.sample(n, generator=torch.Generator().manual_seed(seed + 1001 + 2 * k))
        values.append(toy_metrics.mmd_rbf(a, b))
    return sum(values) / len(values)

class CurveRecorder:
    """on_tick callback: MMD of G_ema at each tick against a fixed reference set, and the
    training seconds so far (wall time minus the time spent in this callback)."""
    def __init__(self, teacher, n, seed=0):
        self.n, self.seed = n, seed
        self.reference = teacher.sample(n, generator=torch.Generator().manual_seed(seed + 1))
        self.floor = noise_floor(teacher, n, seed)
        self.points = [] # (kimg, train_seconds, mmd)
        self.start = time.time()
        self.eval_seconds = 0.0

    def __call__(self, info):
        t0 = time.time()
        with torch.no_grad():
            z = torch.randn([self.n, *info.G_ema.z_shape], generator=torch.Generator().manual_seed(self.seed))
            x = info.G_ema(z).cpu()
        mmd = toy_metrics.mmd_rbf(x, self.reference)
        self.points.append((info.cur_nimg / 1e3, t0 - self.start - self.eval_seconds, mmd))
        self.eval_seconds += time.time() - t0

    def first_below(self, factor=2.0):
        """(kimg, train_seconds) of the first evaluation with MMD <= factor x floor, or None."""
        for kimg, seconds, mmd in self.points:
            if mmd <= factor * self.floor:
                return kimg, seconds
        return None

def refine_preset(preset, outdir, divergence='di', kimg=300, seed=0, log=None, eval_n=10000,
        curve_every=None, curve_n=2000, **overrides):
    """Refine an MLP generator on gmm:PRESET; returns the metrics before and after, and timing.

    `eval_n` samples (student and reference) for the metrics before and after; `curve_every`
    kimg (None: no curve) between MMD evaluations on `curve_n` samples during training.
    """
    opts = dict(teacher=f'gmm:{preset}', gen='mlp', outdir=outdir, divergence=divergence, kimg=kimg,
        seed=seed, tick=curve_every or max(kimg / 10, 1), snap=10 ** 9, allow_pickle_code=False,
        resume=None, dry_run=False)
    opts.update(overrides)
    o = run.resolve_options(opts)
    torch.manual_seed(seed)
    setup = run.prepare(o)
    before = toy_metrics.evaluate_generator(setup.G, setup.teacher, n=eval_n, seed=seed)
    run_dir = os.path.join(outdir, f'{preset}-{divergence}')
    os.makedirs(run_dir, exist_ok=True)
    curve = CurveRecorder(setup.teacher, curve_n, seed) if curve_every else None
    start = time.time()
    result = run.launch(setup, run_dir, log=log or (lambda *_: None), on_tick=curve)
    seconds = time.time() - start - (curve.eval_seconds if curve else 0.0)
    after = toy_metrics.evaluate_generator(result.G_ema, setup.teacher, n=eval_n, seed=seed)
    save_scatter_png(before['samples'][:, :2].numpy(), os.path.join(run_dir, 'before.png'))
    save_scatter_png(after['samples'][:, :2].numpy(), os.path.join(run_dir, 'after.png'))
    true = setup.teacher.sample(eval_n, generator=torch.Generator().manual_seed(seed + 1))
    save_scatter_png(true[:, :2].numpy(), os.path.join(run_dir, 'target.png'))
    return dnnlib.EasyDict(preset=preset, divergence=divergence, kimg=kimg, seconds=seconds,
        before=before, after=after, run_dir=run_dir,
        curve=curve.points if curve else None, curve_floor=curve.floor if curve else None,
        time_to_2x_floor=curve.first_below(2.0) if curve else None, curve_n=curve_n)
