"""EDM denoiser networks: the DDPM++/NCSN++ UNet (SongUNet), the ADM UNet (DhariwalUNet) and the
four preconditioners of Karras et al. 2022 (VP, VE, iDDPM, EDM).

Class names, constructor arguments, attribute paths and the call
`net(x, sigma, class_labels=None, force_fp32=False, augment_labels=None)` follow the NVlabs EDM
networks, so that their pickles load into these classes and ours load into their code.

This file is embedded in every pickle it produces and must run inside NVlabs code bases too:
it may import only numpy, torch and `torch_utils.persistence`, and its attributes hold only
Python numbers (never numpy scalars, whose pickled names differ between numpy 1 and 2).
"""

import math

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

#----------------------------------------------------------------------------
# How the layers compute, not what: process-wide settings that change speed and rounding (or,
# for dropout, the random stream), never the model, and are never pickled.
#   attention      'sdpa': torch's fused scaled_dot_product_attention (where it exists);
#                  'matmul': NVlabs' explicit product and float32 softmax; 'auto': sdpa on
#                  GPUs, matmul on CPUs.
#   dropout        'uniform': keep where a 16-bit uniform draw >= p; 'bernoulli': F.dropout.
#   channels_last  run the UNets in NHWC layout (oneDNN/cuDNN convolutions without reorders);
#                  'auto': on CPUs where the fused_norm kernel runs (torch's own CPU GroupNorm
#                  is slow in NHWC). The UNets' outputs are NCHW either way.
#   recompute      GroupNorm-SiLU-(dropout-)convolution chains keep only their input for the
#                  backward pass and recompute the rest there: the same kernels, so the same
#                  values and gradients bit for bit, with ~half the activation memory.
#   fused_norm     run those chains' GroupNorm, SiLU and dropout as one compiled CPU kernel
#                  (torch_utils.ops.norm_act) that reads and writes the convolutions' dtype
#                  (bfloat16 under autocast: no float32 copies in between); float32 rounding.
#                  Where this file runs without that module (NVlabs code bases), torch's ops.
# The defaults are the fastest on the CPUs and GPUs measured (docs/performance.md);
# set_implementation(attention='matmul', dropout='bernoulli', channels_last=False, fused_norm=False)
# computes exactly as NVlabs EDM.

IMPLEMENTATION = dict(attention='auto', dropout='uniform', channels_last='auto', recompute=True, fused_norm=True)
_CHOICES = dict(attention=('auto', 'sdpa', 'matmul'), dropout=('uniform', 'bernoulli'), channels_last=('auto', False, True),
    recompute=(True, False), fused_norm=(True, False))

def set_implementation(**kwargs):
    """Change IMPLEMENTATION entries (None leaves one as it is); returns the previous settings."""
    previous = dict(IMPLEMENTATION)
    for key, value in kwargs.items():
        if key not in _CHOICES:
            raise ValueError(f"unknown implementation setting '{key}' (choose from {', '.join(_CHOICES)})")
        if value is not None:
            if value not in _CHOICES[key]:
                raise ValueError(f'{key} must be one of {_CHOICES[key]}, got {value!r}')
            IMPLEMENTATION[key] = value
    return previous

#----------------------------------------------------------------------------
# Weight initialisation: uniform or normal, scaled by fan-in (Kaiming) or fan-in + fan-out (Xavier).

def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'invalid init mode "{mode}"')

#----------------------------------------------------------------------------
# Layers.

@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal',
            init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x

