"""How much a longer generator average would have helped a finished run: FD of the uniform
average of its snapshots' G_ema weights over a kimg window (post-hoc, no training).

Every snapshot of a refine.py run holds the EMA generator at that point; averaging the weights
of those in a window approximates an EMA whose averaging window is that long. Prints one line
per window (fast-detector FD, 5000 samples, against the MNIST training statistics).

  python bench/snapshot_average.py --run out/mnist-distill-long/sid-b32-lr0.0001-glr0.0001 \\
      --windows 24-24,16-24,10-24,6-24,2-24
"""

import copy
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics import registry # pylint: disable=wrong-import-position
from torch_utils import safe_pickle, train_utils # pylint: disable=wrong-import-position

def average_generator(paths):
    """The snapshots' G_ema with every floating-point parameter and buffer averaged."""
    nets = [safe_pickle.load_network_pkl(p)['G_ema'] for p in paths]
    avg = copy.deepcopy(nets[0])
    states = [n.state_dict() for n in nets]
    with torch.no_grad():
        for name, value in avg.state_dict().items():
            if value.is_floating_point():
                value.copy_(sum(s[name].double() for s in states) / len(states))
    return avg

def parse_window(text):
    try:
        lo, hi = (float(v) for v in text.split('-'))
    except ValueError:
        raise click.BadParameter(f"'{text}' is not LO-HI (kimg)", param_hint='--windows') from None
    return lo, hi

@click.command()
@click.option('--run', 'run_dir', required=True, help='A refine.py (or bench/mnist_distill.py) run folder')
@click.option('--windows', required=True, help='Comma-separated kimg windows LO-HI, ends included')
@click.option('--ref', default='pretrained/mnist-train60k-fast.npz', help='Fast-detector statistics')
@click.option('--num', default=5000, help='Samples per FD')
def main(run_dir, windows, ref, num):
    snapshots = train_utils.numbered_files(run_dir, 'network-snapshot', 'pkl')
    if not snapshots:
        raise click.BadParameter(f'{run_dir}: no network-snapshot-*.pkl', param_hint='--run')
    for lo, hi in (parse_window(w) for w in windows.split(',')):
        chosen = [(k, p) for k, p in snapshots if lo - 0.5 <= k <= hi + 0.5]
        if not chosen:
            print(f'{lo:g}-{hi:g} kimg: no snapshots')
            continue
        G = average_generator([p for _, p in chosen]).eval()
        with torch.no_grad():
            records = registry.compute_metrics([f'fd{num}'], registry.generator_sample_fn(G),
                num_labels=getattr(G, 'label_dim', 0), ref=ref, batch=100)
        kimgs = ', '.join(f'{k:g}' for k, _ in chosen)
        print(f'{lo:g}-{hi:g} kimg ({len(chosen)} snapshots: {kimgs}): FD {registry.flatten(records)[f"fd{num}"]:.2f}', flush=True)

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
