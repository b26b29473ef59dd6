"""Throughput of refinement iterations, timed inside the real loop, beside the passes they need.

For a teacher, divergence and set of speed levers, runs `refine.loop.refinement_loop` itself
(gradient sync, EMA, per-phase reseeding and all) for --warmup + --iters iterations with a timer
around each phase, then prints
  * the median iteration and its phases (fake-score update, generator update, EMA), in ms and
    images/s;
  * the isolated cost of each network pass the iteration makes (same batch, same precision),
    and their sum: what the iteration would cost with no overhead at all;
  * peak memory (CUDA: max allocated during the loop; CPU: the process's peak RSS after it).
Every lever has a flag, so what each buys on a machine is one pair of runs.

  python bench/throughput.py --teacher tiny --batch 32                # a tiny MNIST-sized net
  python bench/throughput.py --teacher small32 --divergence sid       # 1.75 M params, 32x32x3
  python bench/throughput.py --teacher small32 --no-reuse --amp off --dropout-mask bernoulli --no-fused
  python bench/throughput.py --teacher cifar10 --batch 64 --device cuda --amp all --compile
"""

import json
import os
import resource
import statistics
import sys
import tempfile
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from refine import generators, noise, speed, teachers # pylint: disable=wrong-import-position
from refine.divergences import divergence_class, make_divergence # pylint: disable=wrong-import-position
from refine.divergences.sid import frozen_parameters # pylint: disable=wrong-import-position
from refine.loop import refinement_loop # pylint: disable=wrong-import-position
from torch_utils.rng import StreamRandom # pylint: disable=wrong-import-position
from training import networks_edm # pylint: disable=wrong-import-position

# EDM networks made here with random weights (speed does not depend on the weights).
PRESETS = dict(
    # MNIST-sized, class-conditional, no dropout.
    tiny=dict(img_resolution=32, img_channels=1, label_dim=10, model_type='SongUNet', model_channels=16,
        channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16], dropout=0.0),
    # The measured configuration of docs/performance.md: 1.75 M parameters.
    small32=dict(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=32,
        channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16], dropout=0.13),
    # EDM's CIFAR-10 DDPM++ (edm-cifar10-32x32-uncond-vp): 56 M parameters.
    cifar10=dict(img_resolution=32, img_channels=3, label_dim=0, augment_dim=9, model_type='SongUNet',
        embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
        resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
        attn_resolutions=[16], dropout=0.13),
)

def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

def _time(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)

def build(teacher, divergence, sigma_init=None, preset_overrides=None):
    """Teacher, generator, fake score and divergence, made as refine.py makes them."""
    if teacher in PRESETS:
        T = teachers.EDMTeacher(networks_edm.EDMPrecond(**dict(PRESETS[teacher], **(preset_overrides or {}))))
    else:
        T = teachers.load_teacher(teacher)
    method = divergence_class(divergence)
    if sigma_init is None:
        sigma_init = float(getattr(method, 'default_sigma_init', 1.0))
    G, _ = generators.build_generator('teacher', T, sigma_init=sigma_init)
    fake = generators.build_fake_score(T)
    div = make_divergence(divergence, sigma_data=T.sigma_data)
    return T, G, fake, div

