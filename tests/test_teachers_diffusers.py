"""diffusers UNets as EDM teachers (`--teacher diffusers:PATH`), on randomly initialised models
saved to temporary folders (nothing downloads).

The wrapper must equal each scheduler's own one-step estimate x0_hat at every one of its
timesteps, and EDM-style samplers through it must reproduce diffusers' DDIM pipeline and Heun
scheduler on the same noise. Refinement through a pixel and a latent (text-conditioned UNet +
VAE) teacher snapshots, resumes exactly and generates decoded images.
"""

import io
import json
import os
import pickle

import pytest
import torch

diffusers = pytest.importorskip('diffusers')

from refine import teachers # pylint: disable=wrong-import-position
from training.sampler import edm_sampler # pylint: disable=wrong-import-position
from tests.refine_checks import refine_snapshot_resume_generate # pylint: disable=wrong-import-position
from torch_utils import safe_pickle # pylint: disable=wrong-import-position
from training import networks_diffusers, networks_generators # pylint: disable=wrong-import-position

diffusers.utils.logging.set_verbosity_error()

def tiny_unet(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=('DownBlock2D', 'AttnDownBlock2D'), up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
        norm_num_groups=4, attention_head_dim=8)
    config.update(kwargs)
    return diffusers.UNet2DModel(**config).eval()

def save_pipeline(folder, unet, scheduler, vae=None, extra=None):
    """A pipeline folder as DiffusionPipeline.save_pretrained lays it out."""
    index = {'_class_name': 'DDPMPipeline', '_diffusers_version': diffusers.__version__,
        'unet': ['diffusers', type(unet).__name__], 'scheduler': ['diffusers', type(scheduler).__name__]}
    unet.save_pretrained(os.path.join(folder, 'unet'))
    scheduler.save_pretrained(os.path.join(folder, 'scheduler'))
    if vae is not None:
        vae.save_pretrained(os.path.join(folder, 'vae'))
        index['vae'] = ['diffusers', 'AutoencoderKL']
        index['_class_name'] = 'StableDiffusionPipeline'
    index.update(extra or {})
    with open(os.path.join(folder, 'model_index.json'), 'w') as f:
        json.dump(index, f)
    return str(folder)

def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())

#----------------------------------------------------------------------------
# D(x; sigma) against the scheduler's own x0_hat.

@pytest.mark.parametrize('prediction_type,schedule,variance', [('epsilon', 'linear', 'fixed_small'),
    ('v_prediction', 'scaled_linear', 'fixed_small'), ('sample', 'squaredcos_cap_v2', 'fixed_small'),
    ('epsilon', 'linear', 'learned_range')])
def test_wrapper_equals_the_schedulers_one_step_estimate_at_every_timestep(tmp_path, prediction_type, schedule, variance):
    learned = variance == 'learned_range'
    unet = tiny_unet(out_channels=6 if learned else 3)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule,
        beta_start=0.00085 if schedule == 'scaled_linear' else 1e-4, beta_end=0.012 if schedule == 'scaled_linear' else 0.02,
        prediction_type=prediction_type, variance_type=variance, clip_sample=False)
    teacher = teachers.load_teacher('diffusers:' + save_pipeline(tmp_path, unet, scheduler))
    net = teacher.net
    assert isinstance(net, networks_diffusers.DiffusersDenoiser) and teacher.shape == (3, 8, 8)
    sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()
    assert teacher.sigma_min == float(sigmas[0]) and teacher.sigma_max == float(sigmas[-1])

    T = scheduler.config.num_train_timesteps
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(T, 3, 8, 8, generator=g), torch.randn(T, 3, 8, 8, generator=g)
    t = torch.arange(T)
    x_t = scheduler.add_noise(x0, eps, t)
    with torch.no_grad():
        model_output = unet(x_t, t).sample
        D = teacher(x_t * (1 + sigmas ** 2).sqrt().reshape(-1, 1, 1, 1), sigmas)
    x0_hat = torch.stack([scheduler.step(model_output[i:i + 1], i, x_t[i:i + 1]).pred_original_sample[0]
        for i in range(T)])
    worst = max(_rel(D[i], x0_hat[i]) for i in range(T))
    print(f'{prediction_type}/{schedule}/{variance}: largest relative difference over {T} timesteps {worst:.2e}')
    assert worst < 1e-5
    # Integer timesteps in, integer timesteps out; between them the log-sigma interpolation.
    assert torch.equal(net.sigma_to_t(sigmas), t.to(torch.float32))
    mid = (sigmas[10].log() * 0.75 + sigmas[11].log() * 0.25).exp()
    assert abs(float(net.sigma_to_t(mid[None])) - 10.25) < 1e-4
    assert float(net.sigma_to_t(torch.tensor([1e-6]))) == 0 and float(net.sigma_to_t(torch.tensor([1e6]))) == T - 1

