"""Train a small class-conditional StyleGAN2 on MNIST-32: the GAN that bench/gan_refine.py refines.

StyleGAN2-ADA's recipe at a CPU-sized scale: non-saturating logistic loss, lazy R1 on the reals
(every `--r1-interval` D steps, gamma `--gamma`), Adam (0, 0.99) with the lazy-regularisation
correction of lr and betas, a G_ema by half-life; no augmentation, style mixing or path-length
regularisation (ADA's CIFAR setting). Two departures, both measured (README, "Refining a
StyleGAN"): G uses the `orig` architecture, and D is a plain convolutional one
(training/conv_discriminator.py). At these widths (32-64 channels) every run with StyleGAN2's
`skip` G or with its discriminator collapsed to one glyph within 10-20 kimg; `--g-arch skip`
and `--d-type stylegan2` bring them back.

The run folder gets `network-snapshot-NNNNNN.pkl`, a StyleGAN pickle dict(G, D, G_ema,
augment_pipe=None, training_set_kwargs) that the safe loader rebuilds, a sample grid per
snapshot and `training-state.pt`; running the same command again continues from it exactly.

  python dataset_tool.py --source mnist --split train --dest datasets/mnist-32x32.zip
  OMP_NUM_THREADS=2 python bench/train_stylegan2_mnist.py --kimg 48 --tick 4 --snap 2 \
      --outdir out/stylegan2-mnist-conv --fd-ref pretrained/mnist-train60k-fast.npz

Each tick prints `zstd`, the standard deviation over z of G_ema's images for fixed labels
(0.24 for MNIST's digits within a class; near 0 for a collapsed generator). With `--fd-ref`
every snapshot also gets FD (fast detector, 5000 samples) in metric-fd5k.jsonl.
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
from torch_utils.images import save_image_grid # pylint: disable=wrong-import-position
from torch_utils import persistence, train_utils # pylint: disable=wrong-import-position
from training import networks_stylegan2 as sg2 # pylint: disable=wrong-import-position
from training.conv_discriminator import ConvDiscriminator # pylint: disable=wrong-import-position

def load_dataset(path):
    """All images as uint8 NCHW and one-hot labels (MNIST-32 is 61 MB in memory)."""
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path=path, use_labels=True)
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    images = torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.from_numpy(np.stack([dataset.get_label(i) for i in range(len(dataset))]))
    return images, labels, dict(dataset_kwargs, resolution=dataset.resolution, max_size=len(dataset))

def build_networks(resolution, channels, c_dim, z_dim, cbase=1024, cmax=64, map_layers=2, g_arch='orig',
        use_noise=True, d_type='conv', d_arch='resnet', d_map_layers=8, mbstd_group=4):
    """Our StyleGAN2 G (w_dim = z_dim) and a D: the plain convolutional one (`conv`) or StyleGAN2's."""
    common = dict(c_dim=c_dim, img_resolution=resolution, img_channels=channels)
    G = sg2.Generator(z_dim=z_dim, w_dim=z_dim, mapping_kwargs=dict(num_layers=map_layers),
        synthesis_kwargs=dict(channel_base=cbase, channel_max=cmax, architecture=g_arch, use_noise=use_noise), **common)
    if d_type == 'conv':
        return G, ConvDiscriminator(**common)
    D = sg2.Discriminator(channel_base=cbase, channel_max=cmax, architecture=d_arch,
        mapping_kwargs=dict(num_layers=d_map_layers),
        epilogue_kwargs=dict(mbstd_group_size=mbstd_group, mbstd_num_channels=1 if mbstd_group else 0), **common)
    return G, D

@torch.no_grad()
def latent_spread(G, z_dim, c_dim, device, per_label=8):
    """Mean over pixels of the std over z of G's images, 8 latents per label (fixed noise).
    MNIST's own digits give 0.24 within a class; a random initialisation gives about 1.2, a
    collapsed generator near 0."""
    n = per_label * max(c_dim, 1)
    gen = torch.Generator(device).manual_seed(0)
    c = torch.eye(c_dim, device=device)[torch.arange(n, device=device) % c_dim] if c_dim else None
    x = G(torch.randn([n, z_dim], generator=gen, device=device), c, noise_mode='const')
    x = x.reshape(per_label, c_dim, *x.shape[1:]) if c_dim else x
    return x.std(dim=0).mean().item()

def snapshot_fd(G_ema, ref, device):
    """FD (fast detector) of 5000 samples at truncation 1, random noise, generate.py's seeds."""
    from metrics import registry # pylint: disable=import-outside-toplevel
    G = G_ema.eval()
    torch.manual_seed(0)
    sample = registry.generator_sample_fn(G, device)
    records = registry.compute_metrics('fd5k', sample, num_labels=G.c_dim, ref=ref, device=device)
    return float(list(records['fd5k']['results'].values())[0])

