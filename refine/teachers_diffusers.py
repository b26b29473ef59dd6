"""`--teacher diffusers:PATH_OR_ID`: a diffusers UNet and its scheduler as an EDM teacher.

PATH_OR_ID is a local folder or a Hugging Face hub id (downloaded through diffusers' own cache,
HF_HOME / ~/.cache/huggingface, when not there yet). Two layouts are read:
  * a pipeline folder (`model_index.json`, subfolders `unet/`, `scheduler/`, optionally `vae/`),
    as `DiffusionPipeline.save_pretrained` writes and hub pipelines such as
    `google/ddpm-cifar10-32` or latent-diffusion repos have;
  * a bare model folder (`config.json` of the UNet, `scheduler_config.json` beside it).
The UNet is a `UNet2DModel` (pixel space, or latent space with a VAE) or a
`UNet2DConditionModel`; the scheduler's config (DDPM, DDIM, Euler, ... with a discrete VP beta
schedule) gives the noise schedule and prediction type. How the VP model becomes an EDM
denoiser D(x; sigma), with the VP<->VE mapping and the sigma<->timestep conversion, is written
out in `training.networks_diffusers`.

Latent pipelines: with an `AutoencoderKL` in `vae/`, the teacher works on diffusion latents
z = (z_raw - shift_factor) * scaling_factor (the factors from the VAE's config), its
`sigma_data` is 1.0 (those factors scale latents to unit variance), and `teacher.encoder`
(a `DiffusersVAEEncoder`) decodes generated latents to images; refinement snapshots carry it.
A `UNet2DConditionModel` (text-conditioned) is conditioned on a fixed `encoder_hidden_states`:
the file `prompt_embeds.pt` in the folder ([L, D] or [1, L, D], e.g. a prompt's CLIP embedding
saved from its pipeline), else zeros [1, 1, cross_attention_dim].
"""

import json
import os

import torch

from refine.teachers import EDMTeacher
from training import networks_diffusers

SUPPORTED_UNETS = ('UNet2DModel', 'UNet2DConditionModel')

def _layout(diffusers, path):
    """(unet subfolder, scheduler subfolder or None for a bare folder, vae subfolder or None)."""
    if os.path.isdir(path):
        index = os.path.join(path, 'model_index.json')
        if os.path.isfile(index) or os.path.isdir(os.path.join(path, 'unet')):
            components = json.load(open(index)) if os.path.isfile(index) else {}
            vae = 'vae' if os.path.isdir(os.path.join(path, 'vae')) else None
            return 'unet', 'scheduler', vae, components
        if os.path.isfile(os.path.join(path, 'config.json')):
            return None, None, None, {}
        raise ValueError(f'{path} has neither model_index.json/unet/ (a pipeline) nor config.json (a model)')
    try: # a hub id: a pipeline repo, or a bare model repo
        components = diffusers.DiffusionPipeline.load_config(path)
    except Exception: # pylint: disable=broad-except
        return None, None, None, {}
    vae = 'vae' if 'vae' in components else None
    return 'unet', 'scheduler', vae, dict(components)

def _sub(subfolder):
    return dict(subfolder=subfolder) if subfolder else {}

def load_diffusers_teacher(path, device='cpu', timestep_mode=None, prompt_embeds=None):
    """An EDMTeacher around a `DiffusersDenoiser` (and `.encoder` for latent pipelines)."""
    diffusers = networks_diffusers.import_diffusers()
    unet_sub, sched_sub, vae_sub, components = _layout(diffusers, path)
    try:
        unet_config = diffusers.UNet2DModel.load_config(path, **_sub(unet_sub))
    except (OSError, ValueError):
        if unet_sub is None:
            raise
        # A repo with model_index.json but the UNet's files at its top (older hub layouts).
        unet_sub = sched_sub = None
        unet_config = diffusers.UNet2DModel.load_config(path)
    unet_class = unet_config.get('_class_name', 'UNet2DModel')
    if unet_class not in SUPPORTED_UNETS:
        raise ValueError(f"its UNet is a {unet_class}; supported: {', '.join(SUPPORTED_UNETS)}")
    unet = getattr(diffusers, unet_class).from_pretrained(path, torch_dtype=torch.float32, **_sub(unet_sub))
    scheduler_config = diffusers.DDPMScheduler.load_config(path, **_sub(sched_sub))

    encoder = None
    if vae_sub is not None:
        vae_class = (components.get('vae') or [None, 'AutoencoderKL'])[1]
        if vae_class != 'AutoencoderKL':
            raise ValueError(f'its VAE is a {vae_class}; only AutoencoderKL is supported')
        vae_config = diffusers.AutoencoderKL.load_config(path, subfolder=vae_sub)
        encoder = networks_diffusers.DiffusersVAEEncoder(path, subfolder=vae_sub,
            scaling_factor=vae_config.get('scaling_factor', 0.18215), shift_factor=vae_config.get('shift_factor'))

    cond_shape = None
    if unet_class == 'UNet2DConditionModel':
        embeds = prompt_embeds
        embeds_file = os.path.join(path, 'prompt_embeds.pt')
        if embeds is None and os.path.isfile(embeds_file):
            embeds = torch.load(embeds_file, map_location='cpu', weights_only=True)
        if embeds is None:
            embeds = torch.zeros([1, 1, int(unet.config.cross_attention_dim)])
        embeds = torch.as_tensor(embeds, dtype=torch.float32)
        embeds = embeds.reshape(1, *embeds.shape[-2:])
        cond_shape = list(embeds.shape[1:])

    net = networks_diffusers.DiffusersDenoiser(unet_class, dict(unet.config), dict(scheduler_config),
        sigma_data=1.0 if encoder is not None else 0.5, timestep_mode=timestep_mode,
        cond_shape=cond_shape, unet=unet)
    if cond_shape is not None:
        net.encoder_hidden_states.copy_(embeds)
    teacher = EDMTeacher(net)
    teacher.encoder = encoder
    return teacher.to(device)
