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

def make_teacher(path, preset='small32', seed=0):
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

def main():
    argv = sys.argv[1:]
    refine_args = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    opts = dict(checkout=None, make_teacher=None, preset='small32', warmup='3')
    while argv:
        key = argv.pop(0)
        name = key.lstrip('-').replace('-', '_')
        if name not in opts or not argv:
            sys.exit(f'iteration_ab: unknown option or missing value: {key} (see the docstring)')
        opts[name] = argv.pop(0)
    if opts['make_teacher']:
        make_teacher(opts['make_teacher'], opts['preset'])
    if opts['checkout']:
        if not os.path.isfile(os.path.join(opts['checkout'], 'refine.py')):
            sys.exit(f"iteration_ab: --checkout {opts['checkout']}: no refine.py there")
        time_checkout(opts['checkout'], refine_args, int(opts['warmup']))

if __name__ == '__main__':
    main()
