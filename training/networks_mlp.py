"""Small MLP networks for vector data (toy benchmarks): an EDM-preconditioned denoiser and a
one-step generator.

Like `networks_edm`, this file is embedded in every pickle it produces and must load in other
NVlabs-style code bases: it may import only numpy, torch and `torch_utils.persistence`, and
attributes hold only Python numbers. Class names carry an `MLP` prefix because the safe pickle
loader finds classes by name across all known network modules.
"""

import math

import torch
from torch.nn.functional import silu

from torch_utils import persistence

#----------------------------------------------------------------------------

@persistence.persistent_class
class MLPLinear(torch.nn.Module):
    """Dense layer with zero bias and normal weights of std gain/sqrt(fan_in)."""
    def __init__(self, in_features, out_features, gain=1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) * (gain / math.sqrt(in_features)))
        self.bias = torch.nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return x @ self.weight.to(x.dtype).t() + self.bias.to(x.dtype)

@persistence.persistent_class
class MLPNoiseEmbedding(torch.nn.Module):
    """Sinusoidal features of a scalar at fixed log-spaced frequencies (no random buffer).

    EDM's c_noise = ln(sigma)/4 spans only about [-2, 2] over useful noise levels, so the
    frequencies run from 1/2 to 64 radians per unit rather than transformer-style 1e-4..1.
    """
    def __init__(self, num_channels, min_freq=0.5, max_freq=64.0):
        super().__init__()
        self.num_channels = num_channels
        self.min_freq = float(min_freq)
        self.max_freq = float(max_freq)

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.logspace(math.log10(self.min_freq), math.log10(self.max_freq), half,
            dtype=x.dtype, device=x.device)
        x = x.reshape(-1, 1) * freqs.reshape(1, -1)
        return torch.cat([x.cos(), x.sin()], dim=1)

@persistence.persistent_class
class MLPBody(torch.nn.Module):
    """SiLU MLP: in_features -> hidden (num_layers hidden layers) -> out_features."""
    def __init__(self, in_features, out_features, hidden=256, num_layers=4, out_gain=1.0):
        super().__init__()
        assert num_layers >= 1
        widths = [in_features] + [hidden] * num_layers
        # Gain sqrt(2) on hidden layers keeps activations from shrinking through the SiLUs.
        self.layers = torch.nn.ModuleList([MLPLinear(a, b, gain=math.sqrt(2)) for a, b in zip(widths[:-1], widths[1:])])
        self.out = MLPLinear(hidden, out_features, gain=out_gain)

    def forward(self, x):
        for layer in self.layers:
            x = silu(layer(x))
        return self.out(x)

#----------------------------------------------------------------------------

def _float_dtype(x):
    # float64 passes through (handy for gradient checks); everything else runs in float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32

def _labels(class_labels, label_dim, n, dtype, device):
    if label_dim == 0:
        return None
    if class_labels is None:
        return torch.zeros([n, label_dim], dtype=dtype, device=device)
    return class_labels.to(dtype).reshape(-1, label_dim).expand(n, -1)