def test_class_conditional_unet_and_nearest_timesteps(tmp_path):
    unet = tiny_unet(num_class_embeds=5)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    teacher = teachers.load_teacher('diffusers:' + save_pipeline(tmp_path, unet, scheduler))
    assert teacher.label_dim == 5
    net = networks_diffusers.DiffusersDenoiser('UNet2DModel', unet.config, scheduler.config,
        timestep_mode='nearest', unet=unet)
    x, labels = torch.randn(3, 3, 8, 8), torch.eye(5)[[4, 0, 2]]
    sigma = torch.tensor([0.05, 0.8, 9.0])
    t = net.sigma_to_t(sigma)
    sig_t = net.vp_sigmas()[t]
    assert t.dtype == torch.long and torch.equal(net.round_sigma(sigma), sig_t)
    with torch.no_grad():
        m = unet(x / (1 + sigma ** 2).sqrt().reshape(-1, 1, 1, 1), t, class_labels=torch.tensor([4, 0, 2])).sample
        expected = x - sigma.reshape(-1, 1, 1, 1) * m
        assert _rel(net(x, sigma, labels), expected) < 1e-6
        # Interpolation at a trained level sigma_t is that timestep too.
        assert _rel(teacher(x, sig_t, labels), net(x, sig_t, labels)) < 1e-6
    with pytest.raises(ValueError, match='class-conditional'):
        net(x, sigma)

def test_bare_model_folder_and_clean_errors(tmp_path):
    unet = tiny_unet(seed=8)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=100, prediction_type='v_prediction')
    unet.save_pretrained(tmp_path / 'bare') # config.json + weights
    scheduler.save_pretrained(tmp_path / 'bare') # scheduler_config.json beside them
    teacher = teachers.load_teacher(f'diffusers:{tmp_path / "bare"}')
    assert teacher.net.prediction_type == 'v_prediction' and teacher.net.num_train_timesteps == 100
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 2.0])
    with torch.no_grad():
        s = sigma.reshape(-1, 1, 1, 1)
        m = unet(x / (1 + s ** 2).sqrt(), teacher.net.sigma_to_t(sigma)).sample
        assert _rel(teacher(x, sigma), x / (1 + s ** 2) - s * m / (1 + s ** 2).sqrt()) < 1e-5
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError) as info:
        teachers.load_teacher(f'diffusers:{tmp_path / "empty"}')
    assert 'neither model_index.json' in str(info.value) and '\n' not in str(info.value)

#----------------------------------------------------------------------------
# Samplers through the wrapper against diffusers' own.

