"""Process-group helpers that also work, as no-ops, in a single plain process.

Launch with `torchrun --nproc_per_node=N script.py ...`: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and `init()` joins the group. Without torchrun (or
with WORLD_SIZE=1) nothing is initialised and every collective below returns at once.
"""

import os

import torch
import torch.distributed as dist

_state = dict(rank=0, world_size=1, local_rank=0, device=None)

def _env_int(name, default):
    value = os.environ.get(name)
    return default if value in (None, '') else int(value)

def init():
    """Join the process group described by torchrun's environment variables, if any."""
    rank = _env_int('RANK', 0)
    world_size = _env_int('WORLD_SIZE', 1)
    local_rank = _env_int('LOCAL_RANK', 0)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank) # before init, so NCCL binds each rank to its own GPU
    if world_size > 1 and not dist.is_initialized():
        # torchrun always sets these; defaults let a hand-launched single-node run work too.
        os.environ.setdefault('MASTER_ADDR', 'localhost')
        os.environ.setdefault('MASTER_PORT', '29500')
        backend = 'nccl' if use_cuda else 'gloo'
        dist.init_process_group(backend=backend, init_method='env://', rank=rank,
            world_size=world_size)
    _state.update(rank=rank, world_size=world_size, local_rank=local_rank,
        device=torch.device('cuda', local_rank) if use_cuda else torch.device('cpu'))

def _active():
    return dist.is_available() and dist.is_initialized()

def get_rank():
    return dist.get_rank() if _active() else 0

def get_world_size():
    return dist.get_world_size() if _active() else 1

def is_main():
    return get_rank() == 0

def device():
    """This process's device: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if _state['device'] is None:
        if torch.cuda.is_available():
            return torch.device('cuda', _env_int('LOCAL_RANK', 0))
        return torch.device('cpu')
    return _state['device']

def barrier():
    if _active():
        dist.barrier()

def print0(*args, **kwargs):
    """print() on rank 0 only, flushed at once so that logs interleave sensibly."""
    if is_main():
        kwargs.setdefault('flush', True)
        print(*args, **kwargs)

def _reduce_device(tensor):
    # NCCL reduces only CUDA tensors; gloo handles CPU ones.
    if _active() and dist.get_backend() == 'nccl':
        return device()
    return tensor.device

def all_reduce_sum(tensor):
    """Sum `tensor` over all processes, in place when possible; returns the result."""
    if not _active() or get_world_size() == 1:
        return tensor
    work = tensor.to(_reduce_device(tensor))
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor

def all_reduce_mean(tensor):
    """Average `tensor` over all processes (floating point), in place; returns the result."""
    if not _active() or get_world_size() == 1:
        return tensor
    all_reduce_sum(tensor)
    tensor.div_(get_world_size())
    return tensor

def all_gather_object(obj):
    """A list of `obj` from every rank, in rank order ([obj] in a single process)."""
    if not _active() or get_world_size() == 1:
        return [obj]
    result = [None] * get_world_size()
    dist.all_gather_object(result, obj)
    return result

def broadcast_module(module, src=0):
    """Copy the parameters and buffers of rank `src`'s module to every other rank."""
    if not _active() or get_world_size() == 1:
        return module
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            work = tensor.data.to(_reduce_device(tensor))
            dist.broadcast(work, src=src)
            if work is not tensor.data:
                tensor.data.copy_(work)
    return module

def shutdown():
    """Leave the process group (if any) so that the process can exit cleanly."""
    if _active():
        dist.barrier()
        dist.destroy_process_group()
    _state.update(rank=0, world_size=1, local_rank=0, device=None)