@persistence.persistent_class
class MLPDenoiser(torch.nn.Module):
    """EDM-preconditioned denoiser for vectors x [N, dim]:
    D(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4, labels), in the VE convention."""
    def __init__(self,
        dim,                            # Data dimension.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        hidden          = 256,          # Width of the hidden layers.
        num_layers      = 4,            # Number of hidden layers.
        sigma_data      = 1.0,          # Expected standard deviation of the data.
        sigma_min       = 0.0,          # Minimum supported noise level (metadata).
        sigma_max       = float('inf'), # Maximum supported noise level (metadata).
        emb_dim         = 64,           # Size of the noise and label embeddings.
    ):
        super().__init__()
        self.dim = int(dim)
        self.label_dim = int(label_dim)
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.emb_dim = int(emb_dim)
        if self.emb_dim < 2 or self.emb_dim % 2:
            raise ValueError(f'emb_dim must be even and positive, got {emb_dim}')
        self.noise_emb = MLPNoiseEmbedding(emb_dim)
        self.label_emb = MLPLinear(label_dim, emb_dim) if label_dim else None
        in_features = dim + emb_dim + (emb_dim if label_dim else 0)
        self.model = MLPBody(in_features, dim, hidden=hidden, num_layers=num_layers)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        del force_fp32, model_kwargs # Accepted for call compatibility with the EDM networks.
        dtype = _float_dtype(x)
        x = x.to(dtype).reshape(-1, self.dim)
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device).reshape(-1, 1).expand(n, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model(self._features(c_in * x, c_noise, class_labels))
        return c_skip * x + c_out * F_x

    def _features(self, x_in, c_noise, class_labels):
        parts = [x_in, self.noise_emb(c_noise.flatten())]
        labels = _labels(class_labels, self.label_dim, x_in.shape[0], x_in.dtype, x_in.device)
        if labels is not None:
            parts.append(self.label_emb(labels))
        return torch.cat(parts, dim=1)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------

@persistence.persistent_class
class MLPGenerator(torch.nn.Module):
    """One-step generator G(z, c) -> x [N, dim], a SiLU MLP on [z, c].

    The output layer is calibrated at construction so that G(z), z ~ N(0, I), has about zero
    mean and unit standard deviation; `out_scale` then multiplies the output (e.g. the data
    scale)."""
    def __init__(self,
        z_dim,                          # Latent dimension.
        dim,                            # Output dimension.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        hidden          = 256,          # Width of the hidden layers.
        num_layers      = 4,            # Number of hidden layers.
        out_scale       = 1.0,          # Output multiplier.
        slots           = 0,            # > 0: z[:, 0] picks one of this many equally likely learned codes.
        code_dim        = 16,           # Size of each code (with slots).
    ):
        super().__init__()
        self.z_dim = int(z_dim)
        self.dim = int(dim)
        self.label_dim = int(label_dim)
        self.out_scale = float(out_scale)
        self.slots = int(slots)
        self.code_dim = int(code_dim) if self.slots else 0
        if self.slots and self.z_dim < 2:
            raise ValueError('an MLP generator with slots needs z_dim >= 2 (z[:, 0] picks the slot)')
        # With slots, the map from latents to samples is disconnected: a slot's code can move its
        # mass to one mixture component without a bridge of samples to the others.
        self.codes = torch.nn.Parameter(torch.randn(self.slots, self.code_dim)) if self.slots else None
        cont = self.z_dim - 1 if self.slots else self.z_dim
        self.model = MLPBody(cont + self.code_dim + label_dim, dim, hidden=hidden, num_layers=num_layers)
        self._calibrate_output()

    @torch.no_grad()
    def _calibrate_output(self, n=2048):
        # A fixed private RNG, so the caller's random stream advances only by the weight init.
        g = torch.Generator().manual_seed(0)
        z = torch.randn([n, self.z_dim], generator=g)
        c = None
        if self.label_dim:
            c = torch.eye(self.label_dim)[torch.randint(self.label_dim, [n], generator=g)]
        y = self._raw(z, c)
        rms = float((y - y.mean(0)).square().mean().sqrt())
        if rms > 0: # zero mean, unit RMS per output at init
            self.model.out.weight.mul_(1 / rms)
            self.model.out.bias.sub_(y.mean(0) / rms)

    def _raw(self, z, c):
        dtype = _float_dtype(z)
        if z.shape[-1] != self.z_dim: # a reshape would silently regroup the numbers
            raise ValueError(f'MLPGenerator: latents of {self.z_dim} numbers expected, got shape {tuple(z.shape)}')
        z = z.to(dtype).reshape(-1, self.z_dim)
        labels = _labels(c, self.label_dim, z.shape[0], dtype, z.device)
        parts = [z]
        if self.slots: # Phi(z_0) is uniform on (0, 1): every slot gets 1/slots of the samples
            u = 0.5 * (1 + torch.erf(z[:, 0] / math.sqrt(2)))
            k = (u * self.slots).long().clamp(0, self.slots - 1)
            parts = [z[:, 1:], self.codes.to(dtype)[k]]
        if labels is not None:
            parts.append(labels)
        return self.model(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    def forward(self, z, c=None, **kwargs):
        del kwargs
        return self._raw(z, c) * self.out_scale

#----------------------------------------------------------------------------
