"""Refine a trained StyleGAN2 with a diffusion teacher, data-free, and measure it before and after.

Runs refine.py's loop on `--gan` (a StyleGAN pickle) with `--teacher`, then computes the same
metrics (same detector, sample count, seeds and noise) on the GAN's G_ema before and on the
refined G_ema after, and writes sample grids with the same latents (one row per class):
before.png, after.png and before-after.png (side by side) in the run folder.

  OMP_NUM_THREADS=1 python bench/gan_refine.py --gan out/stylegan2-mnist-conv/network-snapshot-000048.pkl \\
      --teacher pretrained/edm-mnist32-cond.pkl --kimg 30 --metrics fd5k,fid5k \\
      --inception-ref out/mnist-train5k-inception.npz

The default rates (generator 2e-3, fake score 1e-3, 2 kimg fake-score warm-up, EMA half-life
0.5 kimg) are the best measured on the MNIST GAN (README, "The MNIST benchmark").

FD (fast detector) compares with the shipped statistics of the 60k training digits by default,
FID (Inception) with `--inception-ref` (a dataset or a reference .npz from fid.py ref).
`--metrics none` skips measuring: fid.py can score the pickles later.
"""

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics import registry # pylint: disable=wrong-import-position
from refine import generation, run # pylint: disable=wrong-import-position
from torch_utils.images import save_image_grid, save_side_by_side # pylint: disable=wrong-import-position
from torch_utils import distributed, train_utils # pylint: disable=wrong-import-position

def measure(pkl, metric_names, ref, num, device):
    """Metrics of a pickle's G_ema at truncation 1 with random noise (StyleGAN's FID setting);
    the noise generator is reseeded so that before and after see the same noise."""
    sample, meta = generation.load_for_generation(pkl, device=device,
        generator_kwargs=dict(noise_mode='random'))
    torch.manual_seed(0)
    records = registry.compute_metrics(metric_names, lambda seeds, _labels: sample(seeds),
        num_labels=meta.label_dim, ref=ref, num=num, device=device)
    return {name: list(r['results'].values())[0] for name, r in records.items()}

def class_grid(pkl, device, per_class=10):
    """One row per class, the same seeds for every pickle; noise fixed ('const')."""
    sample, meta = generation.load_for_generation(pkl, device=device, generator_kwargs=dict(noise_mode='const'))
    rows = [sample(list(range(k * per_class, (k + 1) * per_class)), k) for k in range(max(meta.label_dim, 1))] \
        if meta.label_dim else [sample(list(range(per_class * per_class)))]
    return torch.cat(rows).cpu()

@click.command(context_settings=dict(show_default=True))
@click.option('--gan', required=True, help='StyleGAN pickle to refine')
@click.option('--teacher', default='pretrained/edm-mnist32-cond.pkl', help='EDM teacher pickle')
@click.option('--outdir', default='out/gan-refine')
@click.option('--divergence', default='di')
@click.option('--kimg', default=30.0, help='Refinement length [kimg]')
@click.option('--batch', default=32)
@click.option('--glr', default=2e-3, help='Generator learning rate')
@click.option('--lr', default=1e-3, help='Fake-score learning rate')
@click.option('--ema', default=0.5, help='EMA half-life [kimg]')
@click.option('--fake-warmup', default=2.0, help='First kimg of --kimg train only the fake score')
@click.option('--tick', default=1.0, help='Progress interval [kimg]')
@click.option('--train-params', default='all', type=click.Choice(['all', 'synthesis', 'mapping']))
@click.option('--max-minutes', default=None, type=float, help='Also stop the refinement after this long')
@click.option('--metrics', 'metric_names', default='fd5k', help='Registry metrics (fd: fast detector, fid: Inception), or none')
@click.option('--num', default=None, type=int, help='Images per metric [default: the names\' counts]')
@click.option('--fast-ref', default='pretrained/mnist-train60k-fast.npz', help='Reference of the fd metrics (dataset or .npz)')
@click.option('--inception-ref', default='datasets/mnist-32x32.zip', help='Reference of the fid metrics (dataset or .npz)')
@click.option('--seed', default=0)
def main(gan, teacher, outdir, divergence, kimg, batch, glr, lr, ema, fake_warmup, tick, train_params, max_minutes, metric_names,
        num, fast_ref, inception_ref, seed):
    metric_names = None if metric_names == 'none' else metric_names
    needed = [(gan, '--gan'), (teacher, '--teacher')]
    if metric_names:
        kinds = {spec.kind for spec in registry.parse_names(metric_names)}
        needed += [(fast_ref, '--fast-ref')] if 'fd' in kinds else []
        needed += [(inception_ref, '--inception-ref')] if kinds - {'fd'} else []
    for path, flag in needed:
        if not os.path.exists(path):
            raise click.BadParameter(f'{path}: no such file', param_hint=flag)
    ref = dict(fast=fast_ref, inception=inception_ref)
    device = distributed.device()
    o = run.resolve_options(dict(teacher=teacher, gen=gan, divergence=divergence, batch=batch, lr=lr,
        glr=glr, ema=ema, kimg=kimg, fake_warmup=fake_warmup, tick=tick, snap=1000, seed=seed,
        train_params=train_params, max_minutes=max_minutes, allow_pickle_code=False))
    torch.manual_seed(seed)
    try:
        setup = run.prepare(o)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    run_dir = train_utils.next_run_dir(outdir, f'{divergence}-{train_params}-{kimg:g}kimg')
    os.makedirs(run_dir)
    print(f'Run directory: {run_dir}', flush=True)

    before = after = {}
    if metric_names:
        print(f'Measuring the GAN ({metric_names}) ...', flush=True)
        before = measure(gan, metric_names, ref, num, device)
        print('before:', json.dumps(before), flush=True)
    start = time.time()
    run.launch(setup, run_dir, log=lambda line: print(line, flush=True))
    seconds = time.time() - start
    refined = sorted(f for f in os.listdir(run_dir) if f.startswith('network-snapshot-'))[-1]
    refined = os.path.join(run_dir, refined)
    if metric_names:
        after = measure(refined, metric_names, ref, num, device)
        print('after:', json.dumps(after), flush=True)

    grids = [class_grid(pkl, device) for pkl in (gan, refined)]
    for name, images in zip(('before', 'after'), grids):
        save_image_grid(images, os.path.join(run_dir, f'{name}.png'), grid_w=10)
    save_side_by_side(grids, os.path.join(run_dir, 'before-after.png'), grid_w=10)

    refined_kimg = json.loads(open(os.path.join(run_dir, 'stats.jsonl')).readlines()[-1])['kimg']
    result = dict(gan=gan, teacher=teacher, divergence=divergence, kimg=refined_kimg, batch=batch, glr=glr,
        lr=lr, ema=ema, fake_warmup=fake_warmup, train_params=train_params, refine_seconds=seconds, device=str(device),
        before=before, after=after, refined=refined)
    with open(os.path.join(run_dir, 'result.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(f'\n| metric | GAN | refined ({divergence}, {refined_kimg:g} kimg, {train_params}) | change |\n|---|---|---|---|')
    for name in before:
        print(f'| {name} | {before[name]:.2f} | {after[name]:.2f} | {100 * (after[name] / before[name] - 1):+.1f}% |')
    print(f'\nRefinement took {seconds / 60:.1f} min. Grids: {run_dir}/before-after.png')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
