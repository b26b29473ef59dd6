"""EDM2 snapshots as teachers: `--teacher edm2-snapshot.pkl` (and `--gen teacher` from it).

An EDM2 snapshot (NVlabs' training loop, its post-hoc EMA reconstructions, or
`training.phema` here) is an EasyDict with `ema` (a `Precond`, float16), `encoder`,
`loss_fn` and `dataset_kwargs`. It loads with `torch_utils.safe_pickle` as our own
`training.networks_edm2.Precond` (nothing from the file runs), or with code allowed as NVlabs'.

* The denoiser is `net(x, sigma, class_labels)`, as in EDM; the teacher's data scale
  `sigma_data` is the net's (0.5 for EDM2's models), its sampling range EDM's
  [0.002, 80] (EDM2 has no sigma_min/sigma_max), and `teacher.logvar(sigma)` is the net's
  learned log-variance u(sigma).
* Weights are used in float32 (copies of the float16 values): the teacher, and a generator or
  fake score initialised from it, train and compute in float32.
* Latent models (img512: 4 x 64 x 64 latents, `StabilityVAEEncoder`) keep the snapshot's
  encoder as `teacher.encoder`: the generator then works in latent space, refinement snapshots
  carry the encoder, and `generate.py` / `fid.py` decode their output to images with it (the SD
  VAE through diffusers' `AutoencoderKL`, EDM2's per-channel latent scaling). Pixel models
  (img64, `StandardRGBEncoder`: images in [-1, 1]) need no decoder.
"""

import torch

from refine.teachers import EDMTeacher
from torch_utils import safe_pickle

def is_edm2_network(net):
    """An EDM2 preconditioner (ours or NVlabs', checked by attribute)."""
    return isinstance(net, torch.nn.Module) and all(hasattr(net, name) for name in
        ('unet', 'logvar_linear', 'sigma_data', 'img_resolution', 'label_dim')) and not hasattr(net, 'sigma_min')

def is_edm2_snapshot(data):
    return isinstance(data, dict) and is_edm2_network(data.get('ema'))

def is_latent_encoder(encoder):
    """An encoder whose decode is not the plain [-1, 1] -> uint8 mapping of pixel models."""
    return encoder is not None and hasattr(encoder, 'decode') and \
        type(encoder).__name__ != 'StandardRGBEncoder' and \
        not isinstance(encoder, safe_pickle.UnknownPersistentObject)

class EDM2Teacher(EDMTeacher):
    """An EDM2 `Precond` as a teacher, with its encoder for latent models (module docstring)."""

    def __init__(self, net, encoder=None):
        super().__init__(net.to(torch.float32))
        self.encoder = encoder if is_latent_encoder(encoder) else None

    @classmethod
    def from_snapshot(cls, data):
        net = safe_pickle.require_module(data, 'ema', 'the EDM2 snapshot')
        encoder = data.get('encoder')
        if isinstance(encoder, safe_pickle.UnknownPersistentObject) and int(net.img_channels) != 3:
            encoder._refuse() # a latent model whose decoder the safe loader cannot rebuild
        return cls(net, encoder)

    def logvar(self, sigma):
        """The net's learned log-variance u(sigma), [N, 1, 1, 1] float32."""
        c_noise = torch.as_tensor(sigma, dtype=torch.float32, device=self.net.logvar_linear.weight.device).reshape(-1).log() / 4
        return self.net.logvar_linear(self.net.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

#----------------------------------------------------------------------------
# Generation (generate.py, fid.py): EDM2 nets in EDM's sampler, latents decoded to images.

class EDM2SamplingNet(torch.nn.Module):
    """An EDM2 `Precond` with what EDM's Heun sampler asks of a net: sigma_min/sigma_max
    (EDM2's sampler defaults, 0.002 and 80) and round_sigma (the identity)."""
    def __init__(self, net, sigma_min=0.002, sigma_max=80.0):
        super().__init__()
        self.net = net.to(torch.float32)
        self.img_resolution, self.img_channels = int(net.img_resolution), int(net.img_channels)
        self.label_dim, self.sigma_data = int(net.label_dim), float(net.sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        sigma = torch.as_tensor(sigma, device=x.device)
        return self.net(x, sigma, class_labels, **kwargs)

def decoded_sampler(sample, data, device):
    """`sample` (seeds -> latents) followed by the pickle's latent decoder, if it has one:
    seeds -> images in [-1, 1] (exactly the decoder's uint8 pixels after `to_uint8`)."""
    encoder = data.get('encoder') if isinstance(data, dict) else None
    if not is_latent_encoder(encoder):
        return sample
    encoder.init(device)

    def sample_images(seeds, class_idx=None):
        pixels = encoder.decode(sample(seeds, class_idx).to(torch.float32))
        return (pixels.to(torch.float32) - 127.5) / 127.5
    return sample_images
