"""The line to beat: the shipped MNIST teacher's 35-NFE metrics, written next to its pickle.

Generates `--num` teacher samples (EDM Heun, 18 steps = 35 network calls; random class per
seed) as PNGs under --samples, skipping seeds already there, so an interrupted run continues.
Then computes FD with the fast detector against the whole MNIST training set and, when
`--inception-ref` is given, FID with Inception against those reference statistics, and writes
both with the timing to `--dest` (JSON), which `make demo` and bench/mnist_distill.py read.

  python dataset_tool.py --source mnist --split train --max-images 5000 --dest datasets/mnist-32x32-train5k.zip
  python fid.py ref --data datasets/mnist-32x32-train5k.zip --dest out/mnist-train5k-inception.npz
  OMP_NUM_THREADS=1 python bench/mnist_teacher_reference.py --num 5000 \\
      --inception-ref out/mnist-train5k-inception.npz
"""

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics import registry # pylint: disable=wrong-import-position
from refine import generation # pylint: disable=wrong-import-position
from torch_utils.images import save_image, to_uint8 # pylint: disable=wrong-import-position

def generate_missing(pkl, outdir, num, batch, log=print):
    """PNGs 000000.png ... for seeds 0..num-1 that are not there yet; returns seconds per image
    of what was generated (None if nothing was)."""
    os.makedirs(outdir, exist_ok=True)
    todo = [s for s in range(num) if not os.path.isfile(os.path.join(outdir, f'{s:06d}.png'))]
    if not todo:
        return None
    sample, meta = generation.load_for_generation(pkl)
    start = time.time()
    for i in range(0, len(todo), batch):
        seeds = todo[i:i + batch]
        for seed, image in zip(seeds, to_uint8(sample(seeds).cpu())):
            save_image(image, os.path.join(outdir, f'{seed:06d}.png'))
        done = min(i + batch, len(todo))
        log(f'{num - len(todo) + done}/{num} samples ({meta.nfe} NFE), '
            f'{(time.time() - start) / done:.3f} s/image')
    return (time.time() - start) / len(todo)

@click.command(context_settings=dict(show_default=True))
@click.option('--teacher', default='pretrained/edm-mnist32-cond.pkl')
@click.option('--num', default=5000, help='Teacher samples')
@click.option('--samples', default='out/mnist-teacher-samples', help='Where the samples go (resumable)')
@click.option('--batch', default=100)
@click.option('--fast-ref', default='datasets/mnist-32x32.zip', help='Dataset for the fast-detector FD')
@click.option('--inception-ref', default=None, help='Inception statistics (.npz) for FID; none: FD only')
@click.option('--dest', default='pretrained/edm-mnist32-cond-reference.json')
def main(teacher, num, samples, batch, fast_ref, inception_ref, dest):
    for path, flag in ((teacher, '--teacher'), (fast_ref, '--fast-ref'), (inception_ref, '--inception-ref')):
        if path is not None and not os.path.exists(path):
            raise click.BadParameter(f'{path}: no such file', param_hint=flag)
    seconds = generate_missing(teacher, samples, num, batch, log=lambda s: print(s, flush=True))
    previous = {}
    if os.path.isfile(dest):
        with open(dest) as f:
            previous = json.load(f)
    names = [f'fd{num}'] + ([f'fid{num}'] if inception_ref else [])
    refs = dict(fast=fast_ref, inception=inception_ref)
    print(f'Computing {", ".join(names)} of {num} teacher samples ...', flush=True)
    records = registry.compute_metrics(names, samples, ref=refs, num=num, batch=batch,
        progress=lambda s: print(s, flush=True))
    result = dict(previous, teacher=os.path.basename(teacher), sampler='EDM Heun, 18 steps (35 NFE)',
        num_samples=num, seconds_per_image=seconds if seconds is not None else previous.get('seconds_per_image'),
        metrics={**previous.get('metrics', {}), **registry.flatten(records)},
        references=dict(fd=fast_ref, fid=inception_ref or previous.get('references', {}).get('fid')),
        command=' '.join(['python', 'bench/mnist_teacher_reference.py'] + sys.argv[1:]))
    tmp = f'{dest}.tmp'
    with open(tmp, 'w') as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, dest)
    print(json.dumps(result, indent=2))

if __name__ == '__main__':
    torch.set_grad_enabled(False)
    main() # pylint: disable=no-value-for-parameter
