"""StyleGAN3 generator (Karras et al. 2021, "Alias-Free Generative Adversarial Networks"),
configs stylegan3-t and stylegan3-r, written for this toolkit.

Class names, constructor arguments, attribute paths (hence state_dict keys) and call conventions
follow the public NVlabs StyleGAN3 `training/networks_stylegan3.py` interface, so that their
pickles rebuild into these classes (`torch_utils.safe_pickle`) and pickles of these classes load
in their code base. StyleGAN3 snapshots keep their discriminator in `networks_stylegan2.py`.

The network, in short:
  * mapping: z (and an embedded c) -> w through `num_layers` lrelu layers; w_avg for truncation;
  * `SynthesisInput`: Fourier features of random frequencies inside a disc of radius
    `bandwidth`, rotated and translated per sample by an affine map of w and by the user's
    `transform` buffer (the inverse of the wanted image transform);
  * `SynthesisLayer`s: modulated convolution of the input scaled by 1/sqrt(magnitude_ema),
    then bias, upsampling by `up_factor`, leaky ReLU at the high rate, downsampling by
    `down_factor` (filtered_lrelu); the filters are Kaiser-windowed low-passes designed from the
    layer's cutoff and transition band (jinc-based radial down filters for stylegan3-r);
  * the cutoff, stopband and sampling rate of each layer follow a geometric schedule from
    `first_cutoff`/`first_stopband` to the output's Nyquist rate, reached `num_critical`
    layers before the end.

This file is embedded in every pickle it produces and must run inside NVlabs code bases too:
it imports only numpy, scipy (filter design, at construction), torch and `torch_utils`
(misc, persistence, ops), and its attributes hold only Python numbers and lists (never numpy
scalars or arrays, whose pickled names differ between numpy 1 and 2).
"""

import math

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence
from torch_utils.ops import bias_act
from torch_utils.ops import conv2d_gradfix
from torch_utils.ops import filtered_lrelu

#----------------------------------------------------------------------------
# Functions.

