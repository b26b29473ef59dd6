"""Iteration time of `refine.py` in any checkout of this project: for side-by-side comparisons
of two commits (e.g. a `git worktree` of an older one) on the same teacher and options.

Runs CHECKOUT/refine.py in this process (its own modules, not this tree's) with the options
after `--`, records the moment of every Adam step and prints, as one JSON line, the median time
between consecutive steps of the first optimizer that steps (one fake-score and one generator
update per iteration for DI/SiD: the iteration time), the number of timed iterations and the
process's peak RSS. `--make-teacher PKL` first writes a randomly initialised EDM teacher of
bench/throughput.py's presets (default small32: 1.75 M parameters, 32x32x3) that every
checkout loads safely.

  python bench/iteration_ab.py --make-teacher /tmp/small32.pkl
  git worktree add /tmp/base COMMIT
  # alternate A and B as whole processes and take medians:
  for i in 1 2 3; do for tree in /tmp/base .; do
    OMP_NUM_THREADS=2 python bench/iteration_ab.py --checkout $tree -- --teacher /tmp/small32.pkl \\
        --gen teacher --divergence di --batch 32 --kimg 0.8 --outdir /tmp/ab-runs
  done; done
"""

import json
import os
import resource
import runpy
import statistics
import sys
import time

import click

def make_teacher_pkl(path, preset='small32', seed=0):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch # pylint: disable=import-outside-toplevel
    from bench.throughput import PRESETS # pylint: disable=import-outside-toplevel
    from torch_utils import persistence # pylint: disable=import-outside-toplevel
    from training import networks_edm # pylint: disable=import-outside-toplevel
    torch.manual_seed(seed)
    net = networks_edm.EDMPrecond(**PRESETS[preset]).eval().requires_grad_(False)
    persistence.save_network_pkl(dict(ema=net), path)
    print(f'{path}: random {preset} EDM teacher, {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters')

def time_checkout(checkout, refine_args, warmup):
    checkout = os.path.abspath(checkout)
    sys.path.insert(0, checkout)
    import torch # pylint: disable=import-outside-toplevel
    steps = []
    adam_step = torch.optim.Adam.step
    def timed_step(self, *args, **kwargs):
        out = adam_step(self, *args, **kwargs)
        steps.append((id(self), time.perf_counter()))
        return out
    torch.optim.Adam.step = timed_step
    sys.argv = [os.path.join(checkout, 'refine.py')] + refine_args
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    first = steps[0][0] if steps else None
    times = [t for opt, t in steps if opt == first]
    gaps = [b - a for a, b in zip(times, times[1:])][warmup:]
    if not gaps:
        sys.exit('iteration_ab: no timed iterations (give more --kimg)')
    print(json.dumps(dict(checkout=checkout, iteration_ms=1e3 * statistics.median(gaps), iterations=len(gaps),
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)), flush=True)

@click.command(context_settings=dict(ignore_unknown_options=True, allow_interspersed_args=False))
@click.option('--checkout', default=None, help='A checkout of this project whose refine.py to time')
@click.option('--make-teacher', default=None, metavar='PKL', help='First write a random EDM teacher here')
@click.option('--preset', default='small32', show_default=True, help="bench/throughput.py's preset for --make-teacher")
@click.option('--warmup', default=3, show_default=True, help='Iterations not timed')
@click.argument('refine_args', nargs=-1, type=click.UNPROCESSED)
def main(checkout, make_teacher, preset, warmup, refine_args):
    """Time refine.py's iterations in a checkout; REFINE_ARGS (after --) go to its refine.py."""
    if make_teacher:
        make_teacher_pkl(make_teacher, preset)
    if checkout:
        if not os.path.isfile(os.path.join(checkout, 'refine.py')):
            raise click.BadParameter(f'{checkout}: no refine.py there', param_hint='--checkout')
        time_checkout(checkout, list(refine_args), warmup)

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
