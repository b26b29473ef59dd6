"""What a one-step MNIST student's background haze is made of (docs/mnist-teacher.md).

For a shipped student pickle or a refine.py training state (its G and G_ema; with a state, also
its fake score), on `--num` samples (seeds from torch.manual_seed(--seed), random classes):
  * grey-level shares (as bench/pixel_levels.py bins them) and the background's mean offset from
    −1 and standard deviation (pixels below −0.8);
  * the regression coefficient of the background on the input noise z, beside c_skip·σ_init, the
    share of z that EDM's skip path passes and the network has to cancel;
  * the same samples drawn in training mode (dropout on);
  * with a training state: per noise level σ, the background's rms error of the teacher's and
    the fake score's D(x_g + σn) against x_g, and the rms of their difference (the generator's
    signal there).

  python bench/haze_checks.py --network pretrained/sid-mnist32-cond.pkl
  python bench/haze_checks.py --state out/mnist-sid-ema/sid-b32-lr0.0001-glr0.0001-ema5-rampup0.5/training-state-000026.pt
"""

import copy
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.pixel_levels import BINS # pylint: disable=wrong-import-position
from torch_utils import safe_pickle # pylint: disable=wrong-import-position

def level_shares(x):
    q = ((x + 1) * 127.5).round().clamp(0, 255)
    return ' '.join(f'{lo}-{hi} {((q >= lo) & (q <= hi)).float().mean().item() * 100:4.1f}%' for lo, hi in BINS)

def background(x):
    return x < -0.8

def describe(name, x):
    bg = x[background(x)] + 1
    print(f'{name:14s} {level_shares(x)} | background {bg.mean().item():+.4f} ± {bg.std().item():.4f}')

def strip_prefix(state):
    """A refine.py state's G/G_ema/fake wrap the EDM network as `.net`."""
    return {k[4:] if k.startswith('net.') else k: v for k, v in state.items()}

def load_networks(network, state, teacher_path):
    with open(teacher_path, 'rb') as f:
        teacher = safe_pickle.load(f)['ema'].eval().requires_grad_(False)
    if network is not None:
        with open(network, 'rb') as f:
            return teacher, {'ema': safe_pickle.load(f)['ema'].eval()}, None
    saved = torch.load(state, map_location='cpu', weights_only=True)
    nets = {}
    for key in ('G', 'G_ema', 'fake'):
        nets[key] = copy.deepcopy(teacher)
        nets[key].load_state_dict(strip_prefix(saved[key]))
    return teacher, {k: nets[k] for k in ('G', 'G_ema')}, nets['fake'].eval()

@click.command()
@click.option('--network', help='Student pickle (its `ema`)', default=None)
@click.option('--state', help='...or a refine.py training state (G, G_ema, fake)', default=None)
@click.option('--teacher', default='pretrained/edm-mnist32-cond.pkl', show_default=True)
@click.option('--sigma-init', default=2.5, show_default=True, type=float)
@click.option('--num', default=128, show_default=True, type=int)
@click.option('--seed', default=0, show_default=True, type=int)
def main(network, state, teacher, sigma_init, num, seed):
    if (network is None) == (state is None):
        raise click.UsageError('give one of --network or --state')
    for path, flag in ((network or state, '--network' if network else '--state'), (teacher, '--teacher')):
        if not os.path.isfile(path):
            raise click.BadParameter(f'{path}: no such file', param_hint=flag)
    teacher_net, generators, fake = load_networks(network, state, teacher)
    torch.manual_seed(seed)
    z = torch.randn(num, teacher_net.img_channels, teacher_net.img_resolution, teacher_net.img_resolution)
    labels = torch.nn.functional.one_hot(torch.randint(0, teacher_net.label_dim, (num,)), teacher_net.label_dim).float()
    sigma = torch.full([num], sigma_init)
    c_skip = teacher_net.sigma_data ** 2 / (sigma_init ** 2 + teacher_net.sigma_data ** 2)
    for name, G in generators.items():
        with torch.no_grad():
            x = G.eval()(sigma_init * z, sigma, labels)
            x_train = G.train()(sigma_init * z, sigma, labels)
        G.eval()
        describe(f'{name} (eval)', x)
        describe(f'{name} (train)', x_train)
        bg = background(x)
        r, zz = x[bg] + 1, z[bg]
        coef = ((r - r.mean()) * zz).mean() / (zz * zz).mean()
        print(f'{"":14s} background on z: {coef.item():+.4f} (the skip path passes c_skip·σ_init = {c_skip * sigma_init:.4f})')
    if fake is None:
        return
    x = generators['G_ema'](sigma_init * z, sigma, labels).detach()
    bg = background(x).float()
    rms = lambda d: ((d ** 2) * bg).sum().div(bg.sum()).sqrt().item()
    print('G_ema samples, background: rms of D(x_g + σn) − x_g (teacher, fake) and of D_fake − D_teacher')
    for s in (0.003, 0.01, 0.02, 0.04, 0.08, 0.2, 0.5):
        x_t = x + s * torch.randn_like(x)
        with torch.no_grad():
            d_t = teacher_net(x_t, torch.full([num], s), labels)
            d_f = fake(x_t, torch.full([num], s), labels)
        print(f'  σ {s:5.3f}: teacher {rms(d_t - x):.4f}  fake {rms(d_f - x):.4f}  difference {rms(d_f - d_t):.4f}')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
