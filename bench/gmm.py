"""Gaussian-mixture benchmark: refine an MLP generator on every preset with the exact teacher.

Prints, per divergence and preset: MMD of the student (RBF over bandwidths 0.25..4, `--eval-n`
samples each) beside the noise floor (true vs true), mode coverage, fraction of samples on a
mode, mean log-likelihood under the target (student and true samples), wall time, and the
training time (evaluations excluded) and kimg to first reach twice the noise floor, from MMD
evaluations of the EMA generator every `--curve-every` kimg on `--curve-n` samples (the floor
for that threshold is measured at the same sample size). Writes scatter PNGs (target, before,
after) under --outdir.

  python bench/gmm.py --presets ring8,grid25,mog40,gauss64 --kimg 300
  python bench/gmm.py --presets ring8,grid25 --divergences di,sid,dmd,sim,fdiv,vardiu --kimg 200
  python bench/gmm.py --presets ring8 --divergences sid:alpha=0.5,fdiv:f=kl:ratio=one

A divergence may carry options as NAME:KEY=VALUE[:KEY=VALUE...] (values as refine.py --div-opt).
`--reach` lists the multiples of the noise floor whose first-reach times are tabulated.
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from refine import toy_experiment # pylint: disable=wrong-import-position
from refine.divergences import DIVERGENCES, coerce_options # pylint: disable=wrong-import-position
from refine.teachers import GMM_PRESETS # pylint: disable=wrong-import-position

def header(factors):
    return ('| divergence | preset | kimg | MMD before | MMD after | noise floor | modes covered '
        '| on-mode | loglik (true) | time | ' + ' | '.join(f'to {f:g}x floor' for f in factors) + ' |')

def table_row(r, label, factors):
    a, b = r.after, r.before
    reached = []
    for factor in factors:
        hit = None
        for kimg, seconds, mmd in r.curve or []:
            if mmd <= factor * r.curve_floor:
                hit = (kimg, seconds)
                break
        reached.append('—' if r.curve is None else ('not reached' if hit is None else f'{hit[1]:.0f} s ({hit[0]:g} kimg)'))
    return (f'| {label} | {r.preset} | {r.kimg:g} | {b["mmd"]:.4f} | {a["mmd"]:.5f} | '
            f'{a["mmd_floor"]:.5f} | {a["covered"]}/{a["modes"]} | {a["on_mode"]:.2f} | '
            f'{a["loglik"]:.2f} ({a["loglik_true"]:.2f}) | {r.seconds:.0f} s | ' + ' | '.join(reached) + ' |')

def parse_spec(spec):
    """'sid:alpha=0.5' -> ('sid', {'alpha': 0.5}), with refine.py's --div-opt value parsing."""
    name, *pairs = spec.split(':')
    if name not in DIVERGENCES:
        raise click.BadParameter(f"unknown divergence '{name}' (choose from {', '.join(DIVERGENCES)})",
            param_hint='--divergences')
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

@click.command()
@click.option('--presets', default=','.join(GMM_PRESETS), show_default=True, help='Comma-separated presets')
@click.option('--divergences', default='di', show_default=True, help='Comma-separated divergences')
@click.option('--kimg', default=300.0, show_default=True, help='Budget per run [kimg]')
@click.option('--seed', default=0, show_default=True)
@click.option('--outdir', default='out/bench-gmm', show_default=True)
@click.option('--eval-n', default=10000, show_default=True, help='Samples for the final metrics')
@click.option('--curve-every', default=None, type=float, help='kimg between MMD evaluations [default: kimg/40]')
@click.option('--curve-n', default=2000, show_default=True, help='Samples per MMD evaluation during training')
@click.option('--reach', default='2,50', show_default=True, help='Comma-separated multiples of the noise floor to time')
def main(presets, divergences, kimg, seed, outdir, eval_n, curve_every, curve_n, reach):
    torch.set_num_threads(1) # tiny MLPs: a second intra-op thread only adds contention
    specs = [(spec, *parse_spec(spec)) for spec in divergences.split(',')]
    factors = [float(f) for f in reach.split(',')]
    for preset in presets.split(','):
        if preset not in GMM_PRESETS:
            raise click.BadParameter(f"unknown preset '{preset}'", param_hint='--presets')
    every = curve_every or kimg / 40
    rows = []
    for label, divergence, opts in specs:
        for preset in presets.split(','):
            print(f'{label} on {preset} ...', flush=True)
            r = toy_experiment.refine_preset(preset, os.path.join(outdir, label.replace(':', '_')),
                divergence=divergence, kimg=kimg, seed=seed, eval_n=eval_n, curve_every=every,
                curve_n=curve_n, div_opt=opts)
            rows.append(table_row(r, label, factors))
            print(rows[-1], flush=True)
    print(f'\nTime to Kx floor: training seconds (evaluations excluded) and kimg at the first MMD '
          f'evaluation (every {every:g} kimg, {curve_n} samples) at or below K times the noise floor '
          f'of {curve_n} samples.')
    print('\n' + header(factors) + '\n' + '|---' * (10 + len(factors)) + '|\n' + '\n'.join(rows))

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
