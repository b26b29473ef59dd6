"""Milliseconds of the compiled ops vs the reference path and plain PyTorch formulations.

Per op and StyleGAN2 shape (32, 64 and 256 px), forward and forward+backward, on the CPU and,
when present, on CUDA: `ref` is the op's reference path (impl='ref'), `plugin` the compiled
kernel (DI_CUSTOM_OPS=require: no silent fallback), `plain` the obvious PyTorch formulation
(bias_act: leaky_relu(x + b) * gain then clamp; upfirdn2d: zero insertion, pad, one grouped
conv2d with the 2-D filter). The variants alternate inside each repeat and the medians are
printed. Then StyleGAN2 G+D forward+backward images/s with the ops on ref vs plugin, and with
--refine a StyleGAN refinement iteration (refine.py) in alternating processes.

  OMP_NUM_THREADS=1 python bench/ops.py --threads 1
  python bench/ops.py --threads 2 --res 32 --refine 3
  # the refinement iteration against the ops as they were before the plugins (888f142^):
  git worktree add /tmp/filing HEAD && for op in bias_act upfirdn2d filtered_lrelu; do
      git show 888f142^:torch_utils/ops/$op.py > /tmp/filing/torch_utils/ops/$op.py; done
  python bench/ops.py --res '' --gd-res '' --refine 3 --refine-baseline /tmp/filing
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import click
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('DI_CUSTOM_OPS', 'require')
from torch_utils import persistence  # pylint: disable=wrong-import-position
from torch_utils.ops import bias_act, filtered_lrelu, upfirdn2d  # pylint: disable=wrong-import-position
from training import networks_stylegan2 as sg2  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (batch, channels) per resolution: the 32 px row is the issue's measurement; larger images
# get smaller batches so that one CPU repeat stays around a second.
SHAPES = {32: (32, 128), 64: (8, 128), 256: (1, 64)}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def race(variants, device, repeats, warmup=2):
    """Median ms per variant, alternating the variants inside every repeat."""
    times = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            t = timed(fn, device)
            if i >= warmup:
                times[name].append(t)
    return {name: statistics.median(v) for name, v in times.items()}


def fwd_bwd(op, inputs):
    def run():
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = op(*leaves)
        out.backward(torch.ones_like(out))
    return run


def fwd(op, inputs):
    def run():
        with torch.no_grad():
            op(*inputs)
    return run


def plain_bias_act(x, b, gain=np.sqrt(2), clamp=256.0):
    return (F.leaky_relu(x + b.reshape(1, -1, 1, 1), 0.2) * gain).clamp(-clamp, clamp)


def plain_upfirdn2d(x, f2d, up, down, pads, gain):
    """Zero insertion + pad + one grouped conv2d (true convolution: flipped weight)."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(n, c, h * up, w * up)
    x = F.pad(x, list(pads))
    weight = (f2d * gain).flip([0, 1])[None, None].expand(c, 1, *f2d.shape).to(x.dtype)
    return F.conv2d(x, weight, stride=down, groups=c)


