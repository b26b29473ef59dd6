"""Weight-recovery bench: does each divergence put each mixture component's mass where its weight says?

For every teacher (gmm:PRESET or gmm:FILE.json) and divergence, refines the vector-default MLP
generator with refine.py's code path and prints, from `--eval-n` samples of the EMA generator:
the unbiased MMD^2 (RBF bandwidths 0.25..4) before and after, beside the same statistic between
two exact sample sets (zero in expectation: its size is the noise), the total-variation distance
between the Bayes-cell component masses (of `--mass-n` samples, 200k: with 10k the masses' own
sampling noise alone gives an exact sampler a TV of 0.01-0.024 on the presets) and the weights,
beside the same TV of exact samples (its floor), the worst relative mass error and its
component, the fraction on a mode (3-std regions) and the modes covered; then each component's
mass / weight. Writes a scatter PNG per run (teacher's 2-std ellipses under the samples) and,
per run, gmm-metrics.jsonl with the same metrics every `--tick` kimg.

  python bench/gmm_weights.py --teachers gmm:ring8,gmm:grid25,gmm:mog40,gmm:gauss64 --kimg 300
  python bench/gmm_weights.py --teachers gmm:my_mixture.json --divergences di,sid,dmd,sim,fdiv,vardiu
  python bench/gmm_weights.py --teachers gmm:ring8 --divergences di --reference

`--reference` adds a row per teacher for the capacity reference: the same MLP generator fitted
directly to exact teacher samples by a sample-based loss (sliced Wasserstein, 64 directions,
batch and step count of the runs), i.e. what this generator reaches without any divergence.
A divergence may carry options as NAME:KEY=VALUE[:KEY=VALUE...], as in bench/gmm.py.
Target: TV <= 0.05 and every component's mass within 30% of its weight.
"""

import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from refine import generators, run, teachers, toy_metrics # pylint: disable=wrong-import-position
from refine.divergences import coerce_options # pylint: disable=wrong-import-position
from refine.plots import save_scatter_png # pylint: disable=wrong-import-position
from torch_utils import train_utils # pylint: disable=wrong-import-position

def parse_spec(spec):
    """'sid:alpha=0.5' -> ('sid', {'alpha': 0.5})."""
    name, *pairs = spec.split(':')
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep:
            raise click.BadParameter(f"expected NAME:KEY=VALUE, got '{spec}'", param_hint='--divergences')
        opts[key] = value
    try: # typed by the divergence's own defaults, as refine.py --div-opt does
        return name, coerce_options(name, opts)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--divergences') from None

def _label(spec):
    return os.path.basename(spec[len('gmm:'):]) if isinstance(spec, str) and spec.startswith('gmm:') else str(spec)

