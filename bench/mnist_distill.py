"""A longer distillation of the shipped MNIST teacher: the student's metric against kimg, and the
teacher's 35-NFE metric as the line to beat.

Every `--snap` kimg the student's G_ema gets FD (fast detector, 5000 samples, against the whole
MNIST training set: `metric-fd5k.jsonl`); at the end its FID (Inception, `--fid-num` samples,
against `--inception-ref`) is compared with the teacher's from bench/mnist_reference.py.
Writes curve.png (FD vs kimg with the teacher's line) and result.json in the run folder.
Running the same command again continues the run where it stopped (exact resume).

  OMP_NUM_THREADS=1 python bench/mnist_distill.py --kimg 60 --inception-ref out/mnist-train5k-inception.npz
  # DI and SiD side by side, FID along the way (fd-vs-kimg.png, fid-vs-kimg.png in --outdir):
  OMP_NUM_THREADS=1 python bench/mnist_distill.py --divergences di,sid --kimg 64 --snap 2 --fid-kimg 2,8,32 \\
      --inception-ref out/mnist-train5k-inception.npz --outdir out/mnist-distill-long
  # Every data-free divergence on the same teacher, generator and budget:
  OMP_NUM_THREADS=1 python bench/mnist_distill.py --divergences di,sid,dmd,sim,fdiv,vardiu --kimg 6 --snap 2 \
      --outdir out/mnist-divergences
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
from refine.plots import save_curve_png # pylint: disable=wrong-import-position
from torch_utils import train_utils # pylint: disable=wrong-import-position

FAST_STATS = 'pretrained/mnist-train60k-fast.npz'

def read_jsonl(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

def fid_of(snapshot, inception_ref, fid_num):
    """Inception FID of a snapshot's G_ema, `fid_num` samples (seeds 0..), against the reference."""
    print(f'FID of {snapshot} ({fid_num} samples, Inception) ...', flush=True)
    sample, _ = generation.load_for_generation(snapshot)
    records = registry.compute_metrics([f'fid{fid_num}'], lambda seeds, _labels: sample(seeds),
        ref=dict(inception=inception_ref), batch=100, progress=lambda s: print(s, flush=True))
    return registry.flatten(records)[f'fid{fid_num}']

def cached_fid(run_dir, snapshot, kimg, inception_ref, fid_num, compute=True):
    """FID of a snapshot of the run, computed once: the run folder's fid<num>-curve.json keeps
    {snapshot name: {kimg, fid, ref}} (an Inception FID costs minutes on a CPU). With
    `compute` False a snapshot not in the cache gives None."""
    cache_path = os.path.join(run_dir, f'fid{fid_num}-curve.json')
    cache = {}
    if os.path.isfile(cache_path):
        with open(cache_path, encoding='utf-8') as f:
            cache = json.load(f)
    name = os.path.basename(snapshot)
    entry = cache.get(name)
    if entry is None or entry.get('ref', inception_ref) != inception_ref: # older entries carry no ref
        if not compute:
            return None, cache
        cache[name] = dict(kimg=kimg, fid=fid_of(snapshot, inception_ref, fid_num), ref=inception_ref)
        with open(cache_path + '.tmp', 'w', encoding='utf-8') as f:
            json.dump(cache, f, indent=2)
        os.replace(cache_path + '.tmp', cache_path)
    return cache[name]['fid'], cache

def snapshot_near(run_dir, kimg):
    """The run's snapshot closest to `kimg`, or None."""
    snaps = train_utils.numbered_files(run_dir, 'network-snapshot', 'pkl')
    return min(snaps, key=lambda item: abs(item[0] - kimg)) if snaps else None

