"""EDM2's magnitude-preserving UNet and its preconditioner, written from the paper.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models": every
layer keeps unit-variance activations at unit variance (magnitude-preserving convolutions with
forced weight normalisation, MP-SiLU, MP-sum, MP-concatenation, cosine-attention), there are no
biases and no normalisation layers with parameters, and a learned log-variance u(sigma) weights
the loss by noise level.

The class names, constructor keywords, attribute names and parameter names are those of NVlabs'
EDM2 code base, so that its snapshot pickles (`ema`, float16) load into these classes, through
`torch_utils.safe_pickle` without running any of their code, and pickles written here load there:
  Precond(img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5,
          logvar_channels=128, **unet_kwargs)
  net(x, sigma, class_labels=None, force_fp32=False, return_logvar=False) -> D(x; sigma)
                                                                            [, logvar]
Like every file that ends up inside pickles, this one imports only numpy, torch and
`torch_utils.persistence` (NVlabs' loader executes it against its own torch_utils).
"""

import math

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------
# Magnitude-preserving operations.

def normalize(x, dim=None, eps=1e-4):
    """x / (eps + rms(x)) over `dim` (default: all axes but the first); the norm in float32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel()) # eps + rms
    return x / norm.to(x.dtype)

def mp_silu(x):
    """SiLU rescaled to keep a unit-variance Gaussian input at unit variance."""
    return torch.nn.functional.silu(x) / 0.596

def mp_sum(a, b, t=0.5):
    """(1-t) a + t b, rescaled so that uncorrelated unit-variance inputs give unit variance."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)

def mp_cat(a, b, dim=1, t=0.5):
    """Concatenation along `dim` with a's and b's contributions balanced by t, unit variance."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    wa = C / math.sqrt(Na) * (1 - t)
    wb = C / math.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)

def resample(x, f=(1, 1), mode='keep'):
    """Depthwise 2x down- or upsampling with the separable filter f (normalised to sum 1).

    With f = [1, 1]: 'down' is 2x2 average pooling, 'up' nearest-neighbour doubling.
    """
    if mode == 'keep':
        return x
    f = np.asarray(f, dtype=np.float32)
    assert f.ndim == 1 and len(f) % 2 == 0, 'resample filter must be 1-D of even length'
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    kernel = torch.as_tensor(np.outer(f, f)[None, None], dtype=x.dtype, device=x.device)
    channels = x.shape[1]
    if mode == 'down':
        return torch.nn.functional.conv2d(x, kernel.tile([channels, 1, 1, 1]), groups=channels,
            stride=2, padding=(pad,))
    assert mode == 'up', f'unknown resample mode {mode!r}'
    return torch.nn.functional.conv_transpose2d(x, (kernel * 4).tile([channels, 1, 1, 1]),
        groups=channels, stride=2, padding=(pad,))

#----------------------------------------------------------------------------
# Layers.

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Random Fourier features sqrt(2) cos(omega_j s + phi_j) of a scalar s, unit variance."""
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32)
        y = y.ger(self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        y = y.cos() * np.sqrt(2)
        return y.to(x.dtype)

@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Bias-free convolution (kernel [kh, kw]) or dense layer (kernel []) whose weight rows are
    normalised to unit norm on every use; in training mode the stored weight is also replaced by
    its normalised self first ("forced weight normalisation"), so it cannot grow.
    """
    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w)) # a float32 w is the parameter itself
        w = normalize(w)
        if isinstance(gain, torch.Tensor):
            gain = gain.to(torch.float32) # a float16 gain (snapshot) is not divided in float16
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        assert w.ndim == 4
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-2] // 2, w.shape[-1] // 2))

@persistence.persistent_class
class Block(torch.nn.Module):
    """A residual UNet block: optional resampling, two 3x3 MPConvs modulated by the embedding,
    a magnitude-preserving residual sum, and optional cosine self-attention.

    'enc' blocks first project the input to out_channels (1x1) and pixel-normalise it; 'dec'
    blocks convolve the raw input and project the skip path only when the widths differ.
    """
    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
            resample_filter=[1, 1], attention=False, channels_per_head=64, dropout=0, res_balance=0.3,
            attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads != 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads != 0 else None

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1) # pixel norm

        # Residual branch, modulated per channel by 1 + (linear map of the embedding).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads != 0:
            # Output channel (h*c + j)*3 + s of attn_qkv is part s (q, k, v) of channel j of head h.
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3) # unit RMS over each head's channels
            w = torch.einsum('nhcq,nhck->nhqk', q, k / np.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum('nhqk,nhck->nhcq', w, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

#----------------------------------------------------------------------------
# The UNet.

@persistence.persistent_class
class UNet(torch.nn.Module):
    """EDM2's UNet: level l has model_channels * channel_mult[l] channels at img_resolution >> l,
    num_blocks encoder blocks and num_blocks + 1 decoder blocks per level (each decoder block
    takes one skip by MP-concatenation), attention at `attn_resolutions` and in the bottleneck.
    Keywords it does not take go to every Block.
    """
    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192,
            channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None, num_blocks=3,
            attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding of the noise level and the class.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder; the input gets a constant channel of ones.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_conv'] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f'{res}x{res}_down'] = Block(cout, cout, cemb, flavor='enc', resample_mode='down', **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='enc',
                    attention=(res in attn_resolutions), **block_kwargs)

        # Decoder: every decoder block consumes one encoder output (last in, first out).
        self.dec = torch.nn.ModuleDict()
        skips = [module.out_channels for module in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = Block(cout, cout, cemb, flavor='dec', attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = Block(cout, cout, cemb, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = Block(cout, cout, cemb, flavor='dec', resample_mode='up', **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='dec',
                    attention=(res in attn_resolutions), **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for module in self.enc.values():
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        for name, module in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)

#----------------------------------------------------------------------------
# The preconditioner.

@persistence.persistent_class
class Precond(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels), with EDM's weights
    c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sd^2+sigma^2)
    and c_noise = ln(sigma)/4, plus the learned log-variance u(sigma) of the loss weighting
    (`return_logvar=True`). Computes in float16 only on CUDA with use_fp16; else float32.
    """
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5,
            logvar_channels=128, **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x

#----------------------------------------------------------------------------
# The training loss (EDM2Loss of NVlabs' training loop): kept so that snapshots written here
# have the same entries as theirs.

@persistence.persistent_class
class EDM2Loss:
    """Per-element loss lambda(sigma)/e^u (D - y)^2 + u with ln sigma ~ N(P_mean, P_std^2),
    lambda = (sigma^2 + sd^2)/(sigma sd)^2 and u the network's log-variance (paper eq. 21)."""
    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn_like(images) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar

#----------------------------------------------------------------------------
