"""Train an EDM denoiser on an image dataset: the library side of train.py.

One flat loop, counted in training images (kimg). Every random draw comes from a seed derived
from (seed, images seen so far, process part), and the data order from an InfiniteSampler whose
position is restored, so a run resumed from its training state reproduces an uninterrupted run
bit for bit. Each global batch is cut into parts (processes x accumulation rounds) that draw their
own noise, so results depend on the number of parts, not on how they are spread: 2 processes
give the same weights as 1 process with --batch-gpu of half the batch.
"""

import collections
import copy
import itertools
import os
import resource
import time

import torch

import dnnlib
from torch_utils import distributed, misc, persistence, train_utils, training_stats
from torch_utils.images import save_image_grid
from torch_utils.rng import StackedRandomGenerator, derive_seed
from training.sampler import edm_sampler

class GlobalBatchSlices(torch.utils.data.Sampler):
    """This process's slice of each global batch, one list of indices per accumulation round.

    Every process walks the same global stream of indices (skipping the `start` images already
    trained on) and takes part `rank * rounds + r` of each batch, as torch_utils.rng does for noise.
    """

    def __init__(self, dataset, seed, start, batch_size, rank, world, rounds):
        super().__init__()
        self.dataset, self.seed, self.start = dataset, seed, start
        self.batch_size, self.rank, self.rounds = batch_size, rank, rounds
        self.part_size = batch_size // (world * rounds)

    def __iter__(self):
        stream = iter(misc.InfiniteSampler(self.dataset, seed=self.seed))
        collections.deque(itertools.islice(stream, self.start), maxlen=0) # fast-forward
        while True:
            batch = list(itertools.islice(stream, self.batch_size))
            for r in range(self.rounds):
                lo = (self.rank * self.rounds + r) * self.part_size
                yield batch[lo:lo + self.part_size]

