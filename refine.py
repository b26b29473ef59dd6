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

from refine import run, speed
from refine.divergences import DIVERGENCES, coerce_options, describe_options, divergence_class
from torch_utils import cli, distributed, train_utils

def _default(key):
    """'[default: X; Y for gmm: teachers]' from refine.run's defaults, for --help."""
    value, vector = run.DEFAULTS.get(key), run.VECTOR_DEFAULTS.get(key)
    text = f'[default: {value:g}' if isinstance(value, float) else f'[default: {value}'
    if vector is not None and vector != value:
        text += f'; {vector:g}' if isinstance(vector, float) else f'; {vector}'
        text += ' for gmm: teachers'
    return text + ']'

EXAMPLES = '\b\nExamples:\n' + __doc__.split('Examples:\n', 1)[1]

def parse_div_opts(pairs):
    """('alpha=1.0', 'f=js', ...) -> {'alpha': '1.0', 'f': 'js'}: the syntax only; the values
    are typed by the chosen divergence's defaults (refine.divergences.coerce_options)."""
    opts = {}
    for pair in pairs or ():
        key, sep, value = pair.partition('=')
        key = key.strip().replace('-', '_')
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE (or help), got '{pair}'", param_hint='--div-opt')
        opts[key] = value
    return opts

def parse_compile(value):
    """--compile: off -> False, on -> True (inductor), another word -> that backend's name."""
    if value is None or isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ('off', 'false', 'no', 'none', '0'):
        return False
    if lowered in ('on', 'true', 'yes', 'inductor', '1'):
        return True
    if not lowered.replace('_', '').isalnum():
        raise click.BadParameter(f"'{value}' is not off, on or a backend name", param_hint='--compile')
    return lowered

class LrSteps(click.ParamType):
    """--lr-steps: checked by train_utils.parse_lr_steps, kept as the text the user wrote."""
    name = 'lr_steps'
    def convert(self, value, param, ctx):
        try:
            train_utils.parse_lr_steps(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return value

# What `--resume RUN` may change: the length, and learning-rate steps with their restart (a step
# at or after the resumed kimg leaves the run identical to one that had it from the start).
# Saved with the run.
RESUME_OVERRIDES = ('kimg', 'lr_steps', 'restart_from_ema')

def saved_options(run_dir, ctx):
    """The options of the run in `run_dir` (its options.json), each checked as the command line
    would check it: a hostile or damaged file is refused with one line, never acted on."""
    path = os.path.join(run_dir, 'options.json')
    if not os.path.isfile(path):
        raise click.BadParameter(f'{run_dir} has no options.json: not a refine.py run', param_hint='--resume')
    try:
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f'cannot read {path}: {cli.one_line(e)}', param_hint='--resume') from None
    if not isinstance(saved, dict):
        raise click.BadParameter(f'{path}: not an options file', param_hint='--resume')
    params = {p.name: p for p in ctx.command.params}
    checked = {}
    for key, value in saved.items():
        if key in run.INVOCATION_OPTIONS:
            continue # this invocation's own
        if key == 'div_opt':
            if value is not None and not isinstance(value, dict):
                raise click.BadParameter(f'{path}: div_opt must be an object', param_hint='--resume')
            checked[key] = value or {}
        elif key in params and value == run.DEFAULTS.get(key, object()):
            checked[key] = value # a default the flag cannot spell ('auto' of a boolean flag)
        elif key in params:
            try: # the flag's type, not its range: a resolved value may be outside it (vardiu's 0 fake steps)
                kind = params[key].type
                kind = click.INT if isinstance(kind, click.IntRange) else cli.FiniteFloat() if isinstance(kind, click.FloatRange) else kind
                checked[key] = None if value is None else kind.convert(value, params[key], ctx)
            except click.BadParameter as e:
                raise click.BadParameter(f'{path}: {key}: {e.message}', param_hint='--resume') from None
        elif key in run.DEFAULTS: # a library-side setting without a flag: its default's type
            default = run.DEFAULTS[key]
            if value is not None and default is not None and type(value) is not type(default):
                raise click.BadParameter(f'{path}: {key} must be a {type(default).__name__}', param_hint='--resume')
            checked[key] = value
        else:
            raise click.BadParameter(f'{path}: unknown option {key!r}', param_hint='--resume')
    checked.setdefault('mlp_slots', 0) # runs saved before slots existed used a plain MLP
    return checked

