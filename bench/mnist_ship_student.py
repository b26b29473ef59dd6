"""Ship a one-step student: a refine.py snapshot without its training-only networks.

A snapshot holds `G_ema`, `G` and the fake score `fake`; generation needs only `G_ema` (and
`ema`, the EDM network that SiD / Diff-Instruct tools read). This writes those and the
snapshot's plain options (teacher, divergence, sigma_init, kimg, ...) as a pickle in the same
NVlabs layout, which loads safely in generate.py, fid.py and refine.py --gen. Then measure it
with bench/mnist_reference.py, which writes its reference JSON beside it.

  python bench/mnist_ship_student.py --snapshot out/mnist-sid-ema/.../network-snapshot-000024.pkl \\
      --dest pretrained/sid-mnist32-cond.pkl
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch_utils import persistence, safe_pickle # pylint: disable=wrong-import-position

TRAINING_ONLY = ('G', 'fake')

def slim(data):
    """The snapshot's entries a user of the student needs."""
    if 'G_ema' not in data:
        raise ValueError(f"not a refine.py snapshot: it has no 'G_ema' (it has {', '.join(map(str, data))})")
    return {k: v for k, v in data.items() if k not in TRAINING_ONLY and not str(k).startswith('divergence module')}

@click.command()
@click.option('--snapshot', required=True, help='network-snapshot-*.pkl of a refine.py run')
@click.option('--dest', required=True, help='The pickle to write')
def main(snapshot, dest):
    data = safe_pickle.load_network_pkl(snapshot)
    out = slim(data)
    persistence.save_network_pkl(out, dest)
    kept = ', '.join(f'{k}' for k in out)
    print(f'{dest}: {os.path.getsize(dest) / 2**20:.1f} MiB ({kept}), from {snapshot}')

if __name__ == '__main__':
    torch.set_grad_enabled(False)
    main() # pylint: disable=no-value-for-parameter
