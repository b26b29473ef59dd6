"""GPU speed of distillation iterations: EDM's CIFAR-10 DDPM++ teacher, DI and SiD, by precision and
compilation. Each configuration runs bench/throughput.py in its own process (fresh memory
statistics and compile caches) and the table collects img/s, ms per iteration, the pass sum and
peak memory.

  python bench/gpu_speed.py                                   # cifar10 preset, batch 64, cuda
  python bench/gpu_speed.py --device cpu --teacher tiny --batch 4 --iters 1 --warmup 0 \\
      --precisions fp32 --compile off                         # CPU smoke test

Precisions: fp32 (TF32 off), tf32 (TF32 on), bf16-nograd (TF32 + bf16 for the no-grad
teacher/fake evaluations), bf16 (TF32 + bf16 autocast for every pass). The teacher is randomly
initialised (speed does not depend on the weights).
"""

import json
import os
import subprocess
import sys
import tempfile

import click

HERE = os.path.dirname(os.path.abspath(__file__))
PRECISIONS = {
    'fp32': ['--amp', 'off', '--no-tf32'],
    'tf32': ['--amp', 'off', '--tf32'],
    'bf16-nograd': ['--amp', 'nograd', '--tf32'],
    'bf16': ['--amp', 'all', '--tf32'],
}

@click.command()
@click.option('--teacher', default='cifar10', show_default=True)
@click.option('--divergences', default='di,sid', show_default=True)
@click.option('--batch', default=64, show_default=True)
@click.option('--iters', default=10, show_default=True)
@click.option('--warmup', default=3, show_default=True)
@click.option('--device', default='cuda', show_default=True)
@click.option('--precisions', default=','.join(PRECISIONS), show_default=True)
@click.option('--compile', 'compiles', default='off,inductor', show_default=True, help="'off' and/or backend names")
@click.option('--passes/--no-passes', default=True, show_default=True)
@click.option('--json', 'json_path', default=None, help='Also write every measurement here (JSON lines)')
def main(teacher, divergences, batch, iters, warmup, device, precisions, compiles, passes, json_path):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'm.jsonl')
        for divergence in divergences.split(','):
            for precision in precisions.split(','):
                for backend in compiles.split(','):
                    cmd = [sys.executable, os.path.join(HERE, 'throughput.py'), '--teacher', teacher,
                        '--divergence', divergence, '--batch', str(batch), '--iters', str(iters),
                        '--warmup', str(warmup), '--device', device, '--json', out, *PRECISIONS[precision],
                        *([] if backend == 'off' else ['--compile', backend]), *([] if passes else ['--no-passes'])]
                    print(' '.join(cmd[1:]), flush=True)
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        print(done.stdout[-2000:] + done.stderr[-3000:], flush=True)
                        rows.append(dict(divergence=divergence, precision=precision, compile=backend, failed=True))
                        continue
                    with open(out) as f:
                        m = json.loads(f.read().splitlines()[-1])
                    rows.append(dict(m, precision=precision, compile=backend))
    print(f"\n{'divergence':10s} {'precision':12s} {'compile':9s} {'img/s':>8s} {'ms/iter':>9s} {'pass sum':>9s} {'peak GiB':>9s}")
    for r in rows:
        if r.get('failed'):
            print(f"{r['divergence']:10s} {r['precision']:12s} {r['compile']:9s} {'failed':>8s}")
            continue
        pass_sum = f"{r['pass_sum_s'] * 1e3:9.1f}" if 'pass_sum_s' in r else f"{'-':>9s}"
        print(f"{r['divergence']:10s} {r['precision']:12s} {r['compile']:9s} {r['batch'] / r['iteration_s']:8.1f} "
            f"{r['iteration_s'] * 1e3:9.1f} {pass_sum} {r['peak_gib']:9.2f}")
    if json_path:
        with open(json_path, 'w') as f:
            for r in rows:
                f.write(json.dumps(r) + '\n')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
