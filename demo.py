"""The shipped default job (`make demo`): distil the shipped MNIST teacher into a one-step generator.

The teacher (`pretrained/edm-mnist32-cond.pkl`, a class-conditional EDM model sampled with 35
network calls per image) trains a copy of itself, used as a one-step generator, with
Diff-Instruct, data-free. Then the student's Fréchet distance in the fast MNIST detector's
space (FD, not comparable with published FIDs) on 5000 samples is printed beside the teacher's
and the shipped one-step student's (`pretrained/sid-mnist32-cond.pkl`, a longer SiD
distillation of the same teacher), all measured the same way (bench/mnist_reference.py), with
the time per image of each, and a side-by-side grid (teacher | shipped student | this run's
student, one row per class, the same seeds) is written to out/demo/<run>/teacher-vs-student.png.

  python demo.py                # about 5 minutes on 2 idle CPU cores
  python demo.py --kimg 2       # shorter
"""

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dnnlib # pylint: disable=wrong-import-position
from metrics import registry # pylint: disable=wrong-import-position
from refine import generation, run # pylint: disable=wrong-import-position
from torch_utils import train_utils # pylint: disable=wrong-import-position
from torch_utils.images import save_side_by_side # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
TEACHER = os.path.join(HERE, 'pretrained', 'edm-mnist32-cond.pkl')
TEACHER_REFERENCE = os.path.join(HERE, 'pretrained', 'edm-mnist32-cond-reference.json')
SHIPPED = os.path.join(HERE, 'pretrained', 'sid-mnist32-cond.pkl')
SHIPPED_REFERENCE = os.path.join(HERE, 'pretrained', 'sid-mnist32-cond-reference.json')
FAST_STATS = os.path.join(HERE, 'pretrained', 'mnist-train60k-fast.npz')
NUM_EVAL = 5000

def class_rows(sample, per_class, what):
    """`per_class` samples of every class, row by row (seeds 0.. as in the teacher's grid), and
    the median seconds per image over the rows (robust to a busy machine's spikes)."""
    rows, seconds = [], []
    progress = dnnlib.util.Progress(10, what, echo=lambda line: print(line, flush=True))
    progress.update(0)
    for k in range(10):
        start = time.time()
        rows.append(sample(list(range(k * per_class, (k + 1) * per_class)), k).cpu())
        seconds.append((time.time() - start) / per_class)
        progress.update(k + 1)
    return torch.cat(rows), sorted(seconds)[len(seconds) // 2]

@click.command(context_settings=dict(show_default=True))
@click.option('--kimg', default=6.0, help='Distillation length [kimg]')
@click.option('--outdir', default='out/demo')
def main(kimg, outdir):
    print(f'Distilling {os.path.relpath(TEACHER)} into a one-step generator with Diff-Instruct '
          f'({kimg:g} kimg) ...', flush=True)
    o = run.resolve_options(dict(teacher=TEACHER, gen='teacher', divergence='di', batch=32,
        lr=1e-4, glr=1e-4, ema=1.0, kimg=kimg, tick=0.5, snap=1000, seed=0, allow_pickle_code=False))
    torch.manual_seed(o.seed)
    setup = run.prepare(o)
    run_dir = run.make_run_dir(o, f'di-mnist-{kimg:g}kimg', outdir=outdir) # refine.py --resume continues it
    start = time.time()
    run.launch(setup, run_dir, None, lambda line: print(line, flush=True))
    train_seconds = time.time() - start
    snapshot_kimg, snapshot = train_utils.numbered_files(run_dir, 'network-snapshot', 'pkl')[-1]

    print(f'\nMeasuring the student: FD (fast detector) of {NUM_EVAL} one-step samples ...', flush=True)
    student, _ = generation.load_for_generation(snapshot)
    teacher, teacher_meta = generation.load_for_generation(TEACHER)
    shipped = generation.load_for_generation(SHIPPED)[0] if os.path.isfile(SHIPPED) else None
    with torch.no_grad():
        records = registry.compute_metrics([f'fd{NUM_EVAL}'], lambda seeds, _labels: student(seeds),
            ref=dict(fast=FAST_STATS), batch=250, progress=lambda line: print(line, flush=True))
        student_fd = records[f'fd{NUM_EVAL}']['results'][f'fd{NUM_EVAL}']
        # The grid, 5 seeds of each class from each network, also times them the same way.
        print(f'Sampling the comparison grid, 5 images per class: the teacher ({teacher_meta.nfe} network '
            'calls per image) and the students (1 call) ...', flush=True)
        teacher_grid, teacher_seconds = class_rows(teacher, 5, 'teacher rows')
        shipped_grid, shipped_seconds = class_rows(shipped, 5, 'shipped student rows') if shipped else (None, None)
        student_grid, student_seconds = class_rows(student, 5, 'student rows')
    grid_path = os.path.join(run_dir, 'teacher-vs-student.png')
    save_side_by_side([g for g in (teacher_grid, shipped_grid, student_grid) if g is not None], grid_path, grid_w=5)

    teacher_ref, shipped_ref = read_reference(TEACHER_REFERENCE), read_reference(SHIPPED_REFERENCE)
    fd_key = f'fd{NUM_EVAL}'
    teacher_fd = teacher_ref.get('metrics', {}).get(fd_key, float('nan'))
    rows = [('teacher', teacher_meta.nfe, teacher_fd, 1e3 * teacher_seconds)]
    if shipped:
        kimg = shipped_ref.get('kimg')
        rows.append((f'shipped student ({kimg:.1f} kimg)' if kimg else 'shipped student', 1,
            shipped_ref.get('metrics', {}).get(fd_key, float('nan')), 1e3 * shipped_seconds))
    rows.append((f'this run\'s student ({snapshot_kimg:g} kimg)', 1, student_fd, 1e3 * student_seconds))
    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{'':{width}s}{'NFE':>5s}{'FD ' + str(NUM_EVAL):>10s}{'ms/image':>10s}   (median over the grid's rows)")
    for name, nfe, fd, ms in rows:
        print(f'{name:{width}s}{nfe:5d}{fd:10.2f}{ms:10.1f}')
    print(f"\nThis run's student: FD / teacher FD = {student_fd / teacher_fd:.2f} after {train_seconds / 60:.1f} min "
          f"of distillation; one-step students are {rows[0][3] / rows[-1][3]:.0f}x faster per image.")
    if shipped and 'metrics' in shipped_ref:
        fid_key = f'fid{NUM_EVAL}'
        fids = (teacher_ref['metrics'].get(fid_key), shipped_ref['metrics'].get(fid_key))
        if None not in fids:
            print(f'Inception FID ({NUM_EVAL} samples): teacher {fids[0]:.2f}, shipped student {fids[1]:.2f}.')
    for path, ref in ((TEACHER_REFERENCE, teacher_ref), (SHIPPED_REFERENCE, shipped_ref)):
        if ref:
            print(f"{os.path.relpath(path)}: {ref['num_samples']} samples (made by: {ref['command']}).")
        elif path == TEACHER_REFERENCE or shipped:
            print(f'{os.path.relpath(path)} is missing (python bench/mnist_reference.py writes it).')
    print(f'Grid (a row per class): {grid_path}')
    print(f'Snapshot: {snapshot}  (python generate.py --network {snapshot} --outdir out/samples)')

def read_reference(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