def d_logistic_r1(D, reals, c_real, fakes, c_fake, gamma, do_r1, r1_interval):
    """Non-saturating D loss; every r1_interval-th step also gamma/2 * |grad D(real)|^2,
    scaled by the interval (lazy regularisation). Each fake is judged with the label it was
    generated for: with the reals' labels instead, D never learns what a fake of class k looks
    like, and a conditional G is free to ignore its label (and then its latent)."""
    reals = reals.detach().requires_grad_(do_r1)
    real_logits = D(reals, c_real)
    loss = F.softplus(D(fakes.detach(), c_fake)).mean() + F.softplus(-real_logits).mean()
    if do_r1:
        grad, = torch.autograd.grad(real_logits.sum(), reals, create_graph=True)
        loss = loss + grad.square().sum(dim=[1, 2, 3]).mean() * (gamma / 2) * r1_interval
    return loss

@click.command(context_settings=dict(show_default=True))
@click.option('--data', default='datasets/mnist-32x32.zip', help='EDM-format dataset (dataset_tool.py)')
@click.option('--outdir', default='out/stylegan2-mnist', help='Run folder (continued if it has a state)')
@click.option('--kimg', default=100.0, help='Training length [kimg of reals shown to D]')
@click.option('--batch', default=32)
@click.option('--lr', default=0.0025, help="G's learning rate")
@click.option('--dlr', default=None, type=float, help="D's learning rate [default: --lr]")
@click.option('--gamma', default=0.05, help='R1 weight')
@click.option('--r1-interval', default=4)
@click.option('--ema', default=5.0, help='G_ema half-life [kimg]')
@click.option('--cbase', default=1024, help='Channels: min(cbase / resolution, cmax)')
@click.option('--cmax', default=64)
@click.option('--z-dim', default=64)
@click.option('--tick', default=4.0, help='Progress interval [kimg]')
@click.option('--tick-minutes', default=None, type=float, help='Also end a tick after this long')
@click.option('--snap', default=5, help='Snapshot interval [ticks]')
@click.option('--g-arch', default='orig', type=click.Choice(['orig', 'skip', 'resnet']), help="G's architecture")
@click.option('--d-type', default='conv', type=click.Choice(['conv', 'stylegan2']), help='D: plain convolutional (training/conv_discriminator.py) or StyleGAN2')
@click.option('--d-arch', default='resnet', type=click.Choice(['orig', 'skip', 'resnet']), help="StyleGAN2 D's architecture")
@click.option('--map-layers', default=2, help='Mapping network depth')
@click.option('--cond/--uncond', default=True, help='Class-conditional G and D, or ignore the labels')
@click.option('--mbstd-group', default=4, help="StyleGAN2 D's minibatch-std group size (0: no minibatch-std layer)")
@click.option('--d-map-layers', default=8, help="Depth of StyleGAN2 D's label mapping (StyleGAN2: 8)")
@click.option('--noise/--no-noise', default=True, help="G's per-pixel noise inputs (StyleGAN2's default)")
@click.option('--seed', default=0)
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
@click.option('--max-minutes', default=None, type=float, help='Also stop (snapshot and state) after this long')
@click.option('--fd-ref', default=None, help='FD (fast detector, 5000 samples) at each snapshot against this .npz')
def main(data, outdir, kimg, batch, lr, dlr, mbstd_group, g_arch, d_type, d_arch, gamma, r1_interval, ema, cbase, cmax, z_dim, map_layers, cond, d_map_layers, noise, tick, tick_minutes, snap,
        seed, device, max_minutes, fd_ref):
    torch.manual_seed(seed)
    device = torch.device(device)
    if device.type == 'cuda': # small convolutions: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    try:
        images, labels, dataset_kwargs = load_dataset(data)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f'{data}: {e}', param_hint='--data') from None
    images, labels = images.to(device), labels.to(device)
    if not cond:
        labels = labels[:, :0] # c_dim 0: both networks unconditional
    G, D = build_networks(images.shape[-1], images.shape[1], labels.shape[1], z_dim, cbase=cbase, cmax=cmax,
        map_layers=map_layers, g_arch=g_arch, use_noise=noise, d_type=d_type, d_arch=d_arch,
        d_map_layers=d_map_layers, mbstd_group=mbstd_group)
    G, D = G.to(device), D.to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    ratio = r1_interval / (r1_interval + 1) # lazy-regularisation correction of D's Adam
    g_opt = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.99), eps=1e-8)
    d_opt = torch.optim.Adam(D.parameters(), lr=(lr if dlr is None else dlr) * ratio, betas=(0.0, 0.99 ** ratio), eps=1e-8)
    os.makedirs(outdir, exist_ok=True)
    state_path = os.path.join(outdir, 'training-state.pt')
    cur_nimg, step = 0, 0
    if os.path.isfile(state_path):
        state = torch.load(state_path, weights_only=True, map_location=device)
        for module, key in ((G, 'G'), (D, 'D'), (G_ema, 'G_ema'), (g_opt, 'g_opt'), (d_opt, 'd_opt')):
            module.load_state_dict(state[key])
        cur_nimg, step = state['cur_nimg'], state['step']
        torch.set_rng_state(state['rng'].cpu())
        if device.type == 'cuda' and 'cuda_rng' in state:
            torch.cuda.set_rng_state(state['cuda_rng'].cpu(), device)
        print(f'Continuing {outdir} from {cur_nimg / 1e3:.1f} kimg')
    with open(os.path.join(outdir, 'options.json'), 'w') as f:
        json.dump(click.get_current_context().params, f, indent=2) # every option, as given
    print(f'G {sum(p.numel() for p in G.parameters()) / 1e6:.2f} M, D {sum(p.numel() for p in D.parameters()) / 1e6:.2f} M '
          f'parameters; {len(images)} images; training to {kimg} kimg')

    grid_g = torch.Generator().manual_seed(123)
    grid_z = torch.randn([100, z_dim], generator=grid_g).to(device)
    grid_c = torch.eye(max(labels.shape[1], 1))[torch.arange(100) % max(labels.shape[1], 1)][:, :labels.shape[1]].to(device)
    start, tick_start, tick_nimg, ticks = time.time(), time.time(), cur_nimg, 0
    losses = dict(G=[], D=[])
    done = cur_nimg >= kimg * 1000
    while not done:
        idx = torch.randint(0, len(images), [batch], device=device)
        reals = images[idx].to(torch.float32) / 127.5 - 1
        c_real = labels[idx]
        c_gen = labels[torch.randint(0, len(images), [batch], device=device)] # the dataset's label distribution
        # G: non-saturating logistic loss.
        G.requires_grad_(True); D.requires_grad_(False)
        fakes = G(torch.randn([batch, z_dim], device=device), c_gen)
        g_loss = F.softplus(-D(fakes, c_gen)).mean()
        g_opt.zero_grad(set_to_none=True); g_loss.backward(); g_opt.step()
        # D: logistic loss on fresh fakes, lazy R1 on reals.
        G.requires_grad_(False); D.requires_grad_(True)
        with torch.no_grad():
            fakes = G(torch.randn([batch, z_dim], device=device), c_gen)
        d_loss = d_logistic_r1(D, reals, c_real, fakes, c_gen, gamma, step % r1_interval == 0, r1_interval)
        d_opt.zero_grad(set_to_none=True); d_loss.backward(); d_opt.step()
        losses['G'].append(g_loss.detach()); losses['D'].append(d_loss.detach()) # no per-step device sync
        cur_nimg += batch
        step += 1
        train_utils.update_ema(G_ema, G, cur_nimg, batch, ema, rampup_ratio=0.05)

        done = cur_nimg >= kimg * 1000
        tick_over = cur_nimg >= tick_nimg + tick * 1000 or (
            tick_minutes is not None and time.time() - tick_start >= tick_minutes * 60)
        if not done and not tick_over:
            continue
        ticks += 1
        now = time.time()
        done = done or (max_minutes is not None and now - start >= max_minutes * 60)
        spread = latent_spread(G_ema, z_dim, labels.shape[1], device)
        print(f'kimg {cur_nimg / 1e3:<7.1f} time {dnnlib.util.format_time(now - start):<9s} '
              f'sec/kimg {(now - tick_start) / ((cur_nimg - tick_nimg) / 1e3):<6.1f} '
              f'loss_G {torch.stack(losses["G"]).mean().item():<7.3f} loss_D {torch.stack(losses["D"]).mean().item():<7.3f} '
              f'zstd {spread:.3f}', flush=True)
        losses = dict(G=[], D=[])
        tick_start, tick_nimg = now, cur_nimg
        if done or ticks % snap == 0:
            kimg_done = cur_nimg // 1000
            snapshot = dict(G=G, D=D, G_ema=G_ema, augment_pipe=None, training_set_kwargs=dataset_kwargs)
            snapshot = {k: (copy.deepcopy(v).eval().requires_grad_(False) if isinstance(v, torch.nn.Module) else v)
                for k, v in snapshot.items()}
            persistence.save_network_pkl(snapshot, os.path.join(outdir, f'network-snapshot-{kimg_done:06d}.pkl'))
            with torch.no_grad():
                save_image_grid(G_ema(grid_z, grid_c, noise_mode='const'),
                    os.path.join(outdir, f'samples-{kimg_done:06d}.png'), grid_w=10)
            if fd_ref is not None:
                fd = snapshot_fd(G_ema, fd_ref, device)
                print(f'fd5k {fd:.2f} at {cur_nimg / 1e3:.1f} kimg', flush=True)
                with open(os.path.join(outdir, 'metric-fd5k.jsonl'), 'a') as f:
                    f.write(json.dumps(dict(kimg=cur_nimg / 1e3, fd5k=fd, zstd=spread, snapshot=f'network-snapshot-{kimg_done:06d}.pkl')) + '\n')
            tmp = f'{state_path}.tmp'
            torch.save(dict(G=G.state_dict(), D=D.state_dict(), G_ema=G_ema.state_dict(),
                g_opt=g_opt.state_dict(), d_opt=d_opt.state_dict(), cur_nimg=cur_nimg, step=step,
                rng=torch.get_rng_state(),
                **(dict(cuda_rng=torch.cuda.get_rng_state(device)) if device.type == 'cuda' else {})), tmp)
            os.replace(tmp, state_path)
    print('Done.')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
