"""Generate images (or vectors) from a network pickle, one file per seed.

Examples:
  # 64 images from an EDM teacher with the 18-step Heun sampler (35 network calls each).
  python generate.py --network edm-cifar10-32x32-cond-vp.pkl --outdir out --seeds 0-63 --grid grid.png
  # One-step images from a refine.py snapshot (its G_ema).
  python generate.py --network runs/00000-di/network-snapshot-000200.pkl --outdir out
  # A StyleGAN2/3 pickle (NVlabs' or refined here), truncated.
  python generate.py --network stylegan2.pkl --truncation 0.7 --noise-mode const --outdir out
  # A SiD / Diff-Instruct one-step pickle: its 'ema' network at noise level 2.5.
  python generate.py --network sid.pkl --sigma-init 2.5 --outdir out
  # Many GPUs: each process takes every N-th batch.
  torchrun --nproc_per_node=8 generate.py --network edm.pkl --outdir out --seeds 0-49999 --subdirs
"""

import os

import click
import numpy as np
import torch

import dnnlib
from refine import generation
from refine.plots import save_scatter_png
from torch_utils.images import save_image, save_image_grid, to_uint8
from torch_utils import cli, distributed

def _parse_seeds(_ctx, _param, value):
    try:
        seeds = dnnlib.util.parse_int_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if not seeds:
        raise click.BadParameter('no seeds given')
    if min(seeds) < 0:
        raise click.BadParameter(f'seeds must be non-negative, got {min(seeds)}')
    return seeds

def pick_device(name):
    """The torch device for --device (None: cuda if available; each process its own GPU)."""
    if name == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter('CUDA is not available here', param_hint='--device')
    if name is None or distributed.get_world_size() > 1:
        return distributed.device() # each process on its own GPU under torchrun
    return torch.device(name)

def load_sampler(network_pkl, allow_pickle_code, sigma_init, device, sampler_kwargs, class_idx,
        generator_kwargs=None, raw=False):
    """refine.generation's (sample, meta) for a pickle, with its errors as one-line CLI errors."""
    try:
        sample, meta = generation.load_for_generation(network_pkl, allow_code=allow_pickle_code,
            sigma_init=sigma_init, device=device, sampler_kwargs=sampler_kwargs,
            generator_kwargs=generator_kwargs, raw=raw)
        generation.check_class_idx(class_idx, meta.label_dim)
    except generation.GenerationError as e:
        if e.param:
            raise click.BadParameter(str(e), param_hint=f'--{e.param}') from None
        raise click.ClickException(str(e)) from None
    return sample, meta

def _image_path(outdir, seed, subdirs):
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f'{seed:06d}.png')

def _gather_in_seed_order(local, seeds):
    """{seed: array} from every process, stacked in the order of --seeds (on rank 0)."""
    merged = dict()
    for part in distributed.all_gather_object(local):
        merged.update(part)
    return np.stack([merged[seed] for seed in seeds]) if distributed.is_main() else None

def _save_npy_atomically(array, path):
    with dnnlib.util.atomic_path(path) as tmp_path:
        with open(tmp_path, 'wb') as f:
            np.save(f, array)

class _NotNaN(click.FloatRange):
    """A float >= 0 that may be inf (S_max's 'no limit') but not nan."""
    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f'{value!r} is not a number', param, ctx)
        return number

NOT_NAN_NONNEGATIVE = _NotNaN(min=0)

def check_sampler_options(sampler_kwargs):
    """Ranges that single flags cannot check: the noise range must not be empty."""
    lo, hi = sampler_kwargs.get('sigma_min'), sampler_kwargs.get('sigma_max')
    if lo is not None and hi is not None and lo >= hi:
        raise click.BadParameter(f'{lo:g} is not below --sigma-max {hi:g}', param_hint='--sigma-min')
    if sampler_kwargs.get('S_min', 0) > sampler_kwargs.get('S_max', float('inf')):
        raise click.BadParameter(f"{sampler_kwargs['S_min']:g} is above --s-max", param_hint='--s-min')

def _echo0(message):
    if distributed.is_main():
        click.echo(message, err=True)