def isolated_passes(T, G, fake, div, batch, levers, reuse, device, repeats):
    """{pass name: seconds} for every network pass of one iteration, and their sum."""
    r = StreamRandom(0, 0, 'passes', batch, device=device)
    z, c = r.randn(*G.z_shape), r.labels(G.label_dim)
    with torch.no_grad():
        x = G(z, c)
    sigma = noise.LogNormalSigma(scale=T.sigma_data / 0.5).sample(r)
    x_t = x + noise.expand_like(sigma, x) * r.randn(*x.shape[1:])

    def run(module, train, grad, phase, to_input=False):
        def fn():
            module.train(train)
            with levers.precision(phase):
                if not grad:
                    with torch.no_grad():
                        module(*args)
                    return
                inputs = [a.detach().requires_grad_(to_input) if torch.is_tensor(a) and i == 0 else a
                    for i, a in enumerate(args)]
                module.zero_grad(set_to_none=True)
                out = module(*inputs)
                out.square().mean().backward()
        args = (z, c) if module is G else (x_t, sigma, c)
        return fn

    rows = {}
    steps = div.fake_steps
    if steps - (1 if reuse else 0) > 0:
        rows['generator forward (no grad)'] = (_time(run(G, False, False, 'generator'), device, repeats),
            steps - (1 if reuse else 0))
    if steps:
        rows['fake forward+backward'] = (_time(run(fake, True, True, 'fake'), device, repeats), steps)
    rows['generator forward+backward'] = (_time(run(G, True, True, 'generator'), device, repeats), 1)
    with frozen_parameters(T, fake):
        if div.grad_through_networks:
            rows['teacher forward+backward to x'] = (_time(run(T, False, True, 'loss', to_input=True), device, repeats), 1)
            rows['fake forward+backward to x'] = (_time(run(fake, False, True, 'loss', to_input=True), device, repeats), 1)
        elif getattr(div, 'uses_fake_score', True):
            rows['teacher forward (no grad)'] = (_time(run(T, False, False, 'loss'), device, repeats), 1)
            rows['fake forward (no grad)'] = (_time(run(fake, False, False, 'loss'), device, repeats), 1)
    return rows, sum(seconds * count for seconds, count in rows.values())