@misc.profiled_function
def normalize_2nd_moment(x, dim=1, eps=1e-8):
    """Scale `x` so that its mean square along `dim` is one."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()

@misc.profiled_function
def modulated_conv2d(
    x,                  # Input activations [N, I, H, W].
    w,                  # Shared weights [O, I, kh, kw].
    s,                  # Per-sample input-channel scales [N, I].
    demodulate  = True, # Normalise each output channel's modulated weights?
    padding     = 0,    # Zero padding on each side.
    input_gain  = None, # Scale of the input (0-d tensor), applied after demodulation.
):
    """StyleGAN3's modulated convolution: per-sample kernels w * s[n], demodulated, times the
    input gain (after demodulation, so it is not cancelled), as one grouped correlation."""
    with misc.suppress_tracer_warnings():
        batch_size = int(x.shape[0])
    out_channels, in_channels, kh, kw = w.shape
    misc.assert_shape(w, [out_channels, in_channels, kh, kw])
    misc.assert_shape(x, [batch_size, in_channels, None, None])
    misc.assert_shape(s, [batch_size, in_channels])

    # Bring weights and styles to unit RMS first, so the products stay in range in fp16;
    # demodulation removes these scales again.
    if demodulate:
        w = w * w.square().mean([1, 2, 3], keepdim=True).rsqrt()
        s = s * s.square().mean().rsqrt()

    w = w.unsqueeze(0) * s.unsqueeze(1).unsqueeze(3).unsqueeze(4) # [N, O, I, kh, kw]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt() # [N, O]
        w = w * dcoefs.unsqueeze(2).unsqueeze(3).unsqueeze(4)
    if input_gain is not None:
        w = w * input_gain

    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_gradfix.conv2d(input=x, weight=w.to(x.dtype), padding=padding, groups=batch_size)
    return x.reshape(batch_size, -1, *x.shape[2:])

def design_lowpass_filter(numtaps, cutoff, width, fs, radial=False):
    """Kaiser-windowed low-pass FIR filter (float32), or None for a single tap (identity).

    Separable: scipy's firwin, i.e. the ideal response 2(fc/fs) sinc(2(fc/fs)(n - (T-1)/2))
    under a Kaiser window whose beta gives the attenuation implied by the transition `width`,
    normalised to unit DC gain; a 1-D [T] tensor. Radial: the jinc J1(2 pi fc r) / (pi r) on the
    T x T grid of tap positions under the outer product of two such windows; a [T, T] tensor.
    """
    assert numtaps >= 1
    if numtaps == 1:
        return None
    import scipy.signal # pylint: disable=import-outside-toplevel (only needed at construction)
    if not radial:
        f = scipy.signal.firwin(numtaps=numtaps, cutoff=cutoff, width=width, fs=fs)
        return torch.as_tensor(f, dtype=torch.float32)
    import scipy.special # pylint: disable=import-outside-toplevel
    x = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
    r = np.hypot(*np.meshgrid(x, x))
    f = scipy.special.j1(2 * np.pi * cutoff * r) / (np.pi * r)
    beta = scipy.signal.kaiser_beta(scipy.signal.kaiser_atten(numtaps, width / (fs / 2)))
    window = np.kaiser(numtaps, beta)
    f = f * np.outer(window, window)
    f = f / np.sum(f)
    return torch.as_tensor(f, dtype=torch.float32)

def _pair(size):
    """An int or [width, height] as a list of two Python ints."""
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    size = list(size) if isinstance(size, (list, tuple, np.ndarray)) else [size, size]
    if len(size) != 2:
        raise ValueError(f'a size must be an int or [width, height], got {size}')
    return [int(v) for v in size]

#----------------------------------------------------------------------------
# Layers with equalized learning rate: weights are stored N(0,1) * weight_init / lr_multiplier
# and scaled by lr_multiplier / sqrt(fan_in) at run time.

@persistence.persistent_class
class FullyConnectedLayer(torch.nn.Module):
    def __init__(self,
        in_features,                # Number of input features.
        out_features,               # Number of output features.
        activation      = 'linear', # Activation name (see bias_act.activation_funcs).
        bias            = True,     # Learn a bias?
        lr_multiplier   = 1,        # Learning-rate multiplier.
        weight_init     = 1,        # Initial standard deviation of the (effective) weight.
        bias_init       = 0,        # Initial bias: a number or one value per output.
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) * (weight_init / lr_multiplier))
        bias_init = torch.as_tensor(bias_init, dtype=torch.float32).expand([out_features])
        self.bias = torch.nn.Parameter(bias_init / lr_multiplier) if bias else None
        self.weight_gain = float(lr_multiplier) / math.sqrt(in_features)
        self.bias_gain = float(lr_multiplier)

    def forward(self, x):
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == 'linear' and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        x = x.matmul(w.t())
        return bias_act.bias_act(x, b, act=self.activation)

    def extra_repr(self):
        return f'in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}'

#----------------------------------------------------------------------------
# Mapping network z, c -> w.

@persistence.persistent_class
class MappingNetwork(torch.nn.Module):
    def __init__(self,
        z_dim,                      # Latent size.
        c_dim,                      # Conditioning label size (0: none).
        w_dim,                      # Output size.
        num_ws,                     # Number of ws to broadcast to.
        num_layers      = 2,        # Number of fully connected layers.
        lr_multiplier   = 0.01,     # Learning-rate multiplier of the layers.
        w_avg_beta      = 0.998,    # Decay of the tracked average w.
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta

        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, w_dim)
        features = [z_dim + (w_dim if c_dim > 0 else 0)] + [w_dim] * num_layers
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation='lrelu',
                lr_multiplier=lr_multiplier)
            setattr(self, f'fc{idx}', layer)
        self.register_buffer('w_avg', torch.zeros([w_dim]))

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        x = None
        if self.z_dim > 0:
            misc.assert_shape(z, [None, self.z_dim])
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            misc.assert_shape(c, [None, self.c_dim])
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y

        for idx in range(self.num_layers):
            x = getattr(self, f'fc{idx}')(x)

        if update_emas:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        # Truncation: move the first `truncation_cutoff` ws (all if None) towards w_avg.
        if truncation_psi != 1:
            x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x

    def extra_repr(self):
        return f'z_dim={self.z_dim:d}, c_dim={self.c_dim:d}, w_dim={self.w_dim:d}, num_ws={self.num_ws:d}'

#----------------------------------------------------------------------------
# Synthesis network.

@persistence.persistent_class
class SynthesisInput(torch.nn.Module):
    def __init__(self,
        w_dim,          # Size of w.
        channels,       # Number of output channels (Fourier features).
        size,           # Output size: int or [width, height].
        sampling_rate,  # Samples per unit length of the output.
        bandwidth,      # Largest frequency of the features.
    ):
        super().__init__()
        self.w_dim = w_dim
        self.channels = int(channels)
        self.size = _pair(size)
        self.sampling_rate = float(sampling_rate)
        self.bandwidth = float(bandwidth)

        # Frequencies from a radially decaying density inside the band; uniform phases.
        freqs = torch.randn([self.channels, 2])
        radii = freqs.square().sum(dim=1, keepdim=True).sqrt()
        freqs = freqs / (radii * radii.square().exp().pow(0.25)) * self.bandwidth
        phases = torch.rand([self.channels]) - 0.5

        self.weight = torch.nn.Parameter(torch.randn([self.channels, self.channels]))
        # Starts at (1, 0, 0, 0) for every w: no rotation, no translation.
        self.affine = FullyConnectedLayer(w_dim, 4, weight_init=0, bias_init=[1, 0, 0, 0])
        self.register_buffer('transform', torch.eye(3, 3)) # The inverse of the output's transform.
        self.register_buffer('freqs', freqs)
        self.register_buffer('phases', phases)

    def forward(self, w):
        batch_size = w.shape[0]
        misc.assert_shape(w, [None, self.w_dim])

        # Per-sample rotation and translation from w, normalised to a pure rotation.
        t = self.affine(w) # [N, 4]: cos, sin, tx, ty (up to scale)
        t = t / t[:, :2].norm(dim=1, keepdim=True)
        m_r = torch.eye(3, device=w.device).unsqueeze(0).repeat([batch_size, 1, 1])
        m_r[:, 0, 0] = t[:, 0]
        m_r[:, 0, 1] = -t[:, 1]
        m_r[:, 1, 0] = t[:, 1]
        m_r[:, 1, 1] = t[:, 0]
        m_t = torch.eye(3, device=w.device).unsqueeze(0).repeat([batch_size, 1, 1])
        m_t[:, 0, 2] = -t[:, 2]
        m_t[:, 1, 2] = -t[:, 3]
        transforms = m_r @ m_t @ self.transform.unsqueeze(0) # [N, 3, 3]

        # Transform the features: the translation moves the phases, the rest the frequencies.
        freqs = self.freqs.unsqueeze(0)                                         # [1, C, 2]
        phases = self.phases.unsqueeze(0) + (freqs @ transforms[:, :2, 2:]).squeeze(2) # [N, C]
        freqs = freqs @ transforms[:, :2, :2]                                   # [N, C, 2]

        # Fade out frequencies that the transform pushed beyond the band.
        amplitudes = (1 - (freqs.norm(dim=2) - self.bandwidth) /
            (self.sampling_rate / 2 - self.bandwidth)).clamp(0, 1)              # [N, C]

        # Pixel centres, centred on 0, in units of 1 / sampling_rate.
        theta = torch.eye(2, 3, device=w.device)
        theta[0, 0] = 0.5 * self.size[0] / self.sampling_rate
        theta[1, 1] = 0.5 * self.size[1] / self.sampling_rate
        grids = torch.nn.functional.affine_grid(theta.unsqueeze(0), [1, 1, self.size[1], self.size[0]],
            align_corners=False)                                                # [1, H, W, 2]

        x = (grids.unsqueeze(3) @ freqs.permute(0, 2, 1).unsqueeze(1).unsqueeze(2)).squeeze(3) # [N, H, W, C]
        x = x + phases.unsqueeze(1).unsqueeze(2)
        x = torch.sin(x * (np.pi * 2)) * amplitudes.unsqueeze(1).unsqueeze(2)

        # Mix the features.
        weight = self.weight / np.sqrt(self.channels)
        x = x @ weight.t()
        x = x.permute(0, 3, 1, 2) # [N, C, H, W]
        misc.assert_shape(x, [batch_size, self.channels, self.size[1], self.size[0]])
        return x

    def extra_repr(self):
        return (f'w_dim={self.w_dim:d}, channels={self.channels:d}, size={self.size}, '
            f'sampling_rate={self.sampling_rate:g}, bandwidth={self.bandwidth:g}')

@persistence.persistent_class
class SynthesisLayer(torch.nn.Module):
    def __init__(self,
        w_dim,                          # Size of w.
        is_torgb,                       # The last layer (to image channels)?
        is_critically_sampled,          # Cutoff at the Nyquist rate (no radial filters)?
        use_fp16,                       # Compute in fp16 on CUDA (unless force_fp32)?
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        in_size,                        # Input size: int or [width, height].
        out_size,                       # Output size: int or [width, height].
        in_sampling_rate,               # Input sampling rate.
        out_sampling_rate,              # Output sampling rate.
        in_cutoff,                      # Input cutoff frequency.
        out_cutoff,                     # Output cutoff frequency.
        in_half_width,                  # Input transition band half-width.
        out_half_width,                 # Output transition band half-width.
        conv_kernel         = 3,        # Convolution kernel size (ToRGB: always 1).
        filter_size         = 6,        # Filter taps per unit of the resampling factor.
        lrelu_upsampling    = 2,        # Factor by which the nonlinearity runs above the rates.
        use_radial_filters  = False,    # Radial down filters in the non-critical layers?
        conv_clamp          = 256,      # Clamp the output to +-conv_clamp (None: off).
        magnitude_ema_beta  = 0.999,    # Decay of the tracked input magnitude.
    ):
        super().__init__()
        self.w_dim = w_dim
        self.is_torgb = bool(is_torgb)
        self.is_critically_sampled = bool(is_critically_sampled)
        self.use_fp16 = bool(use_fp16)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.in_size = _pair(in_size)
        self.out_size = _pair(out_size)
        self.in_sampling_rate = in_sampling_rate
        self.out_sampling_rate = out_sampling_rate
        self.tmp_sampling_rate = max(in_sampling_rate, out_sampling_rate) * (1 if self.is_torgb else lrelu_upsampling)
        self.in_cutoff = float(in_cutoff)
        self.out_cutoff = float(out_cutoff)
        self.in_half_width = float(in_half_width)
        self.out_half_width = float(out_half_width)
        self.conv_kernel = 1 if self.is_torgb else int(conv_kernel)
        self.conv_clamp = conv_clamp
        self.magnitude_ema_beta = magnitude_ema_beta

        self.affine = FullyConnectedLayer(w_dim, self.in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([self.out_channels, self.in_channels, self.conv_kernel, self.conv_kernel]))
        self.bias = torch.nn.Parameter(torch.zeros([self.out_channels]))
        self.register_buffer('magnitude_ema', torch.ones([]))

        # The nonlinearity runs at tmp_sampling_rate: integer resampling factors both ways.
        self.up_factor = int(round(self.tmp_sampling_rate / in_sampling_rate))
        self.down_factor = int(round(self.tmp_sampling_rate / out_sampling_rate))
        if self.up_factor * in_sampling_rate != self.tmp_sampling_rate or \
                self.down_factor * out_sampling_rate != self.tmp_sampling_rate:
            raise ValueError(f'sampling rates {in_sampling_rate} -> {self.tmp_sampling_rate} -> '
                f'{out_sampling_rate} are not integer multiples')
        self.up_taps = filter_size * self.up_factor if self.up_factor > 1 and not self.is_torgb else 1
        self.down_taps = filter_size * self.down_factor if self.down_factor > 1 and not self.is_torgb else 1
        self.down_radial = bool(use_radial_filters and not self.is_critically_sampled)
        self.register_buffer('up_filter', design_lowpass_filter(numtaps=self.up_taps,
            cutoff=self.in_cutoff, width=self.in_half_width * 2, fs=self.tmp_sampling_rate))
        self.register_buffer('down_filter', design_lowpass_filter(numtaps=self.down_taps,
            cutoff=self.out_cutoff, width=self.out_half_width * 2, fs=self.tmp_sampling_rate,
            radial=self.down_radial))

        # Padding (relative to the upsampled image) that maps the convolution's full output,
        # in_size + k - 1, onto out_size after both filters, centred.
        self.padding = []
        for axis in range(2):
            total = (self.out_size[axis] - 1) * self.down_factor + 1
            total -= (self.in_size[axis] + self.conv_kernel - 1) * self.up_factor
            total += self.up_taps + self.down_taps - 2
            lo = (total + self.up_factor) // 2
            self.padding += [lo, total - lo]

    def forward(self, x, w, noise_mode='random', force_fp32=False, update_emas=False):
        del noise_mode # StyleGAN3 has no per-pixel noise; accepted for StyleGAN2-style callers
        misc.assert_shape(x, [None, self.in_channels, self.in_size[1], self.in_size[0]])
        misc.assert_shape(w, [x.shape[0], self.w_dim])

        # Normalise the input by its tracked RMS (in every call, not only while training).
        if update_emas:
            with torch.autograd.profiler.record_function('update_magnitude_ema'):
                magnitude_cur = x.detach().to(torch.float32).square().mean()
                self.magnitude_ema.copy_(magnitude_cur.lerp(self.magnitude_ema, self.magnitude_ema_beta))
        input_gain = self.magnitude_ema.rsqrt()

        styles = self.affine(w)
        if self.is_torgb:
            styles = styles * (1 / math.sqrt(self.in_channels * (self.conv_kernel ** 2)))

        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32
        x = modulated_conv2d(x=x.to(dtype), w=self.weight, s=styles, padding=self.conv_kernel - 1,
            demodulate=(not self.is_torgb), input_gain=input_gain)

        gain = 1 if self.is_torgb else np.sqrt(2)
        slope = 1 if self.is_torgb else 0.2
        x = filtered_lrelu.filtered_lrelu(x=x, fu=self.up_filter, fd=self.down_filter,
            b=self.bias.to(x.dtype), up=self.up_factor, down=self.down_factor, padding=self.padding,
            gain=gain, slope=slope, clamp=self.conv_clamp)

        misc.assert_shape(x, [None, self.out_channels, self.out_size[1], self.out_size[0]])
        assert x.dtype == dtype
        return x

    def extra_repr(self):
        return '\n'.join([
            f'w_dim={self.w_dim:d}, is_torgb={self.is_torgb}, is_critically_sampled={self.is_critically_sampled}, use_fp16={self.use_fp16},',
            f'in_sampling_rate={self.in_sampling_rate:g}, out_sampling_rate={self.out_sampling_rate:g}, tmp_sampling_rate={self.tmp_sampling_rate:g},',
            f'in_cutoff={self.in_cutoff:g}, out_cutoff={self.out_cutoff:g}, in_half_width={self.in_half_width:g}, out_half_width={self.out_half_width:g},',
            f'in_size={self.in_size}, out_size={self.out_size}, in_channels={self.in_channels:d}, out_channels={self.out_channels:d}'])

@persistence.persistent_class
class SynthesisNetwork(torch.nn.Module):
    def __init__(self,
        w_dim,                          # Size of w.
        img_resolution,                 # Output resolution.
        img_channels,                   # Output channels.
        channel_base        = 32768,    # Channels of a layer: min(channel_base / 2 / cutoff, channel_max).
        channel_max         = 512,      # Maximum channels in any layer.
        num_layers          = 14,       # Number of layers, ToRGB not counted.
        num_critical        = 2,        # Number of critically sampled layers at the end.
        first_cutoff        = 2,        # Cutoff of the first layer.
        first_stopband      = 2**2.1,   # Minimum stopband of the first layer.
        last_stopband_rel   = 2**0.3,   # Minimum stopband of the last layer, relative to its cutoff.
        margin_size         = 10,       # Extra pixels on each side of the internal images.
        output_scale        = 0.25,     # Scale of the output image.
        num_fp16_res        = 4,        # Layers sampled above img_resolution / 2**num_fp16_res use fp16.
        **layer_kwargs,                 # Arguments for SynthesisLayer.
    ):
        if not 0 <= num_critical < num_layers:
            raise ValueError(f'num_critical must be in [0, num_layers), got {num_critical} of {num_layers}')
        super().__init__()
        self.w_dim = w_dim
        self.num_ws = num_layers + 2
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_layers = num_layers
        self.num_critical = num_critical
        self.margin_size = margin_size
        self.output_scale = output_scale
        self.num_fp16_res = num_fp16_res

        # Geometric schedule of cutoffs and stopbands up to the output's Nyquist rate, reached
        # num_critical layers before the end; each layer samples at the smallest power of two
        # that holds its stopband (at most img_resolution).
        last_cutoff = img_resolution / 2
        last_stopband = last_cutoff * last_stopband_rel
        exponents = np.minimum(np.arange(num_layers + 1) / (num_layers - num_critical), 1)
        cutoffs = first_cutoff * (last_cutoff / first_cutoff) ** exponents
        stopbands = first_stopband * (last_stopband / first_stopband) ** exponents
        sampling_rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, img_resolution))))
        half_widths = np.maximum(stopbands, sampling_rates / 2) - cutoffs
        sizes = sampling_rates + margin_size * 2
        sizes[-2:] = img_resolution
        channels = np.rint(np.minimum((channel_base / 2) / cutoffs, channel_max))
        channels[-1] = img_channels

        self.input = SynthesisInput(w_dim=w_dim, channels=int(channels[0]), size=int(sizes[0]),
            sampling_rate=float(sampling_rates[0]), bandwidth=float(cutoffs[0]))
        self.layer_names = []
        for idx in range(num_layers + 1):
            prev = max(idx - 1, 0)
            layer = SynthesisLayer(
                w_dim=w_dim, is_torgb=(idx == num_layers),
                is_critically_sampled=(idx >= num_layers - num_critical),
                use_fp16=bool(sampling_rates[idx] * (2 ** num_fp16_res) > img_resolution),
                in_channels=int(channels[prev]), out_channels=int(channels[idx]),
                in_size=int(sizes[prev]), out_size=int(sizes[idx]),
                in_sampling_rate=int(sampling_rates[prev]), out_sampling_rate=int(sampling_rates[idx]),
                in_cutoff=float(cutoffs[prev]), out_cutoff=float(cutoffs[idx]),
                in_half_width=float(half_widths[prev]), out_half_width=float(half_widths[idx]),
                **layer_kwargs)
            name = f'L{idx}_{layer.out_size[0]}_{layer.out_channels}'
            setattr(self, name, layer)
            self.layer_names.append(name)

    def forward(self, ws, **layer_kwargs):
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim])
        ws = ws.to(torch.float32).unbind(dim=1)
        x = self.input(ws[0])
        for name, w in zip(self.layer_names, ws[1:]):
            x = getattr(self, name)(x, w, **layer_kwargs)
        if self.output_scale != 1:
            x = x * self.output_scale
        misc.assert_shape(x, [None, self.img_channels, self.img_resolution, self.img_resolution])
        return x.to(torch.float32)

    def extra_repr(self):
        return (f'w_dim={self.w_dim:d}, num_ws={self.num_ws:d}, img_resolution={self.img_resolution:d}, '
            f'img_channels={self.img_channels:d}, num_layers={self.num_layers:d}, '
            f'num_critical={self.num_critical:d}, margin_size={self.margin_size:d}, '
            f'num_fp16_res={self.num_fp16_res:d}')

@persistence.persistent_class
class Generator(torch.nn.Module):
    def __init__(self,
        z_dim,                      # Latent size.
        c_dim,                      # Conditioning label size (0: unconditional).
        w_dim,                      # Intermediate latent size.
        img_resolution,             # Output resolution.
        img_channels,               # Output channels.
        mapping_kwargs      = {},   # Arguments for MappingNetwork.
        **synthesis_kwargs,         # Arguments for SynthesisNetwork (and its layers).
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution,
            img_channels=img_channels, **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws,
            **mapping_kwargs)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False, **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
            update_emas=update_emas)
        return self.synthesis(ws, update_emas=update_emas, **synthesis_kwargs)

#----------------------------------------------------------------------------