def op_cases(res, device, dtype):
    batch, channels = SHAPES[res]
    g = torch.Generator().manual_seed(0)
    f = upfirdn2d.setup_filter([1, 3, 3, 1], device=device)            # StyleGAN2's 4x4 (rank 1)
    f1 = upfirdn2d.setup_filter([1, 3, 3, 1], device=device, separable=True)
    x = torch.randn(batch, channels, res, res, generator=g).to(device, dtype)
    xh = torch.randn(batch, channels, res // 2, res // 2, generator=g).to(device, dtype)
    b = torch.randn(channels, generator=g).to(device, dtype)

    def ba(impl):
        return lambda t, u: bias_act.bias_act(t, u, act='lrelu', clamp=256, impl=impl)
    yield (f'bias_act lrelu+clamp {batch}x{channels}x{res}^2', [x, b],
           dict(ref=ba('ref'), plugin=ba('cuda'), plain=plain_bias_act))

    for name, xin, f_, kw, plain_args in [
            ('upsample2d 4x4', xh, f, dict(up=2, padding=[2, 1, 2, 1], gain=4), (2, 1, [2, 1, 2, 1], 4)),
            ('upsample2d 4-tap 1-D', xh, f1, dict(up=2, padding=[2, 1, 2, 1], gain=4), (2, 1, [2, 1, 2, 1], 4)),
            ('filter2d 4x4', x, f, dict(padding=[2, 1, 2, 1]), (1, 1, [2, 1, 2, 1], 1)),
            ('downsample2d 4x4', x, f, dict(down=2, padding=1), (1, 2, [1, 1, 1, 1], 1))]:
        f2d = f_ if f_.ndim == 2 else torch.outer(f_, f_)

        def ud(impl, f_=f_, kw=kw):
            return lambda t: upfirdn2d.upfirdn2d(t, f_, impl=impl, **kw)
        yield (f'{name} {tuple(xin.shape)}', [xin],
               dict(ref=ud('ref'), plugin=ud('cuda'), plain=lambda t, f2d=f2d, a=plain_args: plain_upfirdn2d(t, f2d, *a)))

    # StyleGAN3-style filtered_lrelu: 12-tap separable filters, up 2, down 2.
    fu = upfirdn2d.setup_filter(np.kaiser(12, 4), device=device)
    xs = torch.randn(batch, channels, res // 2, res // 2, generator=g).to(device, dtype)

    def fl(impl):
        return lambda t, u: filtered_lrelu.filtered_lrelu(t, fu, fu, u, up=2, down=2, padding=[10, 10, 10, 10],
                                                          clamp=256, impl=impl)
    yield (f'filtered_lrelu up2 down2 12-tap {tuple(xs.shape)}', [xs, b], dict(ref=fl('ref'), plugin=fl('cuda')))


def stylegan(res, device):
    common = dict(c_dim=10, img_resolution=res, img_channels=1 if res <= 32 else 3)
    G = sg2.Generator(z_dim=64, w_dim=64, mapping_kwargs=dict(num_layers=2),
                      synthesis_kwargs=dict(channel_base=1024 * res // 32, channel_max=64), **common).to(device)
    D = sg2.Discriminator(channel_base=1024 * res // 32, channel_max=64, **common).to(device)
    return G, D


def gd_step(G, D, batch, device):
    z = torch.randn(batch, 64, device=device)
    c = torch.eye(10, device=device)[torch.arange(batch, device=device) % 10]

    def run():
        img = G(z, c, noise_mode='const')
        D(img, c).sum().backward()
    return run


def set_impl(name):
    os.environ['DI_CUSTOM_OPS'] = 'ref' if name == 'ref' else 'require'


def refine_iteration(reps, threads, baseline=None):
    """Seconds per iteration of refine.py on a random 32 px StyleGAN2, ref vs plugin, and with
    `baseline` (another checkout) that checkout's refine.py on its own ops as a third variant."""
    tmp = tempfile.mkdtemp(prefix='bench-ops-')
    G, D = stylegan(32, torch.device('cpu'))
    pkl = os.path.join(tmp, 'gan.pkl')
    persistence.save_network_pkl(dict(G=G.eval().requires_grad_(False), D=D.eval().requires_grad_(False),
                                      G_ema=G.eval().requires_grad_(False)), pkl)
    times = {'ref': [], 'plugin': [], **({'baseline': []} if baseline else {})}
    for i in range(reps):
        for name in times:
            out = os.path.join(tmp, f'{name}{i}')
            tree = os.path.abspath(baseline) if name == 'baseline' else ROOT
            env = dict(os.environ, DI_CUSTOM_OPS='require' if name == 'plugin' else 'ref', OMP_NUM_THREADS=str(threads))
            cmd = [sys.executable, os.path.join(tree, 'refine.py'), '--teacher',
                   os.path.join(ROOT, 'pretrained/edm-mnist32-cond.pkl'), '--gen', pkl, '--outdir', out,
                   '--batch', '16', '--kimg', '0.128', '--tick', '0.032', '--snap', '1000']
            subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tree)
            with open(next(os.path.join(r, 'stats.jsonl') for r, _, fs in os.walk(out) if 'stats.jsonl' in fs)) as f:
                rows = [json.loads(line) for line in f]
            # Seconds per iteration (16 images) over the ticks after the first (warm-up).
            t = (rows[-1]['time'] - rows[0]['time']) / ((rows[-1]['kimg'] - rows[0]['kimg']) * 1000 / 16)
            times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}, times


@click.command()
@click.option('--device', 'devices', default='cpu,cuda', help='Devices (cuda is skipped without a GPU)')
@click.option('--threads', default=1, show_default=True, help='torch CPU threads')
@click.option('--res', default='32,64,256', show_default=True, help='Resolutions')
@click.option('--repeats', default=7, show_default=True)
@click.option('--gd-batch', default=16, show_default=True, help='Batch of the G+D step')
@click.option('--gd-res', default='32', show_default=True, help='Resolutions of the G+D step (empty: skip)')
@click.option('--refine', 'refine_reps', default=0, show_default=True, help='Alternating refine.py runs per variant')
@click.option('--refine-baseline', default=None, type=click.Path(exists=True, file_okay=False),
              help="--refine: also time this checkout's refine.py on its own ops (e.g. a worktree of an older commit)")
def main(devices, threads, res, repeats, gd_batch, gd_res, refine_reps, refine_baseline):
    torch.set_num_threads(threads)
    print(f'torch {torch.__version__}, {threads} CPU thread(s), OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")}, '
          f'median of {repeats}')
    for dev in devices.split(','):
        device = torch.device(dev)
        if device.type == 'cuda' and not torch.cuda.is_available():
            print('cuda: no device, skipped')
            continue
        name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
        print(f'\n## {name}\n')
        print(f'{"op":<52s} {"pass":<9s} {"ref":>9s} {"plugin":>9s} {"plain":>9s} {"ref/plug":>9s} {"plain/plug":>10s}')
        for r in [int(v) for v in res.split(',') if v]:
            for label, inputs, impls in op_cases(r, device, torch.float32):
                for pass_name, wrap in (('fwd', fwd), ('fwd+bwd', fwd_bwd)):
                    t = race({k: wrap(fn, inputs) for k, fn in impls.items()}, device, repeats)
                    plain = t.get('plain')
                    print(f'{label:<52s} {pass_name:<9s} {t["ref"]:9.2f} {t["plugin"]:9.2f} '
                          f'{plain if plain is not None else float("nan"):9.2f} {t["ref"] / t["plugin"]:9.2f}x '
                          f'{(plain / t["plugin"]) if plain is not None else float("nan"):9.2f}x', flush=True)
        for r in [int(v) for v in gd_res.split(',') if v]:
            torch.manual_seed(0)
            G, D = stylegan(r, device)
            step = gd_step(G, D, gd_batch, device)
            variants = {}
            for impl in ('ref', 'plugin'):
                variants[impl] = lambda impl=impl: (set_impl(impl), step())
            t = race(variants, device, max(3, repeats // 2), warmup=1)
            set_impl('plugin')
            print(f'StyleGAN2 G+D fwd+bwd {r} px, batch {gd_batch}: ref {gd_batch / t["ref"] * 1e3:.1f} img/s, '
                  f'plugin {gd_batch / t["plugin"] * 1e3:.1f} img/s ({t["ref"] / t["plugin"]:.2f}x)', flush=True)
    if refine_reps:
        med, all_times = refine_iteration(refine_reps, threads, refine_baseline)
        print(f'\nrefine.py iteration (32 px StyleGAN2, batch 16, {threads} thread(s)): ref {med["ref"]:.3f} s, '
              f'plugin {med["plugin"]:.3f} s ({med["ref"] / med["plugin"]:.2f}x)'
              + (f', {refine_baseline} {med["baseline"]:.3f} s ({med["baseline"] / med["plugin"]:.2f}x)' if refine_baseline else '')
              + f'; all: {all_times}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