def training_loop(
    run_dir             = '.',      # Output directory (exists).
    dataset_kwargs      = {},       # Options of the dataset (class_name included).
    data_loader_kwargs  = {},       # Options of torch.utils.data.DataLoader (num_workers, ...).
    network_kwargs      = {},       # Options of the preconditioned network (class_name included).
    loss_kwargs         = {},       # Options of the loss (class_name included).
    optimizer_kwargs    = {},       # Options of torch.optim.Adam (lr, betas, eps).
    seed                = 0,        # Seed of every random draw.
    batch_size          = 512,      # Global batch: images per iteration, all processes.
    batch_gpu           = None,     # Images per process per accumulation round; None = no rounds.
    total_kimg          = 200000,   # Training duration.
    ema_halflife_kimg   = 500,      # Half-life of the EMA of the weights.
    ema_rampup_ratio    = 0.05,     # EMA ramp-up: half-life <= this fraction of images seen; None = off.
    lr_rampup_kimg      = 10000,    # Learning rate rises linearly to its value over this many images.
    kimg_per_tick       = 50,       # Progress line and statistics interval.
    snapshot_ticks      = 50,       # Snapshot (pickle, sample grid) interval in ticks; None = only at the end.
    state_dump_ticks    = 500,      # Training-state interval in ticks; None = only at the end.
    resume_state        = None,     # training-state-*.pt to continue from.
    grid_seeds          = 64,       # Images in each snapshot's sample grid; 0 = no grid.
    grid_steps          = 18,       # Heun steps of the sample grid.
    log                 = print,    # Progress output (only rank 0 prints).
):
    device = distributed.device()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    rounds, batch_gpu = train_utils.split_batch(batch_size, batch_gpu, world)
    is_main = rank == 0
    say = log if is_main else (lambda *_: None)

    # Data, network, loss, optimizer.
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    torch.manual_seed(derive_seed(seed, 'init')) # initial weights: the same on every rank
    net = dnnlib.util.construct_class_by_name(**network_kwargs, img_resolution=dataset.resolution,
        img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net = net.to(device).train().requires_grad_(True)
    distributed.broadcast_module(net)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = torch.optim.Adam(net.parameters(), **optimizer_kwargs)
    base_lr = optimizer_kwargs['lr']

    cur_nimg, cur_tick = 0, 0
    if resume_state is not None:
        state = torch.load(resume_state, map_location=device, weights_only=True)
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer_state'])
        cur_nimg, cur_tick = state['cur_nimg'], state['cur_tick']
        say(f'Resuming from {resume_state} at {cur_nimg / 1e3:.3f} kimg')
        if is_main: # the ticks after the state are replayed: their records go
            train_utils.truncate_jsonl(os.path.join(run_dir, 'stats.jsonl'), lambda r: r.get('tick', 0) <= cur_tick)
    if is_main:
        train_utils.remove_stale_temp_files(run_dir)
    last_snapshot = ([path for kimg, path in train_utils.numbered_files(run_dir, 'network-snapshot', 'pkl')
        if kimg <= cur_nimg / 1e3] or [None])[-1]

    sampler = GlobalBatchSlices(dataset, seed=derive_seed(seed, 'data') % (1 << 32), start=cur_nimg,
        batch_size=batch_size, rank=rank, world=world, rounds=rounds)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
        pin_memory=device.type == 'cuda', **data_loader_kwargs)
    data = iter(loader)

    num_params = sum(p.numel() for p in net.parameters())
    say(f'Training {type(net).__name__}({network_kwargs.get("model_type")}, {num_params / 1e6:.2f} M params) '
        f'on {dataset.name}: {len(dataset)} images, {dataset.resolution}x{dataset.resolution}x'
        f'{dataset.num_channels}, {dataset.label_dim} labels')
    say(f'Batch {batch_size} over {world} process(es), {rounds} round(s) of {batch_gpu}; '
        f'{total_kimg} kimg from {cur_nimg / 1e3:.3f}')

    stats = training_stats.Collector()
    start_time = tick_start_time = time.time()
    tick_start_nimg = cur_nimg
    done = cur_nimg >= total_kimg * 1000
    while not done:
        # Gradients summed over rounds and processes, averaged over the global batch.
        optimizer.zero_grad(set_to_none=True)
        for r in range(rounds):
            images, labels = next(data)
            images = images.to(device).to(torch.float32) / 127.5 - 1
            labels = labels.to(device)
            torch.manual_seed(derive_seed(seed, cur_nimg, 'loss', rank * rounds + r)) # sigma, noise, dropout
            loss = loss_fn(net=net, images=images, labels=labels, augment_pipe=None)
            training_stats.report('Loss/loss', loss)
            (loss.sum() / batch_size).backward()
        lr = base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
        for group in optimizer.param_groups:
            group['lr'] = lr
        train_utils.sync_gradients(net.parameters())
        optimizer.step()

        # EMA by half-life in images, ramped up early in training.
        train_utils.update_ema(ema, net, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio)

        cur_nimg += batch_size
        done = cur_nimg >= total_kimg * 1000
        if not done and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
            continue

        # End of tick: statistics, progress, snapshots, training state.
        cur_tick += 1
        now = time.time()
        summary = stats.update().as_dict()
        train_utils.check_finite(cur_tick, cur_nimg / 1e3, {'loss': summary.get('Loss/loss', {}).get('mean', 0.0)},
            dict(net=net, ema=ema), last_good=last_snapshot)
        tick_nimg = cur_nimg - tick_start_nimg
        record = dict(tick=cur_tick, kimg=cur_nimg / 1e3, time=now - start_time,
            sec_per_kimg=(now - tick_start_time) / max(tick_nimg / 1e3, 1e-8),
            img_per_sec=tick_nimg / max(now - tick_start_time, 1e-8), lr=lr,
            maxrss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            peak_gpu_gb=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == 'cuda' else 0.0,
            **summary)
        loss_mean = summary.get('Loss/loss', {}).get('mean', float('nan'))
        say(f"tick {cur_tick:<5d} kimg {record['kimg']:<9.3f} time {dnnlib.util.format_time(record['time']):<9s} "
            f"sec/kimg {record['sec_per_kimg']:<8.2f} img/s {record['img_per_sec']:<7.1f} "
            f"loss {loss_mean:<8.4f} cpumem {record['maxrss_gb']:.2f} gpumem {record['peak_gpu_gb']:.2f}")
        if is_main:
            training_stats.append_jsonl(os.path.join(run_dir, 'stats.jsonl'), training_stats.with_nvlabs_keys(record))

        tag = train_utils.snapshot_tag(cur_nimg, tick_start_nimg)
        if done or (snapshot_ticks is not None and cur_tick % snapshot_ticks == 0):
            frozen = copy.deepcopy(ema).eval().requires_grad_(False)
            misc.check_ddp_consistency(frozen) # a collective: every rank takes part
            if is_main:
                data_out = dict(ema=frozen.cpu(), loss_fn=loss_fn, augment_pipe=None,
                    dataset_kwargs=dict(dataset_kwargs))
                persistence.save_network_pkl(data_out, os.path.join(run_dir, f'network-snapshot-{tag}.pkl'))
                if grid_seeds:
                    save_sample_grid(ema, os.path.join(run_dir, f'samples-{tag}.png'),
                        num=grid_seeds, num_steps=grid_steps, device=device)
            last_snapshot = os.path.join(run_dir, f'network-snapshot-{tag}.pkl')
        if done or (state_dump_ticks is not None and cur_tick % state_dump_ticks == 0):
            if is_main:
                train_utils.save_training_state(os.path.join(run_dir, f'training-state-{tag}.pt'),
                    dict(net=net.state_dict(), ema=ema.state_dict(),
                        optimizer_state=optimizer.state_dict(), cur_nimg=cur_nimg, cur_tick=cur_tick))
        distributed.barrier()
        tick_start_nimg, tick_start_time = cur_nimg, time.time()

    say(f'Finished at {cur_nimg / 1e3:g} kimg.')
    return dnnlib.EasyDict(net=net, ema=ema, loss_fn=loss_fn, cur_nimg=cur_nimg)

#----------------------------------------------------------------------------

@torch.no_grad()
def save_sample_grid(net, path, num=64, num_steps=18, device='cpu'):
    """Heun samples of fixed seeds 0..num-1, seed i of class i % label_dim, in one PNG."""
    seeds = list(range(num))
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([num, net.img_channels, net.img_resolution, net.img_resolution])
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim, device=device)[torch.arange(num, device=device) % net.label_dim]
    images = edm_sampler(net, latents, labels, num_steps=num_steps)
    save_image_grid(images.cpu(), path, grid_w=net.label_dim or None) # a column per class
