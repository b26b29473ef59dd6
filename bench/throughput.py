"""Throughput of one refinement iteration, split into phases, beside the network passes it needs.

For a teacher/generator/divergence, prints:
  * images/s and ms per iteration of the fake-score phase, the generator phase and the whole
    iteration, timed through the real loop code (refine.loop's phases on real objects);
  * the isolated cost of each network pass at the same batch: teacher forward (no grad),
    fake forward (no grad), generator forward+backward, fake forward+backward;
  * peak memory (CUDA: max allocated; CPU: growth of the process's max RSS).

  python bench/throughput.py --teacher tiny --batch 32            # a tiny EDM net made here
  python bench/throughput.py --teacher edm.pkl --batch 64 --device cuda
"""

import os
import resource
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from refine import generators, noise, teachers # pylint: disable=wrong-import-position
from refine.divergences import make_divergence # pylint: disable=wrong-import-position
from torch_utils.rng import StreamRandom # pylint: disable=wrong-import-position
from training import networks_edm # pylint: disable=wrong-import-position

# The tiny EDM configuration of the closing notes: MNIST-sized, class-conditional.
TINY = dict(img_resolution=32, img_channels=1, label_dim=10, model_type='SongUNet', model_channels=16,
    channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16], dropout=0.0)

def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

def _time(fn, device, repeats, warmup=2):
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

def _peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10

@click.command()
@click.option('--teacher', default='tiny', show_default=True, help="EDM pickle, gmm:PRESET, or 'tiny'")
@click.option('--gen', default='teacher', show_default=True, help='Generator spec as in refine.py')
@click.option('--divergence', default='di', show_default=True)
@click.option('--batch', default=32, show_default=True, type=click.IntRange(min=1))
@click.option('--sigma-init', default=1.0, show_default=True, type=float)
@click.option('--repeats', default=5, show_default=True, type=click.IntRange(min=1))
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
def main(teacher, gen, divergence, batch, sigma_init, repeats, device):
    device = torch.device(device)
    torch.manual_seed(0)
    if teacher == 'tiny':
        T = teachers.EDMTeacher(networks_edm.EDMPrecond(**TINY))
    else:
        T = teachers.load_teacher(teacher)
    G, _ = generators.build_generator(gen, T, sigma_init=sigma_init)
    G = G.to(device).train().requires_grad_(True)
    generators.check_compatible(G, T)
    fake = generators.build_fake_score(T).to(device)
    T = T.to(device)
    div = make_divergence(divergence, sigma_data=T.sigma_data)
    g_opt = torch.optim.Adam(G.parameters(), lr=1e-6, betas=(0.0, 0.999))
    f_opt = torch.optim.Adam(fake.parameters(), lr=1e-6, betas=(0.0, 0.999))
    label_dim = G.label_dim
    rss_before = _peak_memory_mb(device)

    def rnd(phase):
        return StreamRandom(0, 0, phase, batch, device=device)

    def fake_phase():
        r = rnd('fake')
        z, c = r.randn(*G.z_shape), r.labels(label_dim)
        with torch.no_grad():
            x = G(z, c)
        fake.train()
        f_opt.zero_grad(set_to_none=True)
        (div.fake_loss(fake, x, c, r).sum() / batch).backward()
        f_opt.step()

    def gen_phase():
        r = rnd('gen')
        z, c = r.randn(*G.z_shape), r.labels(label_dim)
        fake.eval()
        g_opt.zero_grad(set_to_none=True)
        loss, _ = div.generator_loss(T, fake, G(z, c), c, r)
        (loss.sum() / batch).backward()
        g_opt.step()

    def iteration():
        for _ in range(div.fake_steps):
            fake_phase()
        gen_phase()

    r = rnd('passes')
    z, c = r.randn(*G.z_shape), r.labels(label_dim)
    x = G(z, c).detach()
    sigma = noise.LogNormalSigma(scale=T.sigma_data / 0.5).sample(r)
    x_t = x + noise.expand_like(sigma, x) * r.randn(*x.shape[1:])

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def fwd_bwd(module, fn):
        def run():
            module.zero_grad(set_to_none=True)
            fn().square().mean().backward()
        return run

    rows = [
        ('iteration (all phases)', _time(iteration, device, repeats)),
        (f'fake-score phase x{div.fake_steps}', _time(fake_phase, device, repeats) * div.fake_steps),
        ('generator phase', _time(gen_phase, device, repeats)),
        ('teacher forward', _time(no_grad(lambda: T(x_t, sigma, c)), device, repeats)),
        ('fake forward', _time(no_grad(lambda: fake(x_t, sigma, c)), device, repeats)),
        ('generator forward+backward', _time(fwd_bwd(G, lambda: G(z, c)), device, repeats)),
        ('fake forward+backward', _time(fwd_bwd(fake, lambda: fake(x_t, sigma, c)), device, repeats)),
    ]
    peak = _peak_memory_mb(device) - (0 if device.type == 'cuda' else rss_before)
    print(f'teacher {teacher}, generator {gen} ({sum(p.numel() for p in G.parameters()) / 1e6:.2f} M params), '
        f'divergence {divergence}, batch {batch}, device {device}, threads {torch.get_num_threads()}')
    print(f"{'':30s}{'ms':>10s}{'img/s':>10s}")
    for name, seconds in rows:
        print(f'{name:30s}{seconds * 1e3:10.1f}{batch / seconds:10.1f}')
    label = 'peak CUDA memory' if device.type == 'cuda' else 'CPU max-RSS growth'
    print(f'{label}: {peak:.0f} MB')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