@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """Convolution with optional 2x up/down-sampling by a separable FIR filter.

    `kernel=0` gives a pure resampling layer without weights.
    """
    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
            resample_filter=[1,1], fused_resample=False, init_mode='kaiming_normal',
            init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels*kernel*kernel, fan_out=out_channels*kernel*kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv2d = torch.nn.functional.conv2d
        conv_transpose2d = torch.nn.functional.conv_transpose2d

        if self.fused_resample and self.up and w is not None:
            # Upsample (a depthwise transposed conv with the filter x4) with both kernels'
            # padding folded in, then an unpadded convolution.
            x = conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]),
                groups=self.in_channels, stride=2, padding=w_pad + f_pad)
            x = conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            # Convolve with the padding of both kernels, then filter and decimate.
            x = conv2d(x, w, padding=w_pad + f_pad)
            x = conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]),
                    groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = conv2d(x, f.tile([self.in_channels, 1, 1, 1]),
                    groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x

@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalisation whose group count shrinks so that each group has enough channels."""
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups,
            weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

def attention_weights(q, k):
    """softmax_k(q·k / sqrt(C)) over [N, C, Q] x [N, C, K] -> [N, Q, K], computed in float32."""
    scaled_k = k / math.sqrt(k.shape[1])
    logits = torch.einsum('ncq,nck->nqk', q.to(torch.float32), scaled_k.to(torch.float32))
    return logits.softmax(dim=2).to(q.dtype)

def attend(q, k, v):
    """softmax_k(q·k / sqrt(C)) applied to v, over [N, C, L] tensors -> [N, C, Q].

    'sdpa': torch's fused scaled_dot_product_attention (no [N, Q, K] matrix is kept for the
    backward pass); 'matmul': NVlabs' explicit product and float32 softmax; 'auto': sdpa on
    GPUs, matmul on CPUs (where MKL's batched products beat the fused kernel in float32)."""
    impl = IMPLEMENTATION['attention']
    if impl == 'auto':
        impl = 'sdpa' if q.device.type == 'cuda' else 'matmul'
    sdpa = getattr(torch.nn.functional, 'scaled_dot_product_attention', None)
    if impl == 'sdpa' and sdpa is not None:
        return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return torch.einsum('nqk,nck->ncq', attention_weights(q, k), v)

def dropout_keep_mask(shape, p, device):
    """Where to keep activations: 16-bit uniform integers (four per 64-bit draw) >= p * 2^16.
    The drop rate is p rounded to a multiple of 2^-16 (0.13 -> 0.1300049); returns the mask and
    that rate."""
    threshold = int(round(p * 65536))
    n = math.prod(shape)
    words = torch.empty([(n + 3) // 4], dtype=torch.int64, device=device).random_(-2**63, 2**63 - 1)
    keep = words.view(torch.int16)[:n].view(shape) >= threshold - 32768
    return keep, threshold / 65536

def _is_channels_last(x):
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)

def _in_layout(x, nhwc):
    """x in NHWC if nhwc: where an op's output takes another layout than the UNet's (the first
    convolution of a one-channel image, whose [N, 1, H, W] input is NCHW and NHWC at once;
    addcmul with an [N, C, 1, 1] first operand)."""
    return x.contiguous(memory_format=torch.channels_last) if nhwc and not _is_channels_last(x) else x

def _keep_mask_like(x, p):
    """dropout_keep_mask for x, drawn in x's memory order (so in x's layout)."""
    if _is_channels_last(x):
        N, C, H, W = x.shape
        keep, rate = dropout_keep_mask([N, H, W, C], p, x.device)
        return keep.permute(0, 3, 1, 2), rate
    return dropout_keep_mask(x.shape, p, x.device)

def apply_dropout(x, p, training):
    """torch.nn.functional.dropout ('bernoulli'), or ('uniform') the same with a mask from
    dropout_keep_mask: a few times cheaper to draw on CPUs, a different random stream."""
    if IMPLEMENTATION['dropout'] != 'uniform' or not training or p == 0 or p == 1:
        return torch.nn.functional.dropout(x, p=p, training=training)
    keep, rate = _keep_mask_like(x, p)
    if rate >= 1:
        return x * 0
    return torch.where(keep, x * (1 / (1 - rate)), 0)

class _NormActConv(torch.autograd.Function):
    """conv(drop(act(group_norm(x)))) without bias, saving x, the statistics and the dropout mask
    only; the backward pass recomputes the normalised and activated tensors from them and calls
    the kernels autograd would call, in the same order, so that results are bit-identical."""

    @staticmethod
    def forward(ctx, x, gn_weight, gn_bias, conv_weight, num_groups, eps, act, keep, scale, padding): # pylint: disable=arguments-differ
        N, C = x.shape[0], x.shape[1]
        HxW = x.numel() // (N * C)
        h, mean, rstd = torch.native_group_norm(x, gn_weight, gn_bias, N, C, HxW, num_groups, eps)
        if act:
            h = silu(h)
        if keep is not None:
            h = torch.where(keep, h * scale, 0)
        ctx.save_for_backward(x, gn_weight, gn_bias, conv_weight, mean, rstd, keep)
        ctx.config = (N, C, HxW, num_groups, eps, act, scale, padding)
        return torch.nn.functional.conv2d(h, conv_weight, padding=padding)

    @staticmethod
    def backward(ctx, grad): # pylint: disable=arguments-differ
        x, gn_weight, gn_bias, conv_weight, mean, rstd, keep = ctx.saved_tensors
        N, C, HxW, num_groups, eps, act, scale, padding = ctx.config
        need_x, need_gw, need_gb, need_cw = ctx.needs_input_grad[:4]
        with torch.no_grad():
            a = torch.native_group_norm(x, gn_weight, gn_bias, N, C, HxW, num_groups, eps)[0]
            h = silu(a) if act else a
            if keep is not None:
                h = torch.where(keep, h * scale, 0)
            grad_h, grad_cw, _ = torch.ops.aten.convolution_backward(grad, h, conv_weight, None,
                [1, 1], [padding, padding], [1, 1], False, [0, 0], 1, [need_x or need_gw or need_gb, need_cw, False])
            del h
            grad_x = grad_gw = grad_gb = None
            if need_x or need_gw or need_gb:
                if keep is not None:
                    grad_h = torch.where(keep, grad_h, 0) * scale
                if act:
                    grad_h = torch.ops.aten.silu_backward(grad_h, a)
                grad_x, grad_gw, grad_gb = torch.ops.aten.native_group_norm_backward(grad_h, x, mean, rstd,
                    gn_weight, N, C, HxW, num_groups, [need_x, need_gw, need_gb])
        return grad_x, grad_gw, grad_gb, grad_cw, None, None, None, None, None, None

def _plain_conv(conv):
    """A weighted 'same' convolution without resampling (one aten convolution)."""
    return conv.weight is not None and not conv.up and not conv.down and conv.weight.shape[-1] % 2 == 1

def _mask_drawn_apart(dropout, training):
    """Whether the chain's dropout mask (if any) can be drawn apart from its output: F.dropout's
    stream cannot, the 'uniform' mask can (unless p rounds to 1)."""
    return not (training and dropout) or (IMPLEMENTATION['dropout'] == 'uniform' and round(dropout * 65536) < 65536)

def _recomputable(norm, conv, x, dropout, training):
    if not (IMPLEMENTATION['recompute'] and torch.is_grad_enabled() and x.is_contiguous()):
        return False
    if not (x.requires_grad or norm.weight.requires_grad or conv.weight.requires_grad):
        return False # no graph to keep
    if not _plain_conv(conv):
        return False
    if not _mask_drawn_apart(dropout, training):
        return False
    if not hasattr(torch.ops.aten, 'convolution_backward') or _autocast_enabled(x.device.type):
        return False
    return not _compiling()

_NORM_ACT_MODULE = []

def _norm_act_module():
    """torch_utils.ops.norm_act, or None where this file runs without it (NVlabs code bases)."""
    if not _NORM_ACT_MODULE:
        try:
            from torch_utils.ops import norm_act as module # pylint: disable=import-outside-toplevel
        except ImportError:
            module = None
        _NORM_ACT_MODULE.append(module)
    return _NORM_ACT_MODULE[0]

def _use_channels_last(x):
    """IMPLEMENTATION['channels_last'] for a UNet input x ('auto' resolved)."""
    choice = IMPLEMENTATION['channels_last']
    if choice != 'auto':
        return choice
    if not IMPLEMENTATION['fused_norm'] or x.device.type != 'cpu' or _compiling():
        return False
    module = _norm_act_module()
    return module is not None and module.plugin_ready()

def _compiling():
    is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', None)
    return is_compiling is not None and is_compiling()

def _compute_dtype(x):
    if _autocast_enabled(x.device.type):
        get = getattr(torch, 'get_autocast_dtype', None)
        if get is not None:
            return get(x.device.type)
        return torch.get_autocast_cpu_dtype() if x.device.type == 'cpu' else torch.get_autocast_gpu_dtype()
    return x.dtype

def _fused_norm_kernel(x, dropout, training, dtype):
    """The norm_act module if the chain's normalisation can run on its kernel, else None."""
    if not IMPLEMENTATION['fused_norm'] or x.device.type != 'cpu':
        return None
    if not _mask_drawn_apart(dropout, training):
        return None
    module = _norm_act_module()
    return module if module is not None and module.available(x, dtype) else None

def norm_act_conv(norm, conv, x, act=True, dropout=None, training=False):
    """conv(dropout(silu(norm(x)))) (no silu unless act; no dropout call if dropout is None),
    by the fused kernel (IMPLEMENTATION['fused_norm']) or by _NormActConv
    (IMPLEMENTATION['recompute']) where they apply."""
    dtype = _compute_dtype(x)
    kernel = _fused_norm_kernel(x, dropout, training, dtype)
    if kernel is not None:
        keep, scale = None, 1.0
        if training and dropout:
            keep, rate = _keep_mask_like(x, dropout)
            scale = 1 / (1 - rate)
        if not _plain_conv(conv):
            return conv(kernel.norm_act(x, norm.weight, norm.bias, norm.num_groups, norm.eps, act, keep, scale, dtype))
        # The bias goes into the convolution (its gradient is then the convolution's too).
        w, padding = conv.weight.to(dtype), conv.weight.shape[-1] // 2
        b = conv.bias.to(dtype) if conv.bias is not None else None
        if IMPLEMENTATION['recompute']:
            return kernel.norm_act_conv(x, norm.weight, norm.bias, w, b, norm.num_groups, norm.eps, act, keep, scale,
                padding)
        h = kernel.norm_act(x, norm.weight, norm.bias, norm.num_groups, norm.eps, act, keep, scale, dtype)
        return torch.nn.functional.conv2d(h, w, b, padding=padding)
    if not _recomputable(norm, conv, x, dropout, training):
        h = norm(x)
        if act:
            h = silu(h)
        if dropout is not None:
            h = apply_dropout(h, p=dropout, training=training)
        return conv(h)
    keep, scale = None, 1.0
    if training and dropout:
        keep, rate = dropout_keep_mask(x.shape, dropout, x.device)
        scale = 1 / (1 - rate)
    y = _NormActConv.apply(x, norm.weight.to(x.dtype), norm.bias.to(x.dtype), conv.weight.to(x.dtype),
        norm.num_groups, norm.eps, act, keep, scale, conv.weight.shape[-1] // 2)
    if conv.bias is not None:
        y = y.add_(conv.bias.to(x.dtype).reshape(1, -1, 1, 1))
    return y

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual block: GroupNorm-SiLU-Conv twice, conditioned on the embedding by a per-channel
    shift (or scale and shift), with an optional up/down-sampling and self-attention."""
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False,
            attention=False, num_heads=None, channels_per_head=64, dropout=0, skip_scale=1,
            eps=1e-5, resample_filter=[1,1], resample_proj=False, adaptive_scale=True,
            init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3,
            up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels,
            out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel,
                up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels*3, kernel=1,
                **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = norm_act_conv(self.norm0, self.conv0, x)

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            # addcmul's output takes shift's layout ([N, C, 1, 1]: NCHW); keep x's.
            x = silu(_in_layout(torch.addcmul(shift, self.norm1(x), scale + 1), _is_channels_last(x)))
            x = self.conv1(apply_dropout(x, p=self.dropout, training=self.training))
        else:
            x = norm_act_conv(self.norm1, self.conv1, x.add_(params), dropout=self.dropout, training=self.training)
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            heads = x.shape[0] * self.num_heads
            qkv = norm_act_conv(self.norm2, self.qkv, x, act=False)
            q, k, v = qkv.reshape(heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
            a = attend(q, k, v).reshape(*x.shape)
            if _is_channels_last(x):
                a = a.contiguous(memory_format=torch.channels_last) # keep the layout past the attention
            x = self.proj(a).add_(x)
            x = x * self.skip_scale
        return x

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding of a scalar: [cos(x f_i), sin(x f_i)]."""
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of a scalar (NCSN++), frequencies fixed at construction."""
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

def _drop_labels(class_labels, p, batch_size, training):
    """Zero whole label vectors with probability p during training (classifier-free guidance)."""
    if not (training and p):
        return class_labels
    keep = torch.rand([batch_size, 1], device=class_labels.device) >= p
    return class_labels * keep.to(class_labels.dtype)

#----------------------------------------------------------------------------
# UNets.

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """The DDPM++ (positional embedding, standard encoder/decoder) and NCSN++ (Fourier
    embedding, residual encoder, skip decoder, [1,3,3,1] filter) UNets of Song et al. 2021."""
    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Number of color channels at input.
        out_channels,                       # Number of color channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.
        model_channels      = 128,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,2,2],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 4,            # Number of residual blocks per resolution.
        attn_resolutions    = [16],         # List of resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels.
        embedding_type      = 'positional', # Timestep embedding: 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise  = 1,            # Timestep embedding size: 1 (DDPM++) or 2 (NCSN++).
        encoder_type        = 'standard',   # Encoder: 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
        decoder_type        = 'standard',   # Decoder: 'standard' (DDPM++) or 'skip' (NCSN++).
        resample_filter     = [1,1],        # Resampling filter: [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
    ):
        assert embedding_type in ['fourier', 'positional']
        assert encoder_type in ['standard', 'skip', 'residual']
        assert decoder_type in ['standard', 'skip']
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout,
            skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
            resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero,
            init_attn=init_attn)

        # Noise-level (and label, augmentation) embedding.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0,
                        down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3,
                        down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                attn = (res in attn_resolutions)
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                    attention=attn, **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                    attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels,
                        kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        nhwc = _use_channels_last(x)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last) # convolutions follow their input
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape) # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            tmp = _drop_labels(class_labels, self.label_dropout, x.shape[0], self.training)
            emb = emb + self.map_label(tmp * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Encoder: 'aux' layers carry the downsampled input image beside the main path (NCSN++).
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else _in_layout(block(x), nhwc)
                skips.append(x)

        # Decoder: 'aux' layers produce the output image, summed over resolutions if 'skip'.
        aux = None
        tmp = norm = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                norm = block
            elif 'aux_conv' in name:
                tmp = norm_act_conv(norm, block, x)
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux.contiguous() if nhwc else aux

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """The ADM UNet of Dhariwal & Nichol 2021."""
    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Number of color channels at input.
        out_channels,                       # Number of color channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.
        model_channels      = 192,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,3,4],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 3,            # Number of residual blocks per resolution.
        attn_resolutions    = [32,16,8],    # List of resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels.
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1/3), init_bias=math.sqrt(1/3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
            init=init, init_zero=init_zero)

        # Noise-level, augmentation and label embedding.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False,
            init_mode='kaiming_normal', init_weight=math.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                    attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                    attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        nhwc = _use_channels_last(x)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last) # convolutions follow their input
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            tmp = _drop_labels(class_labels, self.label_dropout, x.shape[0], self.training)
            emb = emb + self.map_label(tmp)
        emb = silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else _in_layout(block(x), nhwc)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        x = norm_act_conv(self.out_norm, self.out_conv, x)
        return x.contiguous() if nhwc else x

_UNETS = dict(SongUNet=SongUNet, DhariwalUNet=DhariwalUNet)

#----------------------------------------------------------------------------
# Preconditioners: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), the denoiser in the VE
# convention x_noisy = x + sigma * n, whatever process the inner network was trained for.

def _autocast_enabled(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError: # torch < 2.4
        return torch.is_autocast_enabled() if device_type == 'cuda' else torch.is_autocast_cpu_enabled()

class _Precond(torch.nn.Module):
    """What the four preconditioners share: input handling and the output combination."""
    def _init_common(self, img_resolution, img_channels, label_dim, use_fp16, model_type,
            out_channels, model_kwargs):
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = _UNETS[model_type](img_resolution=img_resolution, in_channels=img_channels,
            out_channels=out_channels, label_dim=label_dim, **model_kwargs)

    def _prepare(self, x, sigma, class_labels, force_fp32):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == 'cuda'
        return x, sigma, class_labels, (torch.float16 if fp16 else torch.float32)

    def _run_model(self, x, c_in, c_noise, class_labels, dtype, model_kwargs):
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype or _autocast_enabled(x.device.type) # autocast: the caller's choice
        return F_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

@persistence.persistent_class
class VPPrecond(_Precond):
    """Variance-preserving (DDPM++) preconditioning, Song et al. 2021."""
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Execute the underlying model at FP16 precision?
        beta_d          = 19.9,         # Extent of the noise level schedule.
        beta_min        = 0.1,          # Initial slope of the noise level schedule.
        M               = 1000,         # Original number of timesteps in the DDPM formulation.
        epsilon_t       = 1e-5,         # Minimum t-value used during training.
        model_type      = 'SongUNet',   # Class name of the underlying model.
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self._init_common(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        F_x = self._run_model(x, c_in, c_noise, class_labels, dtype, model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def sigma(self, t):
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

@persistence.persistent_class
class VEPrecond(_Precond):
    """Variance-exploding (NCSN++) preconditioning, Song et al. 2021."""
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Execute the underlying model at FP16 precision?
        sigma_min       = 0.02,         # Minimum supported noise level.
        sigma_max       = 100,          # Maximum supported noise level.
        model_type      = 'SongUNet',   # Class name of the underlying model.
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._init_common(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        F_x = self._run_model(x, c_in, c_noise, class_labels, dtype, model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

@persistence.persistent_class
class iDDPMPrecond(_Precond):
    """Improved-DDPM (ADM) preconditioning, Nichol & Dhariwal 2021: a discrete set of noise
    levels u_0 > ... > u_M = 0, and an inner network that also predicts variances (ignored)."""
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Execute the underlying model at FP16 precision?
        C_1             = 0.001,        # Timestep adjustment at low noise levels.
        C_2             = 0.008,        # Timestep adjustment at high noise levels.
        M               = 1000,         # Original number of timesteps in the DDPM formulation.
        model_type      = 'DhariwalUNet', # Class name of the underlying model.
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self._init_common(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels * 2, model_kwargs)
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1): # u_{j-1} from u_j, per the iDDPM cosine schedule
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        F_x = self._run_model(x, c_in, c_noise, class_labels, dtype, model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def alpha_bar(self, j):
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """Snap each sigma to the nearest supported level u_j (or return j)."""
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

@persistence.persistent_class
class EDMPrecond(_Precond):
    """The preconditioning of Karras et al. 2022 (EDM)."""
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Execute the underlying model at FP16 precision?
        sigma_min       = 0,            # Minimum supported noise level.
        sigma_max       = float('inf'), # Maximum supported noise level.
        sigma_data      = 0.5,          # Expected standard deviation of the training data.
        model_type      = 'DhariwalUNet', # Class name of the underlying model.
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self._init_common(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self._run_model(x, c_in, c_noise, class_labels, dtype, model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)