def distil(divergence, teacher, reference, outdir, kimg, snap, batch, lr, glr, ema, ema_rampup, inception_ref, fid_num, fid_kimgs=(),
        plot_only=False, amp=None):
    """One (resumable) distillation run with FD at every snapshot; returns its result dict.
    `plot_only`: no training, only the curves and FIDs of what the run folder holds."""
    run_dir = os.path.join(outdir, f'{divergence}-b{batch}-lr{lr:g}-glr{glr:g}-ema{ema:g}-rampup{ema_rampup:g}')
    resume_state = None
    if os.path.isdir(run_dir):
        try:
            resume_state = train_utils.latest_training_state(run_dir)
        except FileNotFoundError:
            pass
    if plot_only and not os.path.isdir(run_dir):
        raise click.BadParameter(f'{run_dir}: no such run to plot', param_hint='--plot-only')
    os.makedirs(run_dir, exist_ok=True)
    o = run.resolve_options(dict(teacher=teacher, gen='teacher', divergence=divergence, batch=batch,
        lr=lr, glr=glr, ema=ema, ema_rampup=ema_rampup, kimg=kimg, tick=1.0, snap=snap, seed=0, metrics='fd5k',
        metric_ref=FAST_STATS, allow_pickle_code=False, amp=amp))
    start = time.time()
    if not plot_only:
        torch.manual_seed(o.seed)
        setup = run.prepare(o)
        run.save_options(run_dir, o) # refine.py --resume can continue it too
        print(f'Run directory: {run_dir}' + (f' (continuing from {resume_state})' if resume_state else ''), flush=True)
        run.launch(setup, run_dir, resume_state=resume_state, log=lambda line: print(line, flush=True))
    seconds = time.time() - start

    teacher_metrics = read_teacher_metrics(reference) # read now: it may have been written meanwhile
    curve = read_jsonl(os.path.join(run_dir, 'metric-fd5k.jsonl'))
    kimgs = [r['kimg'] for r in curve]
    fds = [r['results']['fd5k'] for r in curve]
    hlines = {'teacher, 35 NFE': teacher_metrics['fd5000']} if 'fd5000' in teacher_metrics else {}
    save_curve_png({f'student ({divergence}, 1 NFE)': (kimgs, fds)}, os.path.join(run_dir, 'curve.png'),
        hlines=hlines, title='MNIST one-step distillation: FD (fast detector, 5000 samples) vs kimg',
        xlabel='kimg', ylabel='FD', log_y=True, log_x=True)
    stats = read_jsonl(os.path.join(run_dir, 'stats.jsonl'))
    result = dict(divergence=divergence, run_dir=run_dir, kimg=kimgs[-1] if kimgs else None,
        curve=list(zip(kimgs, fds)), this_call_seconds=seconds, teacher=teacher_metrics,
        sec_per_kimg=sorted(r['sec_per_kimg'] for r in stats)[len(stats) // 2] if stats else None)
    final_kimg, snapshot = train_utils.numbered_files(run_dir, 'network-snapshot', 'pkl')[-1]
    if inception_ref: # --plot-only computes no new FID, it plots what the cache holds
        fid, cache = cached_fid(run_dir, snapshot, final_kimg, inception_ref, fid_num, compute=not plot_only)
        if fid is not None:
            result['student_fid'], result['student_fid_snapshot'] = fid, snapshot
        for k in fid_kimgs: # FID along the run
            near = snapshot_near(run_dir, k)
            if near is not None:
                _, cache = cached_fid(run_dir, near[1], near[0], inception_ref, fid_num, compute=not plot_only)
        # A snapshot's file name numbers whole kimg; the FD records hold its exact kimg.
        exact = {r.get('snapshot_pkl'): r['kimg'] for r in curve}
        result['fid_curve'] = sorted((exact.get(name, v['kimg']), v['fid']) for name, v in cache.items()
            if v.get('ref', inception_ref) == inception_ref)
    with open(os.path.join(run_dir, 'result.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(f'Curve: {run_dir}/curve.png', flush=True)
    return result

def read_teacher_metrics(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f).get('metrics', {})

@click.command(context_settings=dict(show_default=True))
@click.option('--teacher', default='pretrained/edm-mnist32-cond.pkl')
@click.option('--reference', default='pretrained/edm-mnist32-cond-reference.json', help='Teacher metrics (bench/mnist_reference.py)')
@click.option('--outdir', default='out/mnist-distill')
@click.option('--divergences', default='di', help='Comma-separated; each gets the same budget')
@click.option('--kimg', default=60.0, help='Total distillation length [kimg]')
@click.option('--snap', default=4, help='Metric interval [kimg]')
@click.option('--batch', default=32)
@click.option('--lr', default=1e-4, help='Fake-score learning rate')
@click.option('--glr', default=1e-4, help='Generator learning rate')
@click.option('--ema', default=1.0, help='EMA half-life [kimg]')
@click.option('--ema-rampup', default=0.05, help='EMA half-life at most this fraction of the images seen (0 = off)')
@click.option('--inception-ref', default=None, help='Inception statistics (.npz) for the final FID')
@click.option('--fid-num', default=5000, help='Samples for the final FID')
@click.option('--plot-only', is_flag=True, help='No training and no new FID: curves of the runs and FIDs as they are')
@click.option('--fid-kimg', default='', help='Also FID at the snapshots nearest these kimg, e.g. 2,4,8,16 (with --inception-ref)')
@click.option('--amp', default=None, type=click.Choice(['auto', 'off', 'nograd', 'loss', 'all']), help="bf16 autocast level (refine.py's --amp; default auto)")
@click.option('--teacher-fid', default=None, type=float, help="The teacher's FID at --fid-num samples, if --reference has none (its dashed line)")
def main(teacher, reference, outdir, divergences, kimg, snap, batch, lr, glr, ema, ema_rampup, inception_ref, fid_num, plot_only, fid_kimg,
        amp, teacher_fid):
    for path, flag in ((teacher, '--teacher'), (inception_ref, '--inception-ref')):
        if path is not None and not os.path.exists(path):
            raise click.BadParameter(f'{path}: no such file', param_hint=flag)
    try:
        fid_kimgs = [float(k) for k in fid_kimg.split(',') if k.strip()]
    except ValueError:
        raise click.BadParameter(f"'{fid_kimg}' is not a comma-separated list of numbers", param_hint='--fid-kimg') from None
    results = [distil(d, teacher, reference, outdir, kimg, snap, batch, lr, glr, ema, ema_rampup, inception_ref, fid_num, fid_kimgs,
        plot_only, amp)
        for d in divergences.split(',')]

    teacher_metrics = read_teacher_metrics(reference)
    if teacher_fid is not None:
        teacher_metrics[f'fid{fid_num}'] = teacher_fid
    # Every divergence on one log-x plot per metric, the teacher's level dashed.
    for metric, key, teacher_key in (('FD (fast detector, 5000 samples)', 'curve', 'fd5000'),
            (f'FID (Inception, {fid_num} samples)', 'fid_curve', f'fid{fid_num}')):
        series = {f"{r['divergence']} (1 NFE)": tuple(zip(*r[key])) for r in results if len(r.get(key) or []) >= 1}
        if series:
            hlines = {'teacher, 35 NFE': teacher_metrics[teacher_key]} if teacher_key in teacher_metrics else {}
            path = os.path.join(outdir, f"{'fd' if key == 'curve' else 'fid'}-vs-kimg.png")
            save_curve_png(series, path, hlines=hlines, title=f'MNIST one-step students: {metric}',
                xlabel='kimg (log scale)', ylabel=metric.split(' ')[0], log_x=True, log_y=True)
            print(f'Curves: {path}', flush=True)
    kimgs = sorted({k for r in results for k, _ in r['curve']})
    print('\n| kimg | ' + ' | '.join(f"{r['divergence']} FD (fast, 5k)" for r in results) + ' |')
    print('|---' * (len(results) + 1) + '|')
    for k in kimgs:
        cells = [next((f'{fd:.2f}' for kk, fd in r['curve'] if kk == k), '') for r in results]
        print(f'| {k:g} | ' + ' | '.join(cells) + ' |')
    print('| sec/kimg (median tick) | ' + ' | '.join(f"{r['sec_per_kimg']:.0f}" for r in results) + ' |')
    if 'fd5000' in teacher_metrics:
        print(f"\nTeacher (35 NFE): FD {teacher_metrics['fd5000']:.2f}"
              + (f", FID {teacher_metrics[f'fid{fid_num}']:.2f}" if f'fid{fid_num}' in teacher_metrics else ''))
    for r in results:
        if 'student_fid' in r:
            print(f"{r['divergence']}: FID ({fid_num} samples, Inception) {r['student_fid']:.2f}")

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