def test_ddim_through_the_wrapper_matches_the_ddim_pipeline():
    unet = tiny_unet(seed=2)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    net = networks_diffusers.DiffusersDenoiser('UNet2DModel', unet.config, scheduler.config, unet=unet)

    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    final = []
    step = pipe.scheduler.step
    def recording_step(*args, **kwargs): # the pipeline's last state, before it clamps to [0, 1]
        out = step(*args, **kwargs)
        final[:] = [out.prev_sample]
        return out
    pipe.scheduler.step = recording_step
    pipe.set_progress_bar_config(disable=True)
    image = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), eta=0.0, num_inference_steps=10,
        output_type='np').images

    noise = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(0)) # the pipeline's draw
    sigmas = net.t_to_sigma(pipe.scheduler.timesteps) # 900, 800, ..., 0 (then alpha = 1: sigma 0)
    with torch.no_grad():
        ours = networks_diffusers.euler_sampler_vp(net, noise, sigmas)
    err = _rel(ours.float(), final[0])
    print(f'DDIM 10 steps: relative difference {err:.2e}')
    assert err < 1e-5
    assert abs(image - (ours.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max() < 1e-5

def test_heun_through_the_wrapper_matches_diffusers_heun_scheduler():
    unet = tiny_unet(seed=3)
    scheduler = diffusers.HeunDiscreteScheduler(num_train_timesteps=1000, use_karras_sigmas=True,
        timestep_spacing='linspace')
    net = networks_diffusers.DiffusersDenoiser('UNet2DModel', unet.config, scheduler.config, unet=unet)
    steps = 6
    scheduler.set_timesteps(steps)
    noise = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(0))
    sample = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps: # diffusers' sampling loop
            model_output = unet(scheduler.scale_model_input(sample, t), t).sample
            sample = scheduler.step(model_output, t, sample).prev_sample
        # EDM's Heun sampler (2 steps - 1 calls) on the same Karras levels, through the wrapper.
        ours = edm_sampler(net, noise, num_steps=steps, sigma_min=net.sigma_min, sigma_max=net.sigma_max, rho=7)
    err = _rel(ours.float(), sample)
    print(f'Heun {steps} steps: relative difference {err:.2e}')
    assert err < 1e-5

#----------------------------------------------------------------------------
# Pickles and refinement.

def test_wrapped_network_pickles_safely_without_diffusers_objects(tmp_path):
    unet = tiny_unet(seed=4, num_class_embeds=3)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=50, prediction_type='v_prediction')
    net = networks_diffusers.DiffusersDenoiser('UNet2DModel', unet.config, scheduler.config, unet=unet)
    G = networks_generators.OneStepGenerator(net, 1.0)
    blob = pickle.dumps(dict(G_ema=G))
    assert b'diffusers.models' not in blob # the UNet is stored as tensors and its config
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 4.0]), torch.eye(3)[[1, 2]]
    with torch.no_grad():
        expected = net(x, sigma, labels)
        for loaded in (safe_pickle.load(io.BytesIO(blob)), safe_pickle.load(io.BytesIO(blob), allow_code=True)):
            assert isinstance(loaded['G_ema'].net.unet, diffusers.UNet2DModel)
            assert torch.equal(loaded['G_ema'].net(x, sigma, labels), expected)
        import copy # pylint: disable=import-outside-toplevel
        assert torch.equal(copy.deepcopy(net)(x, sigma, labels), expected)

def test_refine_through_a_pixel_diffusers_teacher(tmp_path):
    unet = tiny_unet(seed=5)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    spec = 'diffusers:' + save_pipeline(tmp_path / 'model', unet, scheduler)
    _, data, _ = refine_snapshot_resume_generate(spec, tmp_path, 8, networks_diffusers.DiffusersDenoiser)
    assert 'encoder' not in data

def tiny_latent_pipeline(folder):
    torch.manual_seed(6)
    unet = diffusers.UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=8, norm_num_groups=4,
        attention_head_dim=2).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=8, scaling_factor=0.3).eval()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule='scaled_linear',
        beta_start=0.00085, beta_end=0.012, clip_sample=False, prediction_type='v_prediction')
    path = save_pipeline(folder, unet, scheduler, vae=vae)
    torch.save(torch.randn(1, 3, 8), os.path.join(path, 'prompt_embeds.pt'))
    return path, unet, vae

def test_latent_text_conditioned_teacher_with_its_vae(tmp_path):
    path, unet, vae = tiny_latent_pipeline(tmp_path / 'model')
    teacher = teachers.load_teacher('diffusers:' + path)
    assert teacher.shape == (4, 4, 4) and teacher.sigma_data == 1.0 and teacher.encoder.scaling_factor == 0.3
    embeds = torch.load(os.path.join(path, 'prompt_embeds.pt'))
    x, sigma = torch.randn(2, 4, 4, 4), torch.tensor([0.5, 3.0])
    s = sigma.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        m = unet(x / (1 + s ** 2).sqrt(), teacher.net.sigma_to_t(sigma), encoder_hidden_states=embeds.expand(2, -1, -1)).sample
        assert _rel(teacher(x, sigma), x / (1 + s ** 2) - s * m / (1 + s ** 2).sqrt()) < 1e-5
        pixels = teacher.encoder.decode(x)
        expected = ((vae.decode(x / 0.3).sample * 127.5 + 128).clip(0, 255)).to(torch.uint8)
    assert pixels.shape == (2, 3, 8, 8) and torch.equal(pixels, expected)

def test_refine_through_a_latent_diffusers_teacher(tmp_path):
    path, _, _ = tiny_latent_pipeline(tmp_path / 'model')
    _, data, _ = refine_snapshot_resume_generate('diffusers:' + path, tmp_path, 8, # decoded 8x8 images
        networks_diffusers.DiffusersDenoiser)
    assert isinstance(data['encoder'], networks_diffusers.DiffusersVAEEncoder) and data['encoder'].vae_name == path