@torch.no_grad()
def evaluate(G, teacher, n, seed, mass_n=None):
    """The bench's metrics of generator G (z -> x) on n samples; the component masses on
    max(n, mass_n) samples of the same draw: they cost one argmax per sample, and with few
    samples their own noise adds to the TV (see exact_floors)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn([max(n, mass_n or n), *G.z_shape], generator=g)
    x_all = G(z).cpu().to(torch.float32)
    x = x_all[:n]
    y = teacher.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    masses = toy_metrics.component_masses(x_all, teacher)
    coverage = toy_metrics.mode_coverage(x, teacher)
    return dict(mmd2=toy_metrics.mmd_rbf_unbiased(x, y), tv=masses['tv'], max_rel=masses['max_rel_error'],
        worst=masses['worst'], masses=masses['masses'], weights=masses['weights'], on_mode=coverage['quality'],
        covered=coverage['covered'], modes=coverage['total'], samples=x)

def exact_floors(teacher, n, mass_n, seed):
    """What a perfect student scores: the unbiased MMD^2 between two exact sample sets of size n,
    and the weight TV of mass_n exact samples (their sampling noise plus the overlap of Bayes cells)."""
    a = teacher.sample(n, generator=torch.Generator().manual_seed(seed + 101))
    b = teacher.sample(n, generator=torch.Generator().manual_seed(seed + 102))
    exact = teacher.sample(mass_n, generator=torch.Generator().manual_seed(seed + 103))
    return toy_metrics.mmd_rbf_unbiased(a, b), toy_metrics.component_masses(exact, teacher)['tv']

def refine_once(spec, divergence, div_opt, kimg, seed, outdir, tick, eval_n, mass_n, overrides, log):
    opts = dict(teacher=spec, gen='mlp', outdir=outdir, divergence=divergence, kimg=kimg, seed=seed,
        tick=tick, snap=10 ** 9, allow_pickle_code=False, resume=None, dry_run=False, div_opt=div_opt)
    opts.update({k: v for k, v in overrides.items() if v is not None})
    o = run.resolve_options(opts)
    torch.manual_seed(seed)
    setup = run.prepare(o)
    before = evaluate(setup.G, setup.teacher, eval_n, seed)
    run_dir = os.path.join(outdir, f"{_label(spec).replace('.json', '')}-{divergence}")
    os.makedirs(run_dir, exist_ok=True)
    if os.path.exists(os.path.join(run_dir, 'gmm-metrics.jsonl')):
        os.remove(os.path.join(run_dir, 'gmm-metrics.jsonl'))
    ticker = toy_metrics.TickLogger(setup.teacher, n=2000, seed=seed, log=log)
    start = time.time()
    result = run.launch(setup, run_dir, log=lambda *_: None, on_tick=ticker)
    seconds = time.time() - start - ticker.seconds
    return setup.teacher, before, evaluate(result.G_ema, setup.teacher, eval_n, seed, mass_n), seconds, run_dir

def fit_reference(teacher, kimg, batch, lr, hidden, seed, eval_n, mass_n, directions=64, slots=None):
    """Capacity reference: the vector MLP generator fitted to exact samples by sliced Wasserstein."""
    torch.manual_seed(seed)
    G, _ = generators.build_generator('mlp', teacher, mlp_kwargs=dict(hidden=hidden, slots='auto' if slots is None else slots)) # the runs' generator
    before = evaluate(G, teacher, eval_n, seed)
    opt = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.999))
    g = torch.Generator().manual_seed(seed + 7)
    start = time.time()
    for _ in range(max(1, int(kimg * 1000 / batch))):
        x = G(torch.randn([batch, *G.z_shape], generator=g))
        y = teacher.sample(batch, generator=g)
        dirs = torch.randn([teacher.dim, directions], generator=g)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        loss = ((x @ dirs).sort(0).values - (y @ dirs).sort(0).values).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    G.eval()
    return before, evaluate(G, teacher, eval_n, seed, mass_n), time.time() - start

def row(label, teacher_label, kimg, before, after, floors, seconds):
    return (f"| {label} | {teacher_label} | {kimg:g} | {before['mmd2']:.5f} | {after['mmd2']:.5f} | {floors[0]:+.5f} | "
        f"{after['tv']:.3f} | {floors[1]:.3f} | {after['max_rel']:.0%} ({after['worst']}) | {after['on_mode']:.2f} | "
        f"{after['covered']}/{after['modes']} | {seconds:.0f} s |")

def mass_line(label, teacher_label, after):
    ratios = ' '.join(f'{m / w:.2f}' for m, w in zip(after['masses'], after['weights']))
    return f'{label} on {teacher_label}: mass/weight per component: {ratios}'

@click.command()
@click.option('--teachers', 'teacher_specs', default='gmm:ring8,gmm:grid25,gmm:mog40,gmm:gauss64', show_default=True,
    help='Comma-separated gmm:PRESET or gmm:FILE.json')
@click.option('--divergences', default='di,sid,dmd,sim,fdiv,vardiu', show_default=True, help='Comma-separated divergences')
@click.option('--kimg', default=300.0, show_default=True, help='Budget per run [kimg]')
@click.option('--seed', default=0, show_default=True)
@click.option('--eval-n', default=10000, show_default=True, help='Samples for the final metrics')
@click.option('--mass-n', default=200000, show_default=True, help='Samples for the component masses (weight TV)')
@click.option('--tick', default=None, type=float, help='kimg between per-tick metrics [default: kimg/10]')
@click.option('--glr', default=None, type=float, help='Generator learning rate [default: the vector default]')
@click.option('--lr', default=None, type=float, help='Fake-score learning rate [default: the vector default]')
@click.option('--lr-steps', default=None, help="Learning-rate steps KIMG:FACTOR,... (refine.py --lr-steps) [default: none]")
@click.option('--restart-from-ema', is_flag=True, help='At each --lr-steps step the generator continues from its EMA')
@click.option('--mlp-slots', default=None, type=click.IntRange(min=0), help="Generator slots (refine.py --mlp-slots) [default: refine.py's]")
@click.option('--reference', is_flag=True, help='Also fit the capacity reference (sliced Wasserstein) per teacher')
@click.option('--outdir', default='out/bench-gmm-weights', show_default=True)
@click.option('--verbose', is_flag=True, help='Print the per-tick metrics')
def main(teacher_specs, divergences, kimg, seed, eval_n, mass_n, tick, glr, lr, lr_steps, restart_from_ema, mlp_slots, reference, outdir, verbose):
    torch.set_num_threads(1) # tiny MLPs: a second intra-op thread only adds contention
    specs = [parse_spec(s) for s in divergences.split(',') if s]
    try:
        teacher_list = [(spec, teachers.load_teacher(spec)) for spec in teacher_specs.split(',') if spec]
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    try:
        train_utils.parse_lr_steps(lr_steps)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--lr-steps') from None
    log = print if verbose else None
    rows, mass_lines = [], []
    for spec, teacher in teacher_list:
        floors = exact_floors(teacher, eval_n, mass_n, seed)
        if reference:
            o = run.resolve_options(dict(teacher=spec, gen='mlp'))
            b, a, secs = fit_reference(teacher, kimg, o.batch, o.glr, o.mlp_hidden, seed, eval_n, mass_n, slots=mlp_slots)
            rows.append(row('reference (SW fit)', _label(spec), kimg, b, a, floors, secs))
            mass_lines.append(mass_line('reference', _label(spec), a))
            print(rows[-1], flush=True)
        for name, opts in specs:
            label = name + ''.join(f':{k}={v}' for k, v in opts.items())
            try:
                t, b, a, secs, run_dir = refine_once(spec, name, opts, kimg, seed, outdir, tick or max(kimg / 10, 1),
                    eval_n, mass_n, dict(glr=glr, lr=lr, lr_steps=lr_steps, restart_from_ema=restart_from_ema or None, mlp_slots=mlp_slots), log)
            except ValueError as e:
                raise click.ClickException(str(e)) from None
            save_scatter_png(a['samples'][:4000, :2].numpy(), os.path.join(run_dir, 'after.png'), components=t,
                title=f"{label} on {_label(spec)}, {kimg:g} kimg: TV {a['tv']:.3f}, MMD2u {a['mmd2']:.2g}")
            rows.append(row(label, _label(spec), kimg, b, a, floors, secs))
            mass_lines.append(mass_line(label, _label(spec), a))
            print(rows[-1], flush=True)
    print('\n| divergence | teacher | kimg | MMD2u before | MMD2u after | MMD2u exact vs exact | weight TV '
        '| weight TV of exact samples | worst mass error (component) | on-mode | modes | time |\n' + '|---' * 12 + '|')
    print('\n'.join(rows))
    print('\n' + '\n'.join(mass_lines))
    print(f'\nMMD2u: unbiased MMD^2 on {eval_n} vs {eval_n} samples (exact vs exact: its noise). Weight TV and '
        f'masses: Bayes-cell masses of {mass_n} samples of the EMA generator (of exact samples: the floor). Target: TV <= 0.05 and every mass/weight '
        'in [0.7, 1.3].')
    ok = sum(1 for line in mass_lines if all(0.7 <= float(r) <= 1.3 for r in line.split(': ')[-1].split()))
    print(f'{ok}/{len(mass_lines)} runs have every component within 30% of its weight.')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