def measure(teacher='small32', divergence='di', batch=32, iters=5, warmup=2, repeats=3, device=None,
        reuse=False, amp='off', compile=False, fused=True, tf32=True, attention='auto', dropout_mask='uniform', # pylint: disable=redefined-builtin
        channels_last='auto', recompute=True, fused_norm=True, passes=True, sigma_init=None, preset_overrides=None, log=None):
    """One measurement (a dict); the loop runs first, so the CPU peak RSS is the loop's."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    previous = networks_edm.set_implementation(attention=attention, dropout=dropout_mask, channels_last=channels_last,
        recompute=recompute, fused_norm=fused_norm)
    try:
        torch.manual_seed(0)
        T, G, fake, div = build(teacher, divergence, sigma_init, preset_overrides)
        params = sum(p.numel() for p in G.parameters())
        timer = speed.PhaseTimer(device)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            nimg = (warmup + iters) * batch
            result = refinement_loop(run_dir=run_dir, teacher=T, G=G, fake=fake, divergence=div,
                batch_size=batch, total_kimg=nimg / 1000, kimg_per_tick=nimg / 1000 + 1, snapshot_ticks=None,
                state_ticks=None, grid_size=1, log=log or (lambda *_: None), seed=0,
                reuse_samples=reuse, amp=amp, compile=compile, fused_optim=fused, tf32=tf32, timer=timer)
        loop_seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda'
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        names = [n for n in ('fake', 'generator', 'ema') if n in timer.times]
        per_iter = [sum(timer.times[n][i] for n in names) for i in range(warmup, warmup + iters)]
        phases = {n: statistics.median(timer.times[n][warmup:warmup + iters]) for n in names}
        out = dict(teacher=teacher, divergence=divergence, batch=batch, device=str(device), params=params,
            threads=torch.get_num_threads(), levers=dict(reuse=reuse, amp=speed.resolve_amp(amp, device),
            compile=compile, fused=fused, tf32=tf32, **networks_edm.IMPLEMENTATION),
            iteration_s=statistics.median(per_iter), iterations_s=per_iter, phases_s=phases,
            loop_s=loop_seconds, peak_gib=peak, peak_kind='cuda max allocated' if device.type == 'cuda' else 'process max RSS')
        if passes:
            levers = speed.Levers(device, div, amp=amp, tf32=tf32)
            G, fake, T = result.G, result.fake, T
            rows, total = isolated_passes(T, G, fake, div, batch, levers, reuse, device, repeats)
            out.update(passes_s={k: v[0] for k, v in rows.items()}, pass_counts={k: v[1] for k, v in rows.items()},
                pass_sum_s=total)
        return out
    finally:
        networks_edm.set_implementation(**previous)

def report(m):
    """The printed table of one measurement."""
    batch = m['batch']
    lines = [f"teacher {m['teacher']} ({m['params'] / 1e6:.2f} M params), divergence {m['divergence']}, "
        f"batch {batch}, device {m['device']}, threads {m['threads']}",
        'levers: ' + ', '.join(f'{k} {v}' for k, v in m['levers'].items()),
        f"{'':34s}{'ms':>10s}{'img/s':>10s}"]
    row = lambda name, s: f'{name:34s}{s * 1e3:10.1f}{batch / s:10.1f}'
    lines.append(row('iteration (median, in the loop)', m['iteration_s']))
    for name, s in m['phases_s'].items():
        lines.append(f"{'  ' + name + ' phase':34s}{s * 1e3:10.1f}")
    if 'passes_s' in m:
        for name, s in m['passes_s'].items():
            count = m['pass_counts'][name]
            lines.append(f"{'  pass: ' + name + (f' x{count}' if count != 1 else ''):34s}{s * 1e3 * count:10.1f}")
        lines.append(row('pass sum', m['pass_sum_s']))
        lines.append(f"iteration / pass sum: {m['iteration_s'] / m['pass_sum_s']:.2f}")
    lines.append(f"peak memory ({m['peak_kind']}): {m['peak_gib']:.2f} GiB")
    return '\n'.join(lines)

@click.command()
@click.option('--teacher', default='small32', show_default=True, help=f"EDM pickle or a preset: {', '.join(PRESETS)}")
@click.option('--divergence', default='di', show_default=True)
@click.option('--batch', default=32, show_default=True, type=click.IntRange(min=1))
@click.option('--iters', default=5, show_default=True, type=click.IntRange(min=1), help='Timed loop iterations')
@click.option('--warmup', default=2, show_default=True, type=click.IntRange(min=0), help='Untimed iterations first')
@click.option('--repeats', default=3, show_default=True, type=click.IntRange(min=1), help='Timings of each isolated pass')
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--threads', default=None, type=click.IntRange(min=1), help='torch intra-op threads [default: torch\'s]')
@click.option('--reuse/--no-reuse', default=False, show_default=True, help='Reuse the generator update\'s samples')
@click.option('--amp', default='auto', show_default=True, type=click.Choice(speed.AMP_LEVELS),
    help="bf16 autocast ('auto': all passes where bf16 is native, as refine.py)")
@click.option('--compile', 'compile_', default=None, help='torch.compile backend (inductor, aot_eager, ...)')
@click.option('--fused/--no-fused', default=True, show_default=True, help='Fused Adam and foreach EMA')
@click.option('--tf32/--no-tf32', default=True, show_default=True, help='TF32 on GPUs')
@click.option('--attention', default='auto', show_default=True, type=click.Choice(['auto', 'sdpa', 'matmul']))
@click.option('--dropout-mask', default='uniform', show_default=True, type=click.Choice(['uniform', 'bernoulli']))
@click.option('--channels-last/--no-channels-last', default=None, help='NHWC UNets  [default: auto]')
@click.option('--recompute/--no-recompute', default=True, show_default=True, help='Recompute norm-act chains in backward')
@click.option('--fused-norm/--no-fused-norm', default=True, show_default=True, help='GroupNorm-SiLU-dropout CPU kernel')
@click.option('--malloc/--no-malloc', default=True, show_default=True, help='glibc malloc settings (refine/speed.py)')
@click.option('--passes/--no-passes', default=True, show_default=True, help='Also time the isolated passes')
@click.option('--json', 'json_path', default=None, help='Append the measurement as a JSON line here')
def main(teacher, divergence, batch, iters, warmup, repeats, device, threads, reuse, amp, compile_, fused, tf32,
        attention, dropout_mask, channels_last, recompute, fused_norm, malloc, passes, json_path):
    if malloc:
        speed.configure_malloc()
    if threads:
        torch.set_num_threads(threads)
    m = measure(teacher, divergence, batch, iters, warmup, repeats, device, reuse=reuse, amp=amp,
        compile=compile_ or False, fused=fused, tf32=tf32, attention=attention, dropout_mask=dropout_mask,
        channels_last='auto' if channels_last is None else channels_last, recompute=recompute,
        fused_norm=fused_norm, passes=passes)
    print(report(m))
    if json_path:
        with open(json_path, 'a') as f:
            f.write(json.dumps(m) + '\n')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
