"""Mechanics shared by the training loops (teacher training and refinement): how a global batch
splits over processes and accumulation rounds, gradient synchronisation, the EMA, run folders.
"""

import json
import math
import os
import re
import zipfile

import torch

import dnnlib
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

# Snapshot and training-state names: NVlabs' `<prefix>-NNNNNN.<ext>` with NNNNNN the whole kimg
# seen; a tick that ends in the kimg it started in (ticks under 1 kimg, a short last tick) adds
# the images past it (`-000001_280`: 1.280 kimg), so that no file ever replaces an earlier one.
# '_' sorts after '.', so plain name order is kimg order.
_NUMBERED = re.compile(r'^(?P<prefix>.+)-(?P<kimg>\d+)(?:_(?P<rest>\d{3}))?\.(?P<ext>[A-Za-z]+)$')

def parse_lr_steps(text):
    """'30:0.2,60:0.05' -> ((30.0, 0.2), (60.0, 0.05)): from 30 kimg on the learning rates are
    0.2 x their own, from 60 kimg on 0.05 x. Raises ValueError with a one-line reason."""
    steps = []
    for item in (text or '').split(','):
        if not item.strip():
            continue
        kimg, sep, factor = item.partition(':')
        try:
            kimg, factor = float(kimg), float(factor)
        except ValueError:
            kimg = factor = None
        if not sep or kimg is None or not (math.isfinite(kimg) and math.isfinite(factor)):
            raise ValueError(f"expected KIMG:FACTOR[,KIMG:FACTOR...], got '{item.strip()}'")
        if kimg < 0 or factor <= 0:
            raise ValueError(f"'{item.strip()}': KIMG must be >= 0 and FACTOR > 0")
        if steps and kimg <= steps[-1][0]:
            raise ValueError(f"'{text}': the KIMG values must increase")
        steps.append((kimg, factor))
    return tuple(steps)

def lr_factor(steps, cur_nimg):
    """The learning-rate factor of `parse_lr_steps` steps in force at cur_nimg images (1 before the first)."""
    factor = 1.0
    for kimg, step_factor in steps:
        if cur_nimg >= kimg * 1000:
            factor = step_factor
    return factor

def snapshot_tag(cur_nimg, tick_start_nimg):
    if cur_nimg // 1000 != tick_start_nimg // 1000:
        return f'{cur_nimg // 1000:06d}'
    return f'{cur_nimg // 1000:06d}_{cur_nimg % 1000:03d}'

def numbered_files(folder, prefix, ext):
    """[(kimg as a float, path)] of `<prefix>-NNNNNN[_ddd].<ext>` in `folder`, in kimg order."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = _NUMBERED.match(name)
        if m and m.group('prefix') == prefix and m.group('ext') == ext:
            found.append((int(m.group('kimg')) + int(m.group('rest') or 0) / 1000, os.path.join(folder, name)))
    return sorted(found)

def is_complete_torch_file(path):
    """True if a torch.save archive is whole (every member's CRC checks), False if truncated."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None and any(n.endswith('data.pkl') for n in archive.namelist())
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False

def latest_training_state(path, log=None):
    """`path` itself if it is a file, else the newest complete training-state-*.pt in that
    folder; truncated ones (a kill or a full disk during the save) are skipped with a message."""
    if os.path.isfile(path):
        if not is_complete_torch_file(path):
            raise ValueError(f'{path}: truncated or not a training state')
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{path}: no such run directory or training state')
    states = numbered_files(path, 'training-state', 'pt')
    if not states:
        raise FileNotFoundError(f'no training-state-*.pt in {path}')
    for _, state in reversed(states):
        if is_complete_torch_file(state):
            return state
        if log is not None:
            log(f'Skipping {state}: truncated (an interrupted save); using an earlier state')
    raise ValueError(f'every training-state-*.pt in {path} is truncated')

def remove_stale_temp_files(folder):
    """Delete `*.tmp-PID[-...]` files left in `folder` by processes that are gone (a kill or a
    full disk during an atomic write); a live process's are kept."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.search(r'\.tmp-(\d+)(?:-[0-9a-f]+)?$', name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed

def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

def write_atomic(path, text):
    """Write a text file under a temporary name, then rename: never a half-written file."""
    with dnnlib.util.atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

def save_training_state(path, state):
    """torch.save under a temporary name, then rename; a failed save (a full disk) leaves no
    partial file and never replaces the previous state."""
    with dnnlib.util.atomic_path(path) as tmp:
        torch.save(state, tmp)

def truncate_jsonl(path, keep):
    """Keep only the records of a JSON-lines file for which keep(record) is true (a resumed run
    drops the records of the ticks it replays)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if keep(json.loads(line)):
                kept.append(line if line.endswith('\n') else line + '\n')
        except ValueError:
            pass # a line cut by a kill
    if len(kept) != len(lines):
        write_atomic(path, ''.join(kept))

class NonFiniteError(ValueError):
    """A loss or weight became NaN/inf: the run stops without saving it."""

def check_finite(tick, kimg, losses, modules, last_good):
    """Raise NonFiniteError naming the tick and the last good snapshot if any loss mean or any
    parameter is not finite (checked once per tick: one reduction per tensor)."""
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    for name, module in modules.items():
        if any(not bool(torch.isfinite(p).all()) for p in module.parameters()):
            bad.append(f'{name} weights')
    if bad:
        raise NonFiniteError(f"non-finite {', '.join(bad)} at tick {tick} ({kimg:.3f} kimg); nothing "
            f"of that tick was saved; last good snapshot: {last_good or 'none'} "
            '(lower the learning rates, or check the teacher)')

def next_run_dir(outdir, desc):
    """outdir/NNNNN-desc with the next free number (the NVlabs run-folder convention)."""
    os.makedirs(outdir, exist_ok=True)
    ids = [int(m.group(1)) for m in (re.match(r'^(\d+)-', d) for d in os.listdir(outdir)) if m]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')
