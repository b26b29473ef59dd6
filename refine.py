"""Refine or distil a generator with a diffusion teacher, data-free.

Examples:
  # Distil an EDM teacher into a one-step generator with Diff-Instruct.
  torchrun --nproc_per_node=8 refine.py --teacher edm.pkl --gen teacher --sigma-init 1.0 --outdir runs
  # A 2-D Gaussian-mixture teacher (exact score) and an MLP generator.
  python refine.py --teacher gmm:ring8 --gen mlp --outdir runs --kimg 200
  # Another divergence, with its own options.
  python refine.py --teacher gmm:ring8 --gen mlp --outdir runs --divergence sid --div-opt alpha=1.0
  python refine.py --teacher gmm:ring8 --gen mlp --outdir runs --divergence fdiv --div-opt f=kl
  # Refine an existing StyleGAN2 generator with the teacher (its mapping network frozen).
  torchrun --nproc_per_node=8 refine.py --gen stylegan2.pkl --teacher edm.pkl --train-params synthesis --outdir runs
"""

import json
import os
import re

import click
import torch

from refine import run
from torch_utils import distributed, train_utils

def _resume_state(path):
    try:
        return train_utils.latest_training_state(path)
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint='--resume') from None

def _parse_value(text):
    """A --div-opt value: bool (true/false/yes/no/on/off), int, float, none, or the string."""
    lowered = text.strip().lower()
    if lowered in ('true', 'yes', 'on'):
        return True
    if lowered in ('false', 'no', 'off'):
        return False
    if lowered in ('none', 'null'):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

def parse_div_opts(pairs):
    """('alpha=1.0', 'f=js', ...) -> {'alpha': 1.0, 'f': 'js'}; a clean error for bad syntax."""
    opts = {}
    for pair in pairs or ():
        key, sep, value = pair.partition('=')
        key = key.strip().replace('-', '_')
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE, got '{pair}'", param_hint='--div-opt')
        if key in ('sigma_data', 'fake_steps'):
            hint = 'use --fake-steps' if key == 'fake_steps' else 'it comes from the teacher'
            raise click.BadParameter(f"'{key}' is not a divergence option here ({hint})", param_hint='--div-opt')
        opts[key] = _parse_value(value)
    return opts

@click.command(context_settings=dict(show_default=True))
@click.option('--teacher',      help='Teacher: EDM pickle path/URL, or gmm:PRESET', metavar='PKL|gmm:NAME', type=str)
@click.option('--gen',          help='Generator: teacher, mlp, or a pickle path/URL', metavar='SPEC', type=str, default='teacher')
@click.option('--outdir',       help='Where to make the run directory', metavar='DIR', type=str)
@click.option('--divergence',   help='Divergence to minimise: di, sid, dmd, sim, fdiv, vardiu', type=str, default=None)
@click.option('--div-opt',      help='Divergence option KEY=VALUE (repeatable), e.g. alpha=1.0, f=js', metavar='KEY=VALUE', type=str, multiple=True)
@click.option('--batch',        help='Global batch size (images per iteration)', type=click.IntRange(min=1), default=None)
@click.option('--batch-gpu',    help='Images per process per accumulation round', type=click.IntRange(min=1), default=None)
@click.option('--lr',           help='Fake-score learning rate', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--glr',          help='Generator learning rate', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--sigma-init',   help='Noise level of the one-step generator', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--truncation',   help='StyleGAN --gen: truncation psi [default: 1]', type=float, default=None)
@click.option('--noise-mode',   help='StyleGAN --gen: per-layer noise [default: random]', type=click.Choice(['random', 'const', 'none']), default=None)
@click.option('--train-params', help='StyleGAN --gen: parameters to refine; synthesis = mapping frozen [default: all]', type=click.Choice(['all', 'synthesis', 'mapping']), default=None)
@click.option('--fake-warmup',  help='First KIMG of --kimg update only the fake score (a GAN far from the teacher) [default: 0]', metavar='KIMG', type=click.FloatRange(min=0), default=None)
@click.option('--fake-steps',   help='Fake-score updates per generator update', type=click.IntRange(min=1), default=None)
@click.option('--ema',          help='EMA half-life of the generator [kimg]', type=click.FloatRange(min=0), default=None)
@click.option('--kimg',         help='Training duration [kimg]', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--max-minutes',  help='Also stop (snapshot and state) at the first tick after this many minutes; --resume continues', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--tick',         help='Progress interval [kimg]', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--snap',         help='Snapshot interval [ticks]', type=click.IntRange(min=1), default=None)
@click.option('--seed',         help='Random seed', type=int, default=None)
@click.option('--metrics',      help='Metrics at each snapshot, e.g. fd10k,fid10k (see fid.py)', metavar='LIST', type=str)
@click.option('--metric-ref',   help='Reference for --metrics: dataset ZIP/dir or .npz', metavar='PATH', type=str)
@click.option('--resume',       help='Continue a run: its directory or a training-state .pt', metavar='PATH', type=str)
@click.option('--allow-pickle-code', help='Run code embedded in pickles (trusted files only)', is_flag=True)
@click.option('--dry-run',      help='Print the resolved options and exit', is_flag=True)
def main(**opts):
    """Refine a generator with a diffusion teacher by minimising a diffusion divergence."""
    distributed.init()
    resume_state = None
    if opts['resume']:
        resume_state = _resume_state(opts['resume'])
        run_dir = os.path.dirname(os.path.abspath(resume_state))
        options_path = os.path.join(run_dir, 'options.json')
        if not os.path.isfile(options_path):
            raise click.BadParameter(f'{run_dir} has no options.json: not a refine.py run', param_hint='--resume')
        with open(options_path) as f:
            saved = json.load(f)
        if opts['kimg'] is not None:
            saved['kimg'] = opts['kimg']
        saved['max_minutes'] = opts['max_minutes'] # a limit of this invocation, not of the run
        opts = dict(saved, resume=opts['resume'], dry_run=opts['dry_run'],
            allow_pickle_code=opts['allow_pickle_code'])
        if opts.get('div_opt') is None:
            opts['div_opt'] = {}
    else:
        if not opts['teacher']:
            raise click.BadParameter('a teacher is required', param_hint='--teacher')
        if not opts['outdir'] and not opts['dry_run']:
            raise click.BadParameter('an output directory is required', param_hint='--outdir')
        opts['div_opt'] = parse_div_opts(opts['div_opt'])
    o = run.resolve_options(opts)

    torch.manual_seed(o.seed) # initial weights of built networks (MLPs) depend on it
    try:
        setup = run.prepare(o)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    distributed.print0(json.dumps(setup.summary, indent=2))
    if o.dry_run:
        return

    if resume_state is None:
        desc = f"{o.divergence}-{re.sub(r'[^A-Za-z0-9]+', '_', os.path.basename(o.teacher))[:40]}-gen_{os.path.basename(o.gen)[:20]}"
        run_dir = train_utils.next_run_dir(o.outdir, desc) if distributed.is_main() else None
        run_dir = distributed.all_gather_object(run_dir)[0]
        if distributed.is_main():
            os.makedirs(run_dir)
            with open(os.path.join(run_dir, 'options.json'), 'w') as f:
                json.dump({k: v for k, v in o.items() if k not in ('resume', 'dry_run', 'max_minutes')}, f, indent=2)
    distributed.print0(f'Run directory: {run_dir}')
    run.launch(setup, run_dir, resume_state=resume_state)

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
