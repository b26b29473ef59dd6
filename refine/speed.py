"""Speed levers of the refinement loop: none changes what a run saves, only how fast it gets there.

  reuse_samples  the generator update's samples (detached) are also the first fake-score
                 update's: one generator forward per iteration fewer (the loop; see
                 docs/performance.md for what it changes);
  amp            bfloat16 autocast, by level: 'off'; 'nograd': the teacher/fake evaluations of
                 the generator loss when the divergence takes no gradient through them (DI, DMD,
                 f-distill); 'loss': those evaluations always (SiD, SIM too); 'all': also the
                 generator and the fake-score training passes; 'auto': 'all' where bf16 is
                 fast (GPUs with bf16, CPUs with AVX-512 BF16 or AMX), else 'off'. Networks
                 return float32, so the divergence arithmetic stays in float32. refine.py's
                 default is 'auto' for EDM teachers with EDM one-step generators, the pairing
                 whose MNIST FD it was measured not to hurt (docs/performance.md), and 'off'
                 for every other generator and for Gaussian-mixture teachers;
  compile        torch.compile of the networks' calls (True: inductor, or a backend name); the
                 modules themselves are what is saved, pickled and broadcast, so snapshots,
                 training states and torchrun are unchanged;
  fused_optim    Adam's fused step (one kernel for all parameters) and a foreach EMA;
  tf32           TF32 matrix products and convolutions on GPUs.
The EDM networks' own choices (attention kernel, dropout mask, memory layout) are
training.networks_edm.set_implementation().
"""

import contextlib
import ctypes
import ctypes.util
import time

import torch

from torch_utils import train_utils

AMP_LEVELS = ('off', 'nograd', 'loss', 'all', 'auto')

def bf16_is_fast(device):
    """Whether bfloat16 convolutions and products run natively (not emulated) on `device`."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == 'cpu':
        checks = [getattr(torch.cpu, name, None) for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
        return any(check is not None and check() for check in checks)
    return False

def resolve_amp(amp, device):
    """The amp level that `amp` means on `device` ('auto' resolved)."""
    if amp in (None, False):
        return 'off'
    if amp not in AMP_LEVELS:
        raise ValueError(f"amp must be one of {', '.join(AMP_LEVELS)}, got {amp!r}")
    if amp == 'auto':
        return 'all' if bf16_is_fast(device) else 'off'
    return amp

def amp_auto_applies(teacher, G):
    """Whether amp 'auto' may turn bf16 on for this pairing: an EDM image teacher and a generator
    that is an EDM network (a one-step generator made from it or loaded from a pickle). Others
    (StyleGAN, MLPs, exact mixtures) keep float32 unless amp is asked for by name."""
    from refine import teachers # pylint: disable=import-outside-toplevel
    from training import networks_generators # pylint: disable=import-outside-toplevel
    return isinstance(teacher, teachers.EDMTeacher) and isinstance(G, networks_generators.OneStepGenerator)

def adam(params, lr, betas, fused=True):
    """torch.optim.Adam (eps 1e-8), with the fused step where this torch and device have it."""
    params = list(params)
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-8, fused=True)
        except (RuntimeError, TypeError, ValueError): # no fused kernel here: one foreach step
            return torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-8, foreach=True)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-8)

@torch.no_grad()
def update_ema_foreach(ema, net, cur_nimg, batch_size, halflife_kimg, rampup_ratio=None):
    """train_utils.update_ema in two foreach calls (the same EMA, other rounding)."""
    ema_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        ema_nimg = min(ema_nimg, cur_nimg * rampup_ratio)
    beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
    p_ema = [p for p in ema.parameters()]
    p_net = [p.detach() for p in net.parameters()]
    if p_ema:
        torch._foreach_lerp_(p_ema, p_net, 1 - beta) # pylint: disable=protected-access
    b_ema, b_net = list(ema.buffers()), list(net.buffers())
    if b_ema:
        torch._foreach_copy_(b_ema, b_net) # pylint: disable=protected-access

class Levers:
    """What the loop asks of the levers: the calls of each network, a precision context per
    phase, the optimizers, the EMA update, and a timer around each phase."""

    def __init__(self, device, divergence, amp='auto', compile=False, fused_optim=True, tf32=True, timer=None): # pylint: disable=redefined-builtin
        self.device = torch.device(device)
        self.amp = resolve_amp(amp, self.device)
        self.compile = compile
        self.fused_optim = bool(fused_optim)
        self.grad_through_networks = bool(getattr(divergence, 'grad_through_networks', False))
        self.timer = timer
        if tf32 and self.device.type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def call(self, module):
        """What the loop calls for `module`: the module itself, or its compiled wrapper (which
        shares its parameters, buffers and training flag; the module is what gets saved)."""
        if not self.compile:
            return module
        backend = self.compile if isinstance(self.compile, str) else 'inductor'
        return torch.compile(module, backend=backend)

    def unmark(self, *modules):
        """Remove what torch.compile writes onto parameters and buffers (`_dynamo_static_input_type`,
        unguarded): pickled with them, it would make snapshots that safe loaders refuse."""
        if not self.compile:
            return
        for module in modules:
            for tensor in list(module.parameters()) + list(module.buffers()):
                for key in [k for k in getattr(tensor, '__dict__', {}) if k.startswith('_dynamo')]:
                    delattr(tensor, key)

    def precision(self, phase):
        """bf16 autocast for `phase` ('generator', 'fake' or 'loss') at this run's amp level."""
        on = self.amp == 'all' or (phase == 'loss' and (self.amp == 'loss' or
            (self.amp == 'nograd' and not self.grad_through_networks)))
        if not on:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def adam(self, params, lr, betas):
        return adam(params, lr, betas, fused=self.fused_optim)

    def update_ema(self, ema, net, cur_nimg, batch_size, halflife_kimg, rampup_ratio):
        update = update_ema_foreach if self.fused_optim else train_utils.update_ema
        update(ema, net, cur_nimg, batch_size, halflife_kimg, rampup_ratio)

    def phase(self, name):
        return self.timer(name) if self.timer is not None else contextlib.nullcontext()

class PhaseTimer:
    """Wall seconds per phase name, one entry per call (synchronising CUDA around each)."""

    def __init__(self, device='cpu'):
        self.device = torch.device(device)
        self.times = {}

    @contextlib.contextmanager
    def __call__(self, name):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times.setdefault(name, []).append(time.perf_counter() - start)

    def _sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

#----------------------------------------------------------------------------
# glibc malloc: the settings the Makefile exports, applied to the running process.

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

def configure_malloc(trim_threshold=17179869184, top_pad=1073741824, mmap_threshold=32 * 2**20):
    """mallopt() the Makefile's MALLOC_*_ settings into this process (glibc only; a no-op
    elsewhere). Large tensors then come from the heap and freed memory stays there, which cuts
    the page faults of a CPU training iteration from ~100k to a few hundred. glibc caps the mmap
    threshold at 32 MiB (it ignores MALLOC_MMAP_THRESHOLD_ above that). Returns what was set."""
    name = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = {}
    for key, param, value in (('trim_threshold', M_TRIM_THRESHOLD, trim_threshold),
            ('top_pad', M_TOP_PAD, top_pad), ('mmap_threshold', M_MMAP_THRESHOLD, mmap_threshold)):
        if value is not None and mallopt(param, min(int(value), 2**31 - 1)) == 1:
            done[key] = min(int(value), 2**31 - 1)
    return done
