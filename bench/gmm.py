"""Gaussian-mixture benchmark: refine an MLP generator on every preset with the exact teacher.

Prints, per divergence and preset: MMD of the student (10k vs 10k, RBF over bandwidths
0.25..4) beside the noise floor (true vs true), mode coverage, fraction of samples on a mode,
mean log-likelihood under the target (student and true samples) and wall time. Writes scatter
PNGs (target, before, after) under --outdir.

  python bench/gmm.py --presets ring8,grid25,mog40,gauss64 --kimg 300
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from refine import toy_experiment # pylint: disable=wrong-import-position
from refine.teachers import GMM_PRESETS # pylint: disable=wrong-import-position

HEADER = ('| divergence | preset | kimg | MMD before | MMD after | noise floor | modes covered '
          '| on-mode | loglik (true) | time |')

def table_row(r):
    a, b = r.after, r.before
    return (f'| {r.divergence} | {r.preset} | {r.kimg:g} | {b["mmd"]:.4f} | {a["mmd"]:.5f} | '
            f'{a["mmd_floor"]:.5f} | {a["covered"]}/{a["modes"]} | {a["on_mode"]:.2f} | '
            f'{a["loglik"]:.2f} ({a["loglik_true"]:.2f}) | {r.seconds:.0f} s |')

@click.command()
@click.option('--presets', default=','.join(GMM_PRESETS), show_default=True, help='Comma-separated presets')
@click.option('--divergences', default='di', show_default=True, help='Comma-separated divergences')
@click.option('--kimg', default=300.0, show_default=True, help='Budget per run [kimg]')
@click.option('--seed', default=0, show_default=True)
@click.option('--outdir', default='out/bench-gmm', show_default=True)
def main(presets, divergences, kimg, seed, outdir):
    # Small MLPs gain nothing from a second intra-op thread, and lose badly on a busy machine.
    torch.set_num_threads(1)
    rows = []
    for divergence in divergences.split(','):
        for preset in presets.split(','):
            if preset not in GMM_PRESETS:
                raise click.BadParameter(f"unknown preset '{preset}'", param_hint='--presets')
            print(f'{divergence} on {preset} ...', flush=True)
            r = toy_experiment.refine_preset(preset, outdir, divergence=divergence, kimg=kimg, seed=seed)
            rows.append(table_row(r))
            print(rows[-1], flush=True)
    print('\n' + HEADER + '\n' + '|---' * 10 + '|\n' + '\n'.join(rows))

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
