"""Train a small class-conditional StyleGAN2 on MNIST-32: the GAN that bench/gan_refine.py refines.

StyleGAN2-ADA's recipe at a CPU-sized scale: non-saturating logistic loss, lazy R1 on the reals
(every `--r1-interval` D steps, gamma `--gamma`), Adam (0, 0.99) with the lazy-regularisation
correction of lr and betas, a G_ema by half-life; no augmentation, style mixing or path-length
regularisation (ADA's CIFAR setting). The run folder gets `network-snapshot-NNNNNN.pkl`, a
StyleGAN pickle dict(G, D, G_ema, augment_pipe=None, training_set_kwargs), a sample grid per
snapshot and `training-state.pt`; running the same command again continues from it exactly.

  python dataset_tool.py --source mnist --split train --dest datasets/mnist-32x32.zip
  OMP_NUM_THREADS=1 python bench/train_stylegan2_mnist.py --kimg 100 --outdir out/stylegan2-mnist
"""

import copy
import json
import os
import sys
import time

import click
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib # pylint: disable=wrong-import-position
from refine import sampling # pylint: disable=wrong-import-position
from torch_utils import persistence, train_utils # pylint: disable=wrong-import-position
from training import networks_stylegan2 as sg2 # pylint: disable=wrong-import-position

def load_dataset(path):
    """All images as uint8 NCHW and one-hot labels (MNIST-32 is 61 MB in memory)."""
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path=path, use_labels=True)
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    images = torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.from_numpy(np.stack([dataset.get_label(i) for i in range(len(dataset))]))
    return images, labels, dict(dataset_kwargs, resolution=dataset.resolution, max_size=len(dataset))

def build_networks(resolution, channels, c_dim, z_dim, cbase, cmax):
    common = dict(c_dim=c_dim, img_resolution=resolution, img_channels=channels)
    G = sg2.Generator(z_dim=z_dim, w_dim=z_dim, mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(channel_base=cbase, channel_max=cmax, architecture='skip'), **common)
    D = sg2.Discriminator(channel_base=cbase, channel_max=cmax, architecture='resnet',
        epilogue_kwargs=dict(mbstd_group_size=4), **common)
    return G, D

def d_logistic_r1(D, reals, c, fakes, gamma, do_r1, r1_interval):
    """Non-saturating D loss; every r1_interval-th step also gamma/2 * |grad D(real)|^2,
    scaled by the interval (lazy regularisation)."""
    reals = reals.detach().requires_grad_(do_r1)
    real_logits = D(reals, c)
    loss = F.softplus(D(fakes.detach(), c)).mean() + F.softplus(-real_logits).mean()
    if do_r1:
        grad, = torch.autograd.grad(real_logits.sum(), reals, create_graph=True)
        loss = loss + grad.square().sum(dim=[1, 2, 3]).mean() * (gamma / 2) * r1_interval
    return loss

