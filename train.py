"""Train an EDM diffusion model (a teacher) on an image dataset made by dataset_tool.py.

Examples:
  # A small class-conditional MNIST teacher on CPU.
  python train.py --data datasets/mnist-32x32.zip --outdir pretrained-runs/mnist-teacher --cond \\
      --cbase 24 --cres 1,2,2 --blocks 1 --attn 16 --batch 64 --lr 1e-3 --duration 2 --ema 0.05
  # Continue it (exact: weights, EMA, optimizer, data order and noise).
  python train.py --resume pretrained-runs/mnist-teacher/00000-mnist-32x32-cond-ddpmpp-edm-gpus1-batch64
  # Many GPUs.
  torchrun --nproc_per_node=8 train.py --data datasets/cifar10-32x32.zip --outdir runs --cond
"""

import inspect
import json
import os
import shutil
import zipfile

import click
from click.core import ParameterSource
import torch


import dnnlib
from torch_utils import cli, distributed, train_utils
from training import training_loop

# Per-architecture defaults and the UNet options that define each architecture.
ARCHS = dict(
    ddpmpp=dict(model_type='SongUNet', cbase=128, cres=[2, 2, 2], blocks=4, attn=[16],
        unet=dict(embedding_type='positional', encoder_type='standard', decoder_type='standard',
            channel_mult_noise=1, resample_filter=[1, 1])),
    ncsnpp=dict(model_type='SongUNet', cbase=128, cres=[2, 2, 2], blocks=4, attn=[16],
        unet=dict(embedding_type='fourier', encoder_type='residual', decoder_type='standard',
            channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    adm=dict(model_type='DhariwalUNet', cbase=192, cres=[1, 2, 3, 4], blocks=3, attn=[32, 16, 8],
        unet=dict()),
)
PRECONDS = dict(
    edm=('training.networks_edm.EDMPrecond', 'training.loss.EDMLoss'),
    vp=('training.networks_edm.VPPrecond', 'training.loss.VPLoss'),
    ve=('training.networks_edm.VEPrecond', 'training.loss.VELoss'),
)
# Options that may change when a run is resumed: none of them changes what is computed.
RESUME_OVERRIDES = ('duration', 'tick', 'snap', 'dump', 'workers', 'dry_run', 'resume')
# The only classes a training_options.json may name: the file is data, and a name it gives is
# constructed, so anything else (subprocess.Popen, ...) would run code the user never chose.
ALLOWED_CLASSES = {'training.dataset.ImageFolderDataset'} | {name for pair in PRECONDS.values() for name in pair}

def _resume_state(path):
    try:
        return train_utils.latest_training_state(path, log=distributed.print0)
    except (OSError, ValueError) as e:
        raise click.BadParameter(cli.one_line(e), param_hint='--resume') from None

def check_saved_kwargs(kwargs, path):
    """Refuse a training_options.json that names a class outside ALLOWED_CLASSES, or holds
    keys training_loop does not take."""
    if not isinstance(kwargs, dict):
        raise click.BadParameter(f'{path}: not an options file', param_hint='--resume')
    accepted = set(inspect.signature(training_loop.training_loop).parameters) - {'run_dir', 'resume_state', 'log'}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise click.BadParameter(f'{path}: unknown option {unknown[0]!r}', param_hint='--resume')
    def walk(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ('class_name', 'func_name') and item not in ALLOWED_CLASSES:
                    raise click.BadParameter(f'{path} names {key} {item!r}, which is not one of this '
                        f"toolkit's own ({', '.join(sorted(ALLOWED_CLASSES))}); refusing to construct it",
                        param_hint='--resume')
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
    walk(kwargs)
    for key in ('dataset_kwargs', 'network_kwargs', 'loss_kwargs'):
        if not isinstance(kwargs.get(key), dict) or 'class_name' not in kwargs[key]:
            raise click.BadParameter(f'{path}: {key} must name its class', param_hint='--resume')

def _int_list(_ctx, param, value):
    if value is None:
        return None
    try:
        return dnnlib.util.parse_int_list(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers") from None

def _open_dataset(dataset_kwargs):
    try:
        dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
        dataset.check_images(progress=distributed.print0)
        return dataset
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        message = cli.one_line(e)
        message = message if dataset_kwargs['path'] in message else f'{dataset_kwargs["path"]}: {message}'
        raise click.BadParameter(message, param_hint='--data') from None

def build_options(opts):
    """training_loop kwargs from fresh command-line options (validated, one-line errors)."""
    arch = ARCHS[opts['arch']]
    pick = lambda key, default: default if opts[key] is None else opts[key] # pylint: disable=unnecessary-lambda-assignment
    cbase, cres = pick('cbase', arch['cbase']), pick('cres', arch['cres'])
    blocks, attn = pick('blocks', arch['blocks']), pick('attn', arch['attn'])
    if not cres:
        raise click.BadParameter('needs at least one multiplier', param_hint='--cres')

    dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset',
        path=opts['data'], use_labels=opts['cond'], xflip=opts['xflip'], cache=opts['cache'])
    dataset = _open_dataset(dataset_kwargs)
    if opts['cond'] and not dataset.has_labels:
        raise click.BadParameter(f'{opts["data"]} has no labels (dataset.json)', param_hint='--cond')
    dataset_kwargs.update(resolution=dataset.resolution, max_size=len(dataset))
    levels = [dataset.resolution >> i for i in range(len(cres))]
    if levels[-1] < 1 or dataset.resolution % (1 << (len(cres) - 1)) != 0:
        raise click.BadParameter(f'{len(cres)} levels are too many for {dataset.resolution}x'
            f'{dataset.resolution} images', param_hint='--cres')
    if opts['attn'] is None: # the default names resolutions that small images may not have
        attn = [res for res in attn if res in levels]
    bad = sorted(set(attn) - set(levels))
    if bad:
        raise click.BadParameter(f'no UNet level at {bad[0]} (levels: {", ".join(map(str, levels))})',
            param_hint='--attn')
    dataset.close()

    net_class, loss_class = PRECONDS[opts['precond']]
    network_kwargs = dnnlib.EasyDict(class_name=net_class, model_type=arch['model_type'],
        model_channels=cbase, channel_mult=cres, num_blocks=blocks, attn_resolutions=attn,
        dropout=opts['dropout'], **arch['unet'])
    world = distributed.get_world_size()
    if opts['batch'] % world != 0:
        raise click.BadParameter(f'{opts["batch"]} does not split over {world} processes', param_hint='--batch')
    local = opts['batch'] // world
    if opts['batch_gpu'] is not None and local % min(opts['batch_gpu'], local) != 0:
        raise click.BadParameter(f'{opts["batch_gpu"]} does not divide the per-process batch {local}',
            param_hint='--batch-gpu')
    return dict(
        dataset_kwargs=dataset_kwargs,
        data_loader_kwargs=dict(num_workers=opts['workers']),
        network_kwargs=network_kwargs,
        loss_kwargs=dict(class_name=loss_class),
        optimizer_kwargs=dict(lr=opts['lr'], betas=[0.9, 0.999], eps=1e-8),
        seed=opts['seed'], batch_size=opts['batch'], batch_gpu=opts['batch_gpu'],
        total_kimg=opts['duration'] * 1000, ema_halflife_kimg=opts['ema'] * 1000,
        lr_rampup_kimg=opts['lr_rampup'] * 1000, kimg_per_tick=opts['tick'],
        snapshot_ticks=opts['snap'], state_dump_ticks=opts['dump'])

def resume_options(ctx, opts):
    """The saved training_loop kwargs of the run being resumed, with the allowed overrides."""
    given = [name for name in opts if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    fixed = [name for name in given if name not in RESUME_OVERRIDES]
    if fixed:
        raise click.BadParameter('a resumed run keeps its options; only --duration, --tick, --snap, '
            '--dump and --workers may change', param_hint=f"--{fixed[0].replace('_', '-')}")
    state = _resume_state(opts['resume'])
    run_dir = os.path.dirname(os.path.abspath(state))
    options_path = os.path.join(run_dir, 'training_options.json')
    try:
        with open(options_path, encoding='utf-8') as f:
            kwargs = json.load(f)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f'cannot read {options_path}: {cli.one_line(e)}', param_hint='--resume') from None
    check_saved_kwargs(kwargs, options_path)
    for name, key, scale in [('duration', 'total_kimg', 1000), ('tick', 'kimg_per_tick', 1),
            ('snap', 'snapshot_ticks', 1), ('dump', 'state_dump_ticks', 1)]:
        if name in given:
            kwargs[key] = opts[name] * scale
    if 'workers' in given:
        kwargs['data_loader_kwargs'] = dict(kwargs.get('data_loader_kwargs', {}), num_workers=opts['workers'])
    return kwargs, run_dir, state

@click.command(cls=cli.Command, context_settings=dict(show_default=True))
@click.option('--data',       help='Dataset: a ZIP or directory made by dataset_tool.py', metavar='ZIP|DIR', type=str)
@click.option('--outdir',     help='Where to make the run directory', metavar='DIR', type=str)
@click.option('--cond',       help='Train a class-conditional model', is_flag=True)
@click.option('--arch',       help='Network architecture', type=click.Choice(list(ARCHS)), default='ddpmpp')
@click.option('--precond',    help='Preconditioning and loss', type=click.Choice(list(PRECONDS)), default='edm')
@click.option('--cbase',      help='Channel multiplier  [default: 128 ddpmpp/ncsnpp, 192 adm]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres',       help='Channels per resolution  [default: 2,2,2 / 1,2,3,4]', metavar='LIST', type=str, callback=_int_list)
@click.option('--blocks',     help='Residual blocks per resolution  [default: 4 / 3]', metavar='INT', type=click.IntRange(min=1))
@click.option('--attn',       help='Resolutions with self-attention ("" = none)  [default: 16 / 32,16,8]', metavar='LIST', type=str, callback=_int_list)
@click.option('--dropout',    help='Dropout probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0.13)
@click.option('--xflip',      help='Add mirrored copies of the images', is_flag=True)
@click.option('--cache',      help='Keep decoded images in memory', is_flag=True)
@click.option('--lr',         help='Learning rate', metavar='FLOAT', type=cli.positive_float(), default=10e-4)
@click.option('--batch',      help='Global batch size', metavar='INT', type=click.IntRange(min=1), default=512)
@click.option('--batch-gpu',  help='Images per process per accumulation round', metavar='INT', type=click.IntRange(min=1))
@click.option('--duration',   help='Training duration [Mimg]', metavar='FLOAT', type=cli.positive_float(), default=200)
@click.option('--ema',        help='EMA half-life [Mimg]', metavar='FLOAT', type=cli.nonnegative_float(), default=0.5)
@click.option('--lr-rampup',  help='Learning-rate ramp-up [Mimg]', metavar='FLOAT', type=cli.nonnegative_float(), default=10)
@click.option('--tick',       help='Progress interval [kimg]', metavar='FLOAT', type=cli.positive_float(), default=50)
@click.option('--snap',       help='Snapshot interval [ticks]', metavar='INT', type=click.IntRange(min=1), default=50)
@click.option('--dump',       help='Training-state interval [ticks]', metavar='INT', type=click.IntRange(min=1), default=500)
@click.option('--seed',       help='Random seed', metavar='INT', type=click.IntRange(min=0), default=0)
@click.option('--workers',    help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=1)
@click.option('--resume',     help='Continue a run: its directory or a training-state .pt', metavar='PATH', type=str)
@click.option('--dry-run',    help='Print the training options and exit', is_flag=True)
@cli.user_errors
def main(**opts):
    """Train an EDM diffusion model (EDMPrecond + SongUNet/DhariwalUNet) on an image dataset."""
    distributed.init()
    ctx = click.get_current_context()
    if opts['resume']:
        kwargs, run_dir, resume_state = resume_options(ctx, opts)
    else:
        if not opts['data']:
            raise click.BadParameter('a dataset is required', param_hint='--data')
        if not opts['dry_run']:
            cli.check_writable_dir(opts['outdir'], '--outdir')
        kwargs, run_dir, resume_state = build_options(opts), None, None
    if opts['dry_run']:
        distributed.print0(json.dumps(kwargs, indent=2))
        return

    if run_dir is None:
        desc = (f"{os.path.splitext(os.path.basename(os.path.normpath(opts['data'])))[0]}-"
            f"{'cond' if opts['cond'] else 'uncond'}-{opts['arch']}-{opts['precond']}-"
            f"gpus{distributed.get_world_size()}-batch{opts['batch']}")
        run_dir = train_utils.next_run_dir(opts['outdir'], desc) if distributed.is_main() else None
        run_dir = distributed.all_gather_object(run_dir)[0]
        if distributed.is_main():
            os.makedirs(run_dir)
            try:
                train_utils.write_atomic(os.path.join(run_dir, 'training_options.json'), json.dumps(kwargs, indent=2))
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True) # no half-made run folder
                raise
    # Rank 0 copies its output to log.txt in the run directory (appended to on resume).
    with cli.run_log(os.path.join(run_dir, 'log.txt'), enabled=distributed.is_main()):
        distributed.print0(json.dumps(kwargs, indent=2))
        distributed.print0(f'Run directory: {run_dir}')
        training_loop.training_loop(run_dir=run_dir, resume_state=resume_state, log=distributed.print0,
            **kwargs)
    distributed.shutdown()

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
