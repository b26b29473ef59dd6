"""Data-free vs data-assisted distillation of the shipped MNIST teacher, same protocol and budget:
SiD vs SiDA, DMD vs DMD2 (or any divergence with and without the real-data GAN terms).

Every run: one-step generator initialised from the teacher, each method's own σ_init, fake:G
ratio and noise levels, batch 32, lr 1e-4 for generator and fake score, EMA half-life 1 kimg,
seed 0 (bench/mnist_distill.py's protocol); FD (fast detector, 5000 samples, against the whole
MNIST training set) at every `--snap` kimg and, with `--inception-ref`, Inception FID (`--fid-num`
samples, the teacher's protocol in bench/mnist_reference.py) of the final snapshot's G_ema,
cached in the run folder (fid5000-curve.json, as bench/mnist_distill.py does). `NAME+data` adds the real-data terms to NAME
(refine.py --data); `sida`, `dmd2` always take them. Running the command again continues each
run where it stopped (exact resume).

  python dataset_tool.py --source mnist --split train --dest datasets/mnist-32x32.zip
  OMP_NUM_THREADS=1 python bench/mnist_data_terms.py --divergences sid,sida,dmd,dmd2 --kimg 4 --snap 2 \
      --inception-ref out/mnist-train5k-inception.npz
  OMP_NUM_THREADS=1 python bench/mnist_data_terms.py --divergences di,di+data --kimg 20 --snap 4
"""

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_distill import cached_fid, read_jsonl # pylint: disable=wrong-import-position
from refine import run # pylint: disable=wrong-import-position
from refine.divergences import DIVERGENCES # pylint: disable=wrong-import-position
from torch_utils import train_utils # pylint: disable=wrong-import-position

FAST_STATS = 'pretrained/mnist-train60k-fast.npz'

def parse_spec(spec):
    """'sid' -> ('sid', False); 'di+data' -> ('di', True); sida/dmd2 always with data."""
    name, _, suffix = spec.strip().partition('+')
    if name not in DIVERGENCES or suffix not in ('', 'data'):
        raise click.BadParameter(f"'{spec}': expected NAME or NAME+data with NAME one of {', '.join(DIVERGENCES)}",
            param_hint='--divergences')
    return name, bool(suffix) or bool(getattr(DIVERGENCES[name], 'needs_data', False) is True)

def final_fid(run_dir, inception_ref, fid_num):
    """(FID, snapshot name) of the run's last snapshot (cached in the run folder)."""
    snaps = train_utils.numbered_files(run_dir, 'network-snapshot', 'pkl')
    if not snaps:
        return None, None
    kimg, snapshot = snaps[-1]
    return cached_fid(run_dir, snapshot, kimg, inception_ref, fid_num)[0], os.path.basename(snapshot)

def distil(spec, teacher, data, outdir, kimg, snap, batch, lr, glr, ema, ema_rampup, inception_ref, fid_num):
    """One resumable run; returns {kimg: FD}, the final FID (with --inception-ref) and its median sec/kimg."""
    name, with_data = parse_spec(spec)
    run_dir = os.path.join(outdir, f"{spec.replace('+', '-')}-b{batch}-lr{lr:g}-glr{glr:g}-ema{ema:g}-rampup{ema_rampup:g}")
    resume_state = None
    if os.path.isdir(run_dir):
        try:
            resume_state = train_utils.latest_training_state(run_dir)
        except FileNotFoundError:
            pass
    os.makedirs(run_dir, exist_ok=True)
    o = run.resolve_options(dict(teacher=teacher, gen='teacher', divergence=name, batch=batch, lr=lr, glr=glr,
        ema=ema, ema_rampup=ema_rampup, kimg=kimg, tick=1.0, snap=snap, seed=0, metrics='fd5k', metric_ref=FAST_STATS,
        data=data if with_data else None, allow_pickle_code=False))
    torch.manual_seed(o.seed)
    setup = run.prepare(o)
    run.save_options(run_dir, o)
    print(f'Run directory: {run_dir}' + (f' (continuing from {resume_state})' if resume_state else ''), flush=True)
    start = time.time()
    run.launch(setup, run_dir, resume_state=resume_state, log=lambda line: print(line, flush=True))
    curve = {r['kimg']: r['results']['fd5k'] for r in read_jsonl(os.path.join(run_dir, 'metric-fd5k.jsonl'))}
    stats = read_jsonl(os.path.join(run_dir, 'stats.jsonl'))
    spk = sorted(r['sec_per_kimg'] for r in stats)[len(stats) // 2] if stats else float('nan')
    fid, fid_snapshot = final_fid(run_dir, inception_ref, fid_num) if inception_ref else (None, None)
    result = dict(spec=spec, divergence=name, data=data if with_data else None, run_dir=run_dir, curve=curve,
        fid=fid, fid_snapshot=fid_snapshot, sec_per_kimg=spk, this_call_seconds=time.time() - start)
    with open(os.path.join(run_dir, 'result.json'), 'w', encoding='utf-8') as f:
        json.dump(result, f, indent=2)
    return result

@click.command(context_settings=dict(show_default=True))
@click.option('--teacher', default='pretrained/edm-mnist32-cond.pkl')
@click.option('--data', default='datasets/mnist-32x32.zip', help='Real images for the +data runs (dataset_tool.py)')
@click.option('--outdir', default='out/mnist-data-terms')
@click.option('--divergences', default='sid,sida,dmd,dmd2', help='Comma-separated NAME or NAME+data; each gets the same budget')
@click.option('--kimg', default=2.0, help='Length of every run [kimg]')
@click.option('--snap', default=1, help='Metric interval [kimg]')
@click.option('--batch', default=32)
@click.option('--lr', default=1e-4, help='Fake-score learning rate')
@click.option('--glr', default=1e-4, help='Generator learning rate')
@click.option('--ema', default=5.0, help='EMA half-life [kimg]')
@click.option('--ema-rampup', default=0.5, help='EMA half-life at most this fraction of the images seen (docs/mnist-teacher.md)')
@click.option('--inception-ref', default=None, help='Inception statistics (.npz, fid.py ref) for the final FID; none: FD only')
@click.option('--fid-num', default=5000, help='Samples for the final FID')
def main(teacher, data, outdir, divergences, kimg, snap, batch, lr, glr, ema, ema_rampup, inception_ref, fid_num):
    for path, flag in ((teacher, '--teacher'), (data, '--data'), (inception_ref, '--inception-ref')):
        if path is not None and not os.path.exists(path):
            raise click.BadParameter(f'{path}: no such file', param_hint=flag)
    specs = [s for s in divergences.split(',') if s.strip()]
    for spec in specs:
        parse_spec(spec)
    results = [distil(s, teacher, data, outdir, kimg, snap, batch, lr, glr, ema, ema_rampup, inception_ref, fid_num)
        for s in specs]
    kimgs = sorted({k for r in results for k in r['curve']})
    print('\n| FD (fast detector, 5000 samples) | ' + ' | '.join(r['spec'] for r in results) + ' |')
    print('|---' * (len(results) + 1) + '|')
    for k in kimgs:
        print(f'| after {k:g} kimg | ' + ' | '.join(f"{r['curve'][k]:.1f}" if k in r['curve'] else '' for r in results) + ' |')
    if inception_ref:
        print(f'| FID (Inception, {fid_num} samples), final snapshot | ' + ' | '.join(
            f"{r['fid']:.1f}" if r['fid'] is not None else '' for r in results) + ' |')
    print('| sec/kimg (median tick) | ' + ' | '.join(f"{r['sec_per_kimg']:.0f}" for r in results) + ' |')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
