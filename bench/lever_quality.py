"""Do the speed levers change the result? The same MNIST distillation with and without them.

Distils the shipped MNIST teacher (one-step generator, the settings of bench/mnist_distill.py)
for --kimg with one set of speed levers and reports FD (fast detector, 5000 samples, against
the MNIST training set) of the final G_ema, with the time the run took. Run it once per setting:

  OMP_NUM_THREADS=1 python bench/lever_quality.py --kimg 4 --levers off     # today's computation
  OMP_NUM_THREADS=1 python bench/lever_quality.py --kimg 4 --levers default # refine.py's defaults
  OMP_NUM_THREADS=1 python bench/lever_quality.py --kimg 4 --levers default --amp nograd
  OMP_NUM_THREADS=1 python bench/lever_quality.py --kimg 4 --levers default --no-fused-norm

'off' is the computation before the levers (NVlabs attention and dropout stream, fake-score
update first on its own generator samples, plain Adam and EMA); 'default' is refine/run.py's
DEFAULTS. Each run folder is outdir/<divergence>-<name>; result.json holds the figures.
"""

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from refine import run # pylint: disable=wrong-import-position

FAST_STATS = 'pretrained/mnist-train60k-fast.npz'
OFF = dict(reuse_samples=False, amp='off', compile=False, fused_optim=False, attention='matmul',
    dropout_mask='bernoulli', channels_last=False, recompute=False, fused_norm=False)

@click.command()
@click.option('--teacher', default='pretrained/edm-mnist32-cond.pkl', show_default=True)
@click.option('--divergence', default='di', show_default=True)
@click.option('--kimg', default=4.0, show_default=True)
@click.option('--batch', default=32, show_default=True)
@click.option('--levers', 'preset', default='default', show_default=True, type=click.Choice(['off', 'default']))
@click.option('--amp', default=None, help='Override the amp level (off, nograd, loss, all, auto)')
@click.option('--reuse/--no-reuse', default=None, help='Override reuse_samples')
@click.option('--fused-norm/--no-fused-norm', default=None, help='Override fused_norm (and with it NHWC, channels_last auto)')
@click.option('--channels-last', default=None, type=click.Choice(['auto', 'on', 'off']), help='Override channels_last')
@click.option('--outdir', default='out/lever-quality', show_default=True)
@click.option('--seed', default=0, show_default=True)
def main(teacher, divergence, kimg, batch, preset, amp, reuse, fused_norm, channels_last, outdir, seed):
    levers = dict(OFF) if preset == 'off' else {k: run.DEFAULTS[k] for k in OFF}
    overrides = dict(amp=amp, reuse_samples=reuse, fused_norm=fused_norm,
        channels_last={None: None, 'auto': 'auto', 'on': True, 'off': False}[channels_last])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    levers.update(overrides)
    name = preset + ''.join(f"-{k.replace('_', '-')}-" + ({True: 'on', False: 'off'}.get(v, v))
        for k, v in overrides.items())
    run_dir = os.path.join(outdir, f'{divergence}-{name}' + (f'-seed{seed}' if seed else ''))
    os.makedirs(run_dir, exist_ok=True)
    o = run.resolve_options(dict(teacher=teacher, gen='teacher', divergence=divergence, batch=batch,
        lr=1e-4, glr=1e-4, ema=1.0, kimg=kimg, tick=1.0, snap=10**6, seed=seed, metrics='fd5k',
        metric_ref=FAST_STATS, allow_pickle_code=False, **levers))
    torch.manual_seed(o.seed)
    setup = run.prepare(o)
    start = time.time()
    run.launch(setup, run_dir, log=lambda line: print(line, flush=True))
    seconds = time.time() - start
    with open(os.path.join(run_dir, 'metric-fd5k.jsonl')) as f:
        record = json.loads(f.read().splitlines()[-1])
    result = dict(divergence=divergence, levers=levers, kimg=record['kimg'], fd5k=record['results']['fd5k'],
        seconds=seconds, run_dir=run_dir)
    with open(os.path.join(run_dir, 'result.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