@click.command(cls=cli.Command, context_settings=dict(show_default=True, max_content_width=120), epilog=EXAMPLES)
@click.option('--teacher',      help='Teacher: EDM pickle path/URL, gmm:PRESET or gmm:FILE.json', metavar='PKL|gmm:NAME', type=str)
@click.option('--gen',          help='Generator: teacher, mlp, or a pickle path/URL', metavar='SPEC', type=str, default='teacher')
@click.option('--outdir',       help='Where to make the run directory', metavar='DIR', type=str)
@click.option('--divergence',   help=f"Divergence to minimise: {', '.join(DIVERGENCES)}  {_default('divergence')}", type=str, default=None)
@click.option('--div-opt',      help='Divergence option KEY=VALUE (repeatable), e.g. alpha=1.0, f=js; --div-opt help lists them', metavar='KEY=VALUE', type=str, multiple=True)
@click.option('--batch',        help=f"Global batch size (images per iteration)  {_default('batch')}", type=click.IntRange(min=1), default=None)
@click.option('--batch-gpu',    help='Images per process per accumulation round  [default: the whole per-process batch]', type=click.IntRange(min=1), default=None)
@click.option('--lr',           help=f"Fake-score learning rate  {_default('lr')}", type=cli.positive_float(), default=None)
@click.option('--glr',          help=f"Generator learning rate  {_default('glr')}", type=cli.positive_float(), default=None)
@click.option('--lr-steps',     help='Learning-rate steps: from each KIMG on, every learning rate is FACTOR x its own, e.g. 30:0.2  [default: none]', metavar='KIMG:FACTOR,...', type=LrSteps(), default=None)
@click.option('--restart-from-ema/--no-restart-from-ema', help=f"At each --lr-steps step the generator continues from its EMA (docs/mnist-teacher.md)  {_default('restart_from_ema')}", default=None)
@click.option('--sigma-init',   help='Noise level of the one-step generator  [default: the divergence\'s: di 1, sid/sim 2.5, dmd 80]', type=cli.positive_float(), default=None)
@click.option('--truncation',   help='StyleGAN --gen: truncation psi [default: 1]', type=cli.FiniteFloat(), default=None)
@click.option('--noise-mode',   help='StyleGAN --gen: per-layer noise [default: random]', type=click.Choice(['random', 'const', 'none']), default=None)
@click.option('--train-params', help='StyleGAN --gen: parameters to refine; synthesis = mapping frozen [default: all]', type=click.Choice(['all', 'synthesis', 'mapping']), default=None)
@click.option('--data',         help='Dataset (ZIP or folder, dataset_tool.py) for the optional real-data GAN terms; needed by sida, dmd2  [default: none, data-free]', metavar='ZIP|DIR', type=str, default=None)
@click.option('--fake-warmup',  help='First KIMG of --kimg update only the fake score (a GAN far from the teacher) [default: 0]', metavar='KIMG', type=cli.nonnegative_float(), default=None)
@click.option('--fake-steps',   help='Fake-score updates per generator update  [default: the divergence\'s (1; dmd/fdiv 5); at least 4 for gmm: teachers]', type=click.IntRange(min=1), default=None)
@click.option('--mlp-slots',    help="--gen mlp: equally likely learned codes the latent picks from, so mass can sit on separated components without bridges; 0 = a plain MLP  [default: 8 per mixture component, 64 to 512]", type=click.IntRange(min=0), default=None)
@click.option('--ema',          help=f"EMA half-life of the generator [kimg]  {_default('ema')}", type=cli.nonnegative_float(), default=None)
@click.option('--ema-rampup',   help=f"EMA ramp-up: half-life at most this fraction of the images seen; 0 = off  {_default('ema_rampup')}", type=cli.nonnegative_float(), default=None)
@click.option('--kimg',         help=f"Training duration [kimg]  {_default('kimg')}", type=cli.positive_float(), default=None)
@click.option('--max-minutes',  help='Also stop (snapshot and state) at the first tick after this many minutes; --resume continues', type=cli.positive_float(), default=None)
@click.option('--tick',         help=f"Progress interval [kimg]  {_default('tick')}", type=cli.positive_float(), default=None)
@click.option('--snap',         help=f"Snapshot interval [ticks]  {_default('snap')}", type=click.IntRange(min=1), default=None)
@click.option('--seed',         help=f"Random seed  {_default('seed')}", type=int, default=None)
@click.option('--metrics',      help='Metrics at each snapshot, e.g. fd10k,fid10k (see fid.py)', metavar='LIST', type=str)
@click.option('--metric-ref',   help='Reference for --metrics: dataset ZIP/dir or .npz', metavar='PATH', type=str)
@click.option('--reuse-samples/--no-reuse-samples', help=f"Speed: the fake-score update reuses the generator update's samples (one generator forward fewer)  {_default('reuse_samples')}", default=None)
@click.option('--amp',          help=f"Speed: bf16 autocast for no-grad passes, the losses, or all (CPUs with bf16 units, GPUs)  {_default('amp')}", type=click.Choice(['off', 'nograd', 'loss', 'all', 'auto']), default=None)
@click.option('--compile',      help='Speed: torch.compile the network calls (on, or a backend name)  [default: off]', metavar='off|on|BACKEND', type=str, default=None)
@click.option('--fused-optim/--no-fused-optim', help=f"Speed: fused Adam steps and a foreach EMA  {_default('fused_optim')}", default=None)
@click.option('--tf32/--no-tf32', help=f"Speed: TF32 matrix products on GPUs  {_default('tf32')}", default=None)
@click.option('--attention',    help=f"Speed: EDM attention by scaled_dot_product_attention or explicit products (auto: sdpa on GPUs)  {_default('attention')}", type=click.Choice(['auto', 'sdpa', 'matmul']), default=None)
@click.option('--dropout-mask', help=f"Speed: EDM dropout masks from 16-bit uniform draws, or bernoulli (NVlabs' random stream)  {_default('dropout_mask')}", type=click.Choice(['uniform', 'bernoulli']), default=None)
@click.option('--channels-last/--no-channels-last', help=f"Speed: channels_last memory layout for the EDM UNets (auto: on CPUs with the fused-norm kernel)  {_default('channels_last')}", default=None)
@click.option('--recompute/--no-recompute', help=f"Memory: recompute norm/activation chains in the backward pass (same results)  {_default('recompute')}", default=None)
@click.option('--fused-norm/--no-fused-norm', help=f"Speed: EDM GroupNorm-SiLU-dropout as one compiled CPU kernel (float32 rounding)  {_default('fused_norm')}", default=None)
@click.option('--resume',       help='Continue a run: its directory or a training-state .pt', metavar='PATH', type=str)
@click.option('--allow-pickle-code', help='Run code embedded in pickles (trusted files only)', is_flag=True)
@click.option('--dry-run',      help='Print the resolved options and exit', is_flag=True)
@cli.user_errors
def main(**opts):
    """Refine a generator with a diffusion teacher by minimising a diffusion divergence."""
    speed.configure_malloc() # the allocator settings the Makefile exports, for any launcher
    distributed.init()
    ctx = click.get_current_context()
    resume_state, overridden = None, []
    if 'help' in opts['div_opt']:
        name = opts['divergence'] or run.DEFAULTS['divergence']
        divergence_class(name)
        click.echo('\n'.join(describe_options(name)))
        return
    if opts['resume']:
        try:
            resume_state = train_utils.latest_training_state(opts['resume'], log=distributed.print0)
        except (OSError, ValueError) as e:
            raise click.BadParameter(cli.one_line(e), param_hint='--resume') from None
        run_dir = os.path.dirname(os.path.abspath(resume_state))
        saved = saved_options(run_dir, ctx)
        overridden = [key for key in RESUME_OVERRIDES if opts[key] is not None]
        for key in overridden:
            saved[key] = opts[key]
        ignored = [f"--{name.replace('_', '-')}" for name in opts
            if name not in RESUME_OVERRIDES + run.INVOCATION_OPTIONS
            and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if ignored:
            distributed.print0(f"Warning: {', '.join(ignored)} ignored with --resume: the run keeps its options.json "
                f"(only {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)} may change)")
        opts = dict(saved, resume=opts['resume'], dry_run=opts['dry_run'], max_minutes=opts['max_minutes'],
            allow_pickle_code=opts['allow_pickle_code'])
    else:
        if not opts['teacher']:
            raise click.BadParameter('a teacher is required', param_hint='--teacher')
        if not opts['dry_run']:
            cli.check_writable_dir(opts['outdir'], '--outdir')
        opts['div_opt'] = parse_div_opts(opts['div_opt'])
    opts['compile'] = parse_compile(opts.get('compile'))
    o = run.resolve_options(opts)
    try:
        divergence_class(o.divergence)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--divergence') from None
    try:
        o.div_opt = coerce_options(o.divergence, o.div_opt)
    except ValueError as e:
        raise click.BadParameter(str(e).replace('--div-opt ', ''), param_hint='--div-opt') from None

    torch.manual_seed(o.seed) # initial weights of built networks (MLPs) depend on it
    setup = run.prepare(o)
    distributed.print0(json.dumps(setup.summary, indent=2))
    if o.dry_run:
        return

    if overridden and distributed.is_main():
        run.save_options(run_dir, o) # a later --resume continues with them
    if resume_state is None:
        desc = f"{o.divergence}-{re.sub(r'[^A-Za-z0-9]+', '_', os.path.basename(o.teacher))[:40]}-gen_{os.path.basename(o.gen)[:20]}"
        run_dir = run.make_run_dir(o, desc) if distributed.is_main() else None
        run_dir = distributed.all_gather_object(run_dir)[0]
    # Rank 0 copies everything it prints to log.txt in the run directory (appended on resume).
    with cli.run_log(os.path.join(run_dir, 'log.txt'), enabled=distributed.is_main()):
        distributed.print0(f'Run directory: {run_dir}')
        run.launch(setup, run_dir, resume_state=resume_state)

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