@click.command(context_settings=dict(show_default=True))
@click.option('--data', default='datasets/mnist-32x32.zip', help='EDM-format dataset (dataset_tool.py)')
@click.option('--outdir', default='out/stylegan2-mnist', help='Run folder (continued if it has a state)')
@click.option('--kimg', default=100.0, help='Training length [kimg of reals shown to D]')
@click.option('--batch', default=32)
@click.option('--lr', default=0.0025)
@click.option('--gamma', default=0.05, help='R1 weight')
@click.option('--r1-interval', default=4)
@click.option('--ema', default=5.0, help='G_ema half-life [kimg]')
@click.option('--cbase', default=1024, help='Channels: min(cbase / resolution, cmax)')
@click.option('--cmax', default=64)
@click.option('--z-dim', default=64)
@click.option('--tick', default=4.0, help='Progress interval [kimg]')
@click.option('--snap', default=5, help='Snapshot interval [ticks]')
@click.option('--seed', default=0)
def main(data, outdir, kimg, batch, lr, gamma, r1_interval, ema, cbase, cmax, z_dim, tick, snap, seed):
    torch.manual_seed(seed)
    try:
        images, labels, dataset_kwargs = load_dataset(data)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f'{data}: {e}', param_hint='--data') from None
    G, D = build_networks(images.shape[-1], images.shape[1], labels.shape[1], z_dim, cbase, cmax)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    ratio = r1_interval / (r1_interval + 1) # lazy-regularisation correction of D's Adam
    g_opt = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.99), eps=1e-8)
    d_opt = torch.optim.Adam(D.parameters(), lr=lr * ratio, betas=(0.0, 0.99 ** ratio), eps=1e-8)
    os.makedirs(outdir, exist_ok=True)
    state_path = os.path.join(outdir, 'training-state.pt')
    cur_nimg, step = 0, 0
    if os.path.isfile(state_path):
        state = torch.load(state_path, weights_only=True)
        for module, key in ((G, 'G'), (D, 'D'), (G_ema, 'G_ema'), (g_opt, 'g_opt'), (d_opt, 'd_opt')):
            module.load_state_dict(state[key])
        cur_nimg, step = state['cur_nimg'], state['step']
        torch.set_rng_state(state['rng'])
        print(f'Continuing {outdir} from {cur_nimg / 1e3:.1f} kimg')
    with open(os.path.join(outdir, 'options.json'), 'w') as f:
        json.dump(dict(data=data, kimg=kimg, batch=batch, lr=lr, gamma=gamma, r1_interval=r1_interval,
            ema=ema, cbase=cbase, cmax=cmax, z_dim=z_dim, seed=seed), f, indent=2)
    print(f'G {sum(p.numel() for p in G.parameters()) / 1e6:.2f} M, D {sum(p.numel() for p in D.parameters()) / 1e6:.2f} M '
          f'parameters; {len(images)} images; training to {kimg} kimg')

    grid_g = torch.Generator().manual_seed(123)
    grid_z = torch.randn([100, z_dim], generator=grid_g)
    grid_c = torch.eye(labels.shape[1])[torch.arange(100) % labels.shape[1]]
    start, tick_start, tick_nimg, ticks = time.time(), time.time(), cur_nimg, 0
    losses = dict(G=[], D=[])
    while cur_nimg < kimg * 1000:
        idx = torch.randint(0, len(images), [batch])
        reals = images[idx].to(torch.float32) / 127.5 - 1
        c_real = labels[idx]
        c_gen = labels[torch.randint(0, len(images), [batch])] # the dataset's label distribution
        # G: non-saturating logistic loss.
        G.requires_grad_(True); D.requires_grad_(False)
        fakes = G(torch.randn([batch, z_dim]), c_gen)
        g_loss = F.softplus(-D(fakes, c_gen)).mean()
        g_opt.zero_grad(set_to_none=True); g_loss.backward(); g_opt.step()
        # D: logistic loss on fresh fakes, lazy R1 on reals.
        G.requires_grad_(False); D.requires_grad_(True)
        with torch.no_grad():
            fakes = G(torch.randn([batch, z_dim]), c_gen)
        d_loss = d_logistic_r1(D, reals, c_real, fakes, gamma, step % r1_interval == 0, r1_interval)
        d_opt.zero_grad(set_to_none=True); d_loss.backward(); d_opt.step()
        losses['G'].append(g_loss.item()); losses['D'].append(d_loss.item())
        cur_nimg += batch
        step += 1
        train_utils.update_ema(G_ema, G, cur_nimg, batch, ema, rampup_ratio=0.05)

        done = cur_nimg >= kimg * 1000
        if not done and cur_nimg < tick_nimg + tick * 1000:
            continue
        ticks += 1
        now = time.time()
        print(f'kimg {cur_nimg / 1e3:<7.1f} time {dnnlib.util.format_time(now - start):<9s} '
              f'sec/kimg {(now - tick_start) / ((cur_nimg - tick_nimg) / 1e3):<6.1f} '
              f'loss_G {np.mean(losses["G"]):<7.3f} loss_D {np.mean(losses["D"]):<7.3f}', flush=True)
        losses = dict(G=[], D=[])
        tick_start, tick_nimg = now, cur_nimg
        if done or ticks % snap == 0:
            kimg_done = cur_nimg // 1000
            snapshot = dict(G=G, D=D, G_ema=G_ema, augment_pipe=None, training_set_kwargs=dataset_kwargs)
            snapshot = {k: (copy.deepcopy(v).eval().requires_grad_(False) if isinstance(v, torch.nn.Module) else v)
                for k, v in snapshot.items()}
            persistence.save_network_pkl(snapshot, os.path.join(outdir, f'network-snapshot-{kimg_done:06d}.pkl'))
            with torch.no_grad():
                sampling.save_image_grid(G_ema(grid_z, grid_c, noise_mode='const'),
                    os.path.join(outdir, f'samples-{kimg_done:06d}.png'), grid_w=10)
            tmp = f'{state_path}.tmp'
            torch.save(dict(G=G.state_dict(), D=D.state_dict(), G_ema=G_ema.state_dict(),
                g_opt=g_opt.state_dict(), d_opt=d_opt.state_dict(), cur_nimg=cur_nimg, step=step,
                rng=torch.get_rng_state()), tmp)
            os.replace(tmp, state_path)
    print('Done.')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