@click.command(cls=cli.Command, context_settings=dict(show_default=True))
@click.option('--network',  'network_pkl',    help='Network pickle path or URL', metavar='PKL|URL', type=str, required=True)
@click.option('--outdir',                     help='Where to save the outputs', metavar='DIR', type=str, required=True)
@click.option('--seeds',                      help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', type=str, default='0-63', callback=_parse_seeds)
@click.option('--class',    'class_idx',      help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch',    'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64)
@click.option('--steps',    'num_steps',      help='Heun sampler steps (EDM teachers)', metavar='INT', type=click.IntRange(min=1), default=18)
@click.option('--sigma-min', '--sigma_min', 'sigma_min', help='Lowest noise level  [default: the network\'s or 0.002]', metavar='FLOAT', type=cli.positive_float())
@click.option('--sigma-max', '--sigma_max', 'sigma_max', help='Highest noise level  [default: the network\'s or 80]', metavar='FLOAT', type=cli.positive_float())
@click.option('--rho',                        help='Time step exponent', metavar='FLOAT', type=cli.positive_float(), default=7)
@click.option('--s-churn', '--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=cli.nonnegative_float(), default=0)
@click.option('--s-min', '--S_min', 'S_min', help='Stoch. min noise level', metavar='FLOAT', type=cli.nonnegative_float(), default=0)
@click.option('--s-max', '--S_max', 'S_max', help='Stoch. max noise level (inf: no limit)', metavar='FLOAT', type=NOT_NAN_NONNEGATIVE, default=float('inf'))
@click.option('--s-noise', '--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=cli.positive_float(), default=1)
@click.option('--sigma-init',                 help='Read an EDM pickle as a one-step generator at this noise level (SiD 2.5, DI 1.0)', metavar='FLOAT', type=cli.positive_float(), default=None)
@click.option('--raw',                        help="A refinement snapshot's trained generator G instead of its EMA G_ema", is_flag=True)
@click.option('--truncation', '--trunc', 'truncation_psi', help='StyleGAN truncation psi  [default: 1]', metavar='FLOAT', type=cli.FiniteFloat(), default=None)
@click.option('--noise-mode',                 help='StyleGAN noise  [default: random]', type=click.Choice(['random', 'const', 'none']), default=None)
@click.option('--grid',     'grid_path',      help='Also save all outputs in one PNG here', metavar='PNG', type=str, default=None)
@click.option('--subdirs',                    help='Put images in subdirectories of 1000', is_flag=True)
@click.option('--allow-pickle-code',          help='Run code embedded in the pickle (trusted files only)', is_flag=True)
@click.option('--device',                     help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']), default=None)
@cli.user_errors
def main(network_pkl, outdir, seeds, class_idx, max_batch_size, grid_path, subdirs,
        allow_pickle_code, device, sigma_init, raw, truncation_psi, noise_mode, **sampler_kwargs):
    """Generate images (or vectors) from an EDM teacher, a one-step snapshot, or a SiD/DI pickle."""
    distributed.init()
    device = pick_device(device)
    sampler_kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    check_sampler_options(sampler_kwargs)
    cli.check_readable(network_pkl, '--network')
    cli.check_writable_dir(outdir, '--outdir')
    if grid_path is not None:
        cli.check_writable_file(grid_path, '--grid')
    torch.manual_seed(0) # StyleGAN's 'random' noise comes from the global generator
    sample, meta = load_sampler(network_pkl, allow_pickle_code, sigma_init, device, sampler_kwargs, class_idx,
        generator_kwargs=dict(truncation_psi=truncation_psi, noise_mode=noise_mode), raw=raw)
    os.makedirs(outdir, exist_ok=True)

    # Rank r takes every world_size-th batch, so the processes share the work evenly.
    batches = [seeds[i:i + max_batch_size] for i in range(0, len(seeds), max_batch_size)]
    my_batches = batches[distributed.get_rank()::distributed.get_world_size()]
    if meta.get('note'):
        _echo0(meta.note)
    _echo0(f'Generating {len(seeds)} samples ({meta.kind}, {meta.nfe} network calls each) '
        f'on {distributed.get_world_size()} process(es), device {device}...')

    keep = dict() # seed -> output, for samples.npy and the grid
    want_all = meta.is_vector or grid_path is not None
    progress = dnnlib.util.Progress(len(my_batches), 'batches of this process', _echo0)
    progress.update(0)
    for i, batch_seeds in enumerate(my_batches):
        out = sample(batch_seeds, class_idx).cpu()
        if meta.is_vector or out.ndim == 2:
            meta.is_vector = True
            keep.update({seed: v.to(torch.float32).numpy() for seed, v in zip(batch_seeds, out)})
        else:
            images = to_uint8(out)
            for seed, image in zip(batch_seeds, images):
                save_image(image, _image_path(outdir, seed, subdirs))
                if want_all:
                    keep[seed] = image.numpy()
        progress.update(i + 1)

    # Everything below needs every process's outputs: gather them on rank 0.
    if meta.is_vector or grid_path is not None:
        stacked = _gather_in_seed_order(keep, seeds)
        if distributed.is_main():
            _write_collected(stacked, meta.is_vector, outdir, grid_path)
    distributed.barrier()
    _echo0('Done.')
    distributed.shutdown()

def _write_collected(stacked, is_vector, outdir, grid_path):
    if grid_path is not None and os.path.dirname(grid_path):
        os.makedirs(os.path.dirname(grid_path), exist_ok=True)
    if is_vector:
        _save_npy_atomically(stacked, os.path.join(outdir, 'samples.npy'))
        save_scatter_png(stacked, os.path.join(outdir, 'scatter.png'))
        if grid_path is not None: # the scatter plot is the "grid" of vector data
            save_scatter_png(stacked, grid_path)
    else:
        save_image_grid(torch.from_numpy(stacked), grid_path)

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
