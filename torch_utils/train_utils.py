"""Mechanics shared by the training loops (teacher training and refinement): how a global batch
splits over processes and accumulation rounds, gradient synchronisation, the EMA, run folders.
"""

import glob
import os
import re

import torch

from torch_utils import distributed

def split_batch(batch_size, batch_gpu, world_size):
    """(rounds, batch_gpu): accumulation rounds per process and images per round.

    The global batch is cut into world_size x rounds equal parts; a one-line ValueError says
    which flag does not divide.
    """
    if batch_size % world_size != 0:
        raise ValueError(f'--batch {batch_size} does not split over {world_size} processes')
    local_batch = batch_size // world_size
    batch_gpu = local_batch if batch_gpu is None else min(batch_gpu, local_batch)
    if local_batch % batch_gpu != 0:
        raise ValueError(f'--batch-gpu {batch_gpu} does not divide the per-process batch {local_batch}')
    return local_batch // batch_gpu, batch_gpu

def sync_gradients(params):
    """Sum the gradients of `params` over all processes (one flat all-reduce), then replace
    NaN/inf by 0/±1e5 so that one bad sample cannot destroy the weights."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    distributed.all_reduce_sum(flat)
    torch.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p)
        offset += g.numel()

@torch.no_grad()
def update_ema(ema, net, cur_nimg, batch_size, halflife_kimg, rampup_ratio=None):
    """EMA by half-life in images; early in training the half-life is at most
    rampup_ratio x images seen. Buffers are copied."""
    ema_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        ema_nimg = min(ema_nimg, cur_nimg * rampup_ratio)
    beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)

def latest_training_state(path):
    """`path` itself if it is a file, else the newest training-state-*.pt in that folder."""
    if os.path.isfile(path):
        return path
    states = sorted(glob.glob(os.path.join(path, 'training-state-*.pt')))
    if not states:
        raise FileNotFoundError(f'no training-state-*.pt in {path}')
    return states[-1]

def next_run_dir(outdir, desc):
    """outdir/NNNNN-desc with the next free number (the NVlabs run-folder convention)."""
    os.makedirs(outdir, exist_ok=True)
    ids = [int(m.group(1)) for m in (re.match(r'^(\d+)-', d) for d in os.listdir(outdir)) if m]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')
