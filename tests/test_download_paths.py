"""Nothing downloads in the tests, and the real download paths exist: a diffusers hub id and
EDM2's Stability VAE load through diffusers' own loaders (its cache first, then the hub), checked
here with those loaders redirected to random models in a temporary folder."""

import os
import re
import socket

import pytest
import torch

diffusers = pytest.importorskip('diffusers')

from refine import teachers # pylint: disable=wrong-import-position
from training import encoders_edm2 # pylint: disable=wrong-import-position
from tests.test_teachers_diffusers import save_pipeline, tiny_unet # pylint: disable=wrong-import-position

HUB_ID = 'google/ddpm-cifar10-32' # the README's example

def test_the_tests_cannot_reach_the_network():
    with pytest.raises(OSError, match='tests must not use the network'):
        socket.create_connection(('192.0.2.1', 80), timeout=0.5) # TEST-NET-1
    assert os.environ['HF_HUB_OFFLINE'] == '1'

def _redirect(monkeypatch, local, calls):
    """diffusers' loaders, called with HUB_ID, load `local` instead; every call is recorded."""
    classes = (diffusers.DiffusionPipeline, diffusers.UNet2DModel, diffusers.UNet2DConditionModel,
        diffusers.DDPMScheduler, diffusers.AutoencoderKL)
    for cls in classes:
        for name in ('load_config', 'from_pretrained'):
            original = getattr(cls, name)
            def fake(path, *args, _original=original, _what=f'{cls.__name__}.{name}', **kwargs):
                calls.append((_what, str(path), kwargs.get('subfolder')))
                return _original(local if path == HUB_ID else path, *args, **kwargs)
            monkeypatch.setattr(cls, name, fake)

def test_a_hub_id_teacher_loads_through_diffusers(monkeypatch, tmp_path):
    local = save_pipeline(tmp_path / 'hub', tiny_unet(seed=3), diffusers.DDPMScheduler(num_train_timesteps=1000))
    expected = teachers.load_teacher('diffusers:' + local)
    calls = []
    _redirect(monkeypatch, local, calls)
    teacher = teachers.load_teacher('diffusers:' + HUB_ID)
    assert ('UNet2DModel.from_pretrained', HUB_ID, 'unet') in calls
    assert ('DDPMScheduler.load_config', HUB_ID, 'scheduler') in calls
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 4.0])
    with torch.no_grad():
        assert torch.equal(teacher(x, sigma), expected(x, sigma))

def test_edm2_vae_loads_from_the_cache_then_the_hub(monkeypatch):
    assert encoders_edm2.StabilityVAEEncoder().vae_name == 'stabilityai/sd-vae-ft-mse' # EDM2's VAE
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
        down_block_types=('DownEncoderBlock2D',), up_block_types=('UpDecoderBlock2D',), layers_per_block=1,
        norm_num_groups=4, sample_size=8)
    calls = []
    def from_pretrained(name, local_files_only=False, **_kwargs):
        calls.append((name, local_files_only))
        if local_files_only:
            raise OSError('not in the cache') # as diffusers says offline, before the first download
        return vae
    monkeypatch.setattr(diffusers.AutoencoderKL, 'from_pretrained', from_pretrained)
    assert encoders_edm2.load_vae('stabilityai/sd-vae-ft-mse') is vae
    assert calls == [('stabilityai/sd-vae-ft-mse', True), ('stabilityai/sd-vae-ft-mse', False)]

def test_the_demo_reads_only_shipped_files():
    # demo.py's teacher, references and detector are under pretrained/; it names no URL or hub id.
    source = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'demo.py'), encoding='utf-8').read()
    assert not re.search(r'https?://|diffusers:', source)
    assert "os.path.join(HERE, 'pretrained'," in source
