"""EDM2's pixel <-> latent converters (the `encoder` entry of its snapshots), written here.

Interface (NVlabs' names, NCHW tensors):
  init(device)        load what is needed (the VAE) now rather than at first use;
  encode(x)           encode_latents(encode_pixels(x));
  encode_pixels(x)    uint8 pixels -> raw latents (what a latent dataset stores);
  encode_latents(x)   raw latents -> final latents (what the network sees);
  decode(x)           final latents -> uint8 pixels.

* `StandardRGBEncoder`: pixels are their own raw latents; final = x/127.5 - 1, i.e. [-1, 1];
  decode = clip(127.5 x + 128, 0, 255) truncated to uint8 (round half up).
* `StabilityVAEEncoder`: the Stable Diffusion VAE (`diffusers.AutoencoderKL`, default
  'stabilityai/sd-vae-ft-mse'; a local folder works too). EDM2 feeds it pixels in [0, 1] (not
  SD's [-1, 1]), ignores its `scaling_factor`, and instead maps the posterior sample z per
  channel c to final latents z scale_c + bias_c, scale_c = final_std/raw_std_c,
  bias_c = final_mean - raw_mean_c scale_c. Raw latents are the 8 channels [mean, std] of the
  posterior; `encode_latents` draws z = mean + std * eps from torch's global generator.
  Decoding clamps the VAE's output to [0, 1] and truncates 255 x to uint8.

diffusers (an optional dependency, `pip install diffusers`) is imported only when the VAE is
first needed, so snapshots load without it. The VAE itself is never pickled (`_vae` is None
in the state); a hub id downloads through diffusers' own cache, and is looked up there
without network access first.
"""

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------

@persistence.persistent_class
class Encoder:
    """Abstract base: identity conversions."""
    def __init__(self):
        pass

    def init(self, device): # force lazy init to happen now
        pass

    def encode(self, x): # raw pixels => final latents
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x): # raw pixels => raw latents
        raise NotImplementedError

    def encode_latents(self, x): # raw latents => final latents
        raise NotImplementedError

    def decode(self, x): # final latents => raw pixels
        raise NotImplementedError

#----------------------------------------------------------------------------

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    """Pixel models: final latents are the pixels scaled to [-1, 1]."""
    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------

def load_vae(name, device='cpu'):
    """diffusers' AutoencoderKL from a local folder or a hub id (cache first, then download)."""
    try:
        import diffusers # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError("decoding latents needs diffusers ('pip install diffusers')") from None
    kwargs = dict(torch_dtype=torch.float32)
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(name, local_files_only=True, **kwargs)
    except Exception: # pylint: disable=broad-except
        vae = diffusers.AutoencoderKL.from_pretrained(name, **kwargs) # hub id not cached yet
    return vae.eval().requires_grad_(False).to(device)

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """Latent models: the SD VAE with EDM2's per-channel latent scaling (module docstring)."""
    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=[5.81, 3.25, 0.12, -2.15],
            raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=0, final_std=0.5, batch_size=8):
        super().__init__()
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def init(self, device):
        device = torch.device(device)
        if self._vae is None:
            self._vae = load_vae(self.vae_name, device)
        else:
            self._vae.to(device)

    def __getstate__(self):
        return dict(self.__dict__, _vae=None) # the VAE is not part of the pickle

    def _affine(self, x):
        scale = torch.as_tensor(self.scale, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        bias = torch.as_tensor(self.bias, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        return scale, bias

    def _run_vae(self, fn, x):
        return torch.cat([fn(chunk) for chunk in x.split(self.batch_size)])

    def encode_pixels(self, x):
        self.init(x.device)
        x = x.to(torch.float32) / 255
        def encode(chunk):
            dist = self._vae.encode(chunk)['latent_dist']
            return torch.cat([dist.mean, dist.std], dim=1)
        with torch.no_grad():
            return self._run_vae(encode, x)

    def encode_latents(self, x):
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        x = mean + torch.randn_like(mean) * std
        scale, bias = self._affine(x)
        return x * scale + bias

    def decode(self, x):
        self.init(x.device)
        scale, bias = self._affine(x)
        x = (x.to(torch.float32) - bias) / scale
        with torch.no_grad():
            x = self._run_vae(lambda chunk: self._vae.decode(chunk)['sample'], x)
        return x.clamp(0, 1).mul(255).to(torch.uint8)

#----------------------------------------------------------------------------
