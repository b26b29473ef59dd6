"""The reference metrics of a shipped MNIST network (the teacher, or the one-step student), written
next to its pickle: the lines to beat.

Generates `--num` samples of `--network` (the teacher with EDM Heun, 18 steps = 35 network
calls; a one-step generator with 1; random class per seed) as PNGs under --samples, skipping
seeds already there, so an interrupted run continues. Then computes FD with the fast detector
against the whole MNIST training set and, when `--inception-ref` is given, FID with Inception
against those reference statistics, and writes both with the timing to `--dest` (JSON), which
`make demo` and bench/mnist_distill.py read.

  python dataset_tool.py --source mnist --split train --max-images 5000 --dest datasets/mnist-32x32-train5k.zip
  python fid.py ref --data datasets/mnist-32x32-train5k.zip --dest out/mnist-train5k-inception.npz
  OMP_NUM_THREADS=1 python bench/mnist_reference.py --num 5000 --inception-ref out/mnist-train5k-inception.npz
  # The shipped student (bench/mnist_ship_student.py writes it):
  OMP_NUM_THREADS=1 python bench/mnist_reference.py --network pretrained/sid-mnist32-cond.pkl --num 5000 --inception-ref out/mnist-train5k-inception.npz
"""

import hashlib
import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics import registry # pylint: disable=wrong-import-position
from refine import generation # pylint: disable=wrong-import-position
from torch_utils import safe_pickle, train_utils # pylint: disable=wrong-import-position
from torch_utils.images import save_image, to_uint8 # pylint: disable=wrong-import-position

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()

def claim_sample_folder(pkl, outdir, log=print):
    """The folder's samples belong to the pickle whose hash its `network.sha256` names; samples of
    another pickle (a student replaced under the same name) are removed, never measured."""
    os.makedirs(outdir, exist_ok=True)
    stamp, digest = os.path.join(outdir, 'network.sha256'), file_sha256(pkl)
    if os.path.isfile(stamp):
        with open(stamp, encoding='utf-8') as f:
            if f.read().strip() == digest:
                return
    stale = [n for n in os.listdir(outdir) if n.endswith('.png')]
    if stale:
        log(f'{outdir}: {len(stale)} samples of another network (or of an unknown one); generating them anew')
        for name in stale:
            os.remove(os.path.join(outdir, name))
    train_utils.write_atomic(stamp, digest + '\n')

def generate_missing(pkl, outdir, num, batch, log=print):
    """PNGs 000000.png ... for seeds 0..num-1 that are not there yet; returns (seconds per image
    of what was generated or None if nothing was, network calls per image)."""
    claim_sample_folder(pkl, outdir, log)
    todo = [s for s in range(num) if not os.path.isfile(os.path.join(outdir, f'{s:06d}.png'))]
    sample, meta = generation.load_for_generation(pkl)
    if not todo:
        return None, meta.nfe
    start = time.time()
    for i in range(0, len(todo), batch):
        seeds = todo[i:i + batch]
        for seed, image in zip(seeds, to_uint8(sample(seeds).cpu())):
            save_image(image, os.path.join(outdir, f'{seed:06d}.png'))
        done = min(i + batch, len(todo))
        log(f'{num - len(todo) + done}/{num} samples ({meta.nfe} NFE), '
            f'{(time.time() - start) / done:.3f} s/image')
    return (time.time() - start) / len(todo), meta.nfe

def distillation_of(pkl):
    """What a refine.py snapshot says about its own training (kimg, divergence); {} for a teacher."""
    data = safe_pickle.load_network_pkl(pkl)
    if 'G_ema' not in data:
        return {}
    return dict(kimg=data.get('kimg'), divergence=(data.get('divergence') or {}).get('name'),
        distilled_from=data.get('teacher'))

@click.command(context_settings=dict(show_default=True))
@click.option('--network', default='pretrained/edm-mnist32-cond.pkl', help='The teacher, or a one-step snapshot')
@click.option('--num', default=5000, help='Samples')
@click.option('--samples', default=None, help='Where the samples go (resumable)  [default: out/samples-NETWORK]')
@click.option('--batch', default=100)
@click.option('--fast-ref', default='datasets/mnist-32x32.zip', help='Dataset for the fast-detector FD')
@click.option('--inception-ref', default=None, help='Inception statistics (.npz) for FID; none: FD only')
@click.option('--dest', default=None, help='[default: NETWORK-reference.json, next to the pickle]')
def main(network, num, samples, batch, fast_ref, inception_ref, dest):
    for path, flag in ((network, '--network'), (fast_ref, '--fast-ref'), (inception_ref, '--inception-ref')):
        if path is not None and not os.path.exists(path):
            raise click.BadParameter(f'{path}: no such file', param_hint=flag)
    stem = os.path.splitext(network)[0]
    samples = samples or os.path.join('out', f'samples-{os.path.basename(stem)}')
    dest = dest or f'{stem}-reference.json'
    seconds, nfe = generate_missing(network, samples, num, batch, log=lambda s: print(s, flush=True))
    previous = {}
    if os.path.isfile(dest):
        with open(dest) as f:
            previous = json.load(f)
    names = [f'fd{num}'] + ([f'fid{num}'] if inception_ref else [])
    refs = dict(fast=fast_ref, inception=inception_ref)
    print(f'Computing {", ".join(names)} of {num} samples of {network} ...', flush=True)
    records = registry.compute_metrics(names, samples, ref=refs, num=num, batch=batch,
        progress=lambda s: print(s, flush=True))
    previous.pop('teacher', None) # the older name of 'network'
    result = dict(previous, network=os.path.basename(network),
        sampler='EDM Heun, 18 steps (35 NFE)' if nfe == 35 else f'one call per image ({nfe} NFE)' if nfe == 1 else f'{nfe} NFE',
        num_samples=num, seconds_per_image=seconds if seconds is not None else previous.get('seconds_per_image'),
        metrics={**previous.get('metrics', {}), **registry.flatten(records)},
        references=dict(fd=fast_ref, fid=inception_ref or previous.get('references', {}).get('fid')),
        command=' '.join(['python', 'bench/mnist_reference.py'] + sys.argv[1:]),
        **distillation_of(network))
    tmp = f'{dest}.tmp'
    with open(tmp, 'w') as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, dest)
    print(json.dumps(result, indent=2))

if __name__ == '__main__':
    torch.set_grad_enabled(False)
    main() # pylint: disable=no-value-for-parameter
