"""EDM2 networks (training/networks_edm2.py), encoders and snapshot pickles in NVlabs' layout.

The maths is checked against independent computations (pooling, interpolation, PyTorch's own
attention, the preconditioning formulas); the layout against the parameter table of the
interface document; pickles written here load safely and by executing their source with
identical outputs.
"""

import io
import math
import pickle
import pickletools
import sys

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import persistence, safe_pickle
from training import encoders_edm2, networks_edm2

F = torch.nn.functional

# The configuration of the interface document's parameter table (small: 0.7 M parameters).
DOC_KWARGS = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[8], dropout=0.0, use_fp16=True)
# Even smaller, for everything that runs the network.
TINY_KWARGS = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=16, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[4], channels_per_head=16, dropout=0.0)

def randomized(net, seed=0):
    """A net whose gains are not zero (a fresh EDM2 net outputs c_skip x, whatever its weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.copy_(0.5 + torch.rand([], generator=g))
    return net.eval().requires_grad_(False)

def tiny_net(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomized(networks_edm2.Precond(**dict(TINY_KWARGS, **overrides)), seed)

#----------------------------------------------------------------------------
# Layout.

def test_parameter_names_shapes_and_order_match_the_interface_table():
    with torch.device('meta'):
        net = networks_edm2.Precond(**DOC_KWARGS)
    params = list(net.named_parameters())
    assert len(params) == 59 and sum(p.numel() for _, p in params) == 723691
    assert [(k, list(p.shape)) for k, p in params[:4]] == [('unet.out_gain', []),
        ('unet.emb_noise.weight', [64, 32]), ('unet.emb_label.weight', [64, 10]),
        ('unet.enc.16x16_conv.weight', [32, 4, 3, 3])]
    shapes = dict((k, list(p.shape)) for k, p in params)
    assert shapes['unet.enc.8x8_block0.attn_qkv.weight'] == [192, 64, 1, 1]
    assert shapes['unet.dec.8x8_block1.conv_skip.weight'] == [64, 96, 1, 1]
    assert shapes['unet.dec.16x16_block0.conv_res0.weight'] == [32, 96, 3, 3]
    assert params[-2][0] == 'unet.out_conv.weight' and params[-1] == ('logvar_linear.weight', params[-1][1])
    assert [k for k, _ in net.named_buffers()] == ['unet.emb_fourier.freqs', 'unet.emb_fourier.phases',
        'logvar_fourier.freqs', 'logvar_fourier.phases']
    assert len(net.state_dict()) == 63
    assert list(net.unet.enc) == ['16x16_conv', '16x16_block0', '8x8_down', '8x8_block0']
    assert list(net.unet.dec) == ['8x8_in0', '8x8_in1', '8x8_block0', '8x8_block1', '16x16_up',
        '16x16_block0', '16x16_block1']
    assert [m.num_heads for m in net.unet.dec.values()] == [1, 0, 1, 1, 0, 0, 0]

def test_recorded_constructor_arguments_match_nvlabs():
    net = networks_edm2.Precond(**DOC_KWARGS)
    unet = net.unet
    assert net._init_args == () and net._init_kwargs == DOC_KWARGS
    assert unet._init_kwargs == dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
    assert (unet.emb_fourier._init_args, unet.emb_fourier._init_kwargs) == ((32,), {})
    assert (unet.emb_label._init_args, unet.emb_label._init_kwargs) == ((10, 64), {'kernel': []})
    assert (unet.enc['16x16_conv']._init_args, unet.enc['16x16_conv']._init_kwargs) == ((4, 32), {'kernel': [3, 3]})
    assert (unet.enc['8x8_down']._init_args, unet.enc['8x8_down']._init_kwargs) == \
        ((32, 32, 64), {'flavor': 'enc', 'resample_mode': 'down', 'dropout': 0.0})
    assert (unet.enc['8x8_block0']._init_args, unet.enc['8x8_block0']._init_kwargs) == \
        ((32, 64, 64), {'flavor': 'enc', 'attention': True, 'dropout': 0.0})
    assert (unet.dec['16x16_block1']._init_args, unet.dec['16x16_block1']._init_kwargs) == \
        ((64, 32, 64), {'flavor': 'dec', 'attention': False, 'dropout': 0.0})
    assert (net.logvar_linear._init_args, net.logvar_linear._init_kwargs) == ((128, 1), {'kernel': []})
    assert not hasattr(net, 'sigma_min') and not hasattr(net, 'round_sigma')

#----------------------------------------------------------------------------
# The operations, against independent computations.

def test_magnitude_preserving_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 6, generator=g)
    y = torch.randn(2, 3, 6, 6, generator=g)
    rms = x.square().mean(dim=[1, 2, 3], keepdim=True).sqrt()
    torch.testing.assert_close(networks_edm2.normalize(x), x / (1e-4 + rms), rtol=1e-6, atol=1e-7)
    pix = x.square().mean(dim=1, keepdim=True).sqrt()
    torch.testing.assert_close(networks_edm2.normalize(x, dim=1), x / (1e-4 + pix), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(networks_edm2.mp_silu(x), x * torch.sigmoid(x) / 0.596)
    t = 0.3
    torch.testing.assert_close(networks_edm2.mp_sum(x, 2 * x, t), ((1 - t) * x + t * 2 * x) / math.sqrt(0.49 + 0.09))
    cat = networks_edm2.mp_cat(x, y, t=t)
    C = math.sqrt(8 / (0.49 + 0.09))
    torch.testing.assert_close(cat, torch.cat([C * 0.7 / math.sqrt(5) * x, C * 0.3 / math.sqrt(3) * y], dim=1))
    # Unit-variance inputs stay at unit variance.
    big = torch.randn(4, 64, 32, 32, generator=g), torch.randn(4, 32, 32, 32, generator=g)
    assert abs(float(networks_edm2.mp_cat(*big, t=0.3).var()) - 1) < 0.02
    assert abs(float(networks_edm2.mp_silu(big[0]).square().mean()) - 1) < 0.02
    # Resampling with [1, 1]: average pooling and nearest-neighbour doubling.
    torch.testing.assert_close(networks_edm2.resample(x, mode='down'), F.avg_pool2d(x, 2))
    torch.testing.assert_close(networks_edm2.resample(x, mode='up'), F.interpolate(x, scale_factor=2, mode='nearest'))
    assert networks_edm2.resample(x, mode='keep') is x

def test_mpfourier_and_mpconv():
    torch.manual_seed(0)
    fourier = networks_edm2.MPFourier(6, bandwidth=2)
    s = torch.tensor([-0.5, 0.25, 1.0])
    expected = math.sqrt(2) * torch.cos(s[:, None] * fourier.freqs[None] + fourier.phases[None])
    torch.testing.assert_close(fourier(s), expected)

    conv = networks_edm2.MPConv(4, 3, kernel=[3, 3]).eval()
    x = torch.randn(2, 4, 5, 5)
    W = conv.weight.detach().double()
    rows = W.reshape(3, -1)
    W_hat = W / (1e-4 + rows.square().mean(1).sqrt()).reshape(3, 1, 1, 1) * (0.7 / 6.0) # fan_in 36
    torch.testing.assert_close(conv(x, gain=0.7), F.conv2d(x.double(), W_hat, padding=1).float(), rtol=1e-5, atol=1e-6)
    dense = networks_edm2.MPConv(4, 2, kernel=[]).eval()
    Wd = dense.weight.detach()
    Wd_hat = Wd / (1e-4 + Wd.square().mean(1, keepdim=True).sqrt()) / 2.0
    torch.testing.assert_close(dense(x[:, :, 0, 0]), x[:, :, 0, 0] @ Wd_hat.t(), rtol=1e-5, atol=1e-6)

    # Training mode: the stored weight is normalised in place (forced weight normalisation).
    conv.train()
    with torch.no_grad():
        conv.weight.mul_(3)
        conv(x)
    norms = conv.weight.detach().reshape(3, -1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full([3], 6.0), rtol=1e-3, atol=0) # unit RMS over 36

def test_attention_layout_matches_pytorch_attention():
    torch.manual_seed(1)
    block = randomized(networks_edm2.Block(16, 32, 8, flavor='dec', attention=True, channels_per_head=16))
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    assert block.num_heads == 2
    out = block(x, emb)

    # The same block by hand: residual part, then attention with q/k/v split per the layout.
    y = block.conv_res0(networks_edm2.mp_silu(x))
    c = block.emb_linear(emb, gain=block.emb_gain) + 1
    y = block.conv_res1(networks_edm2.mp_silu(y * c[:, :, None, None]))
    h = networks_edm2.mp_sum(block.conv_skip(x), y, t=0.3)
    qkv = block.attn_qkv(h).reshape(2, 32 * 3, 16)
    heads = []
    for head in range(2):
        parts = []
        for s in range(3):
            idx = torch.tensor([(head * 16 + j) * 3 + s for j in range(16)])
            p = qkv[:, idx, :].transpose(1, 2) # [N, pixels, c]
            parts.append(p / (1e-4 + p.square().mean(-1, keepdim=True).sqrt()))
        heads.append(F.scaled_dot_product_attention(*parts)) # softmax(q k^T / sqrt(c)) v
    att = torch.cat([o.transpose(1, 2) for o in heads], dim=1).reshape(2, 32, 4, 4)
    expected = networks_edm2.mp_sum(h, block.attn_proj(att), t=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

def test_preconditioner_formulas_logvar_and_labels():
    net = tiny_net()
    torch.manual_seed(2)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.02, 0.7, 30.0])
    labels = torch.eye(4)[[0, 3, 1]]
    D, logvar = net(x, sigma, labels, return_logvar=True)
    sd = 0.5
    s = sigma.reshape(-1, 1, 1, 1)
    F_x = net.unet(x / (sd ** 2 + s ** 2).sqrt(), sigma.log() / 4, labels)
    expected = sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * F_x
    torch.testing.assert_close(D, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net(x, sigma, labels), D, rtol=0, atol=0)
    assert logvar.shape == (3, 1, 1, 1)
    torch.testing.assert_close(logvar.flatten(), net.logvar_linear(net.logvar_fourier(sigma.log() / 4)).flatten())
    assert not torch.allclose(D, sd ** 2 / (s ** 2 + sd ** 2) * x, atol=1e-3) # the UNet matters

    # A 0-d float64 sigma with float64 x: float32 output; logvar [1,1,1,1].
    D0 = net(x.double(), torch.tensor(0.7, dtype=torch.float64), labels)
    assert D0.dtype == torch.float32
    torch.testing.assert_close(D0[1], D[1], rtol=1e-5, atol=1e-6)
    assert net(x, torch.tensor(0.7), labels, return_logvar=True)[1].shape == (1, 1, 1, 1)
    # No labels on a conditional net = zero labels; an unconditional net ignores labels.
    torch.testing.assert_close(net(x, sigma), net(x, sigma, torch.zeros(3, 4)))
    uncond = tiny_net(label_dim=0)
    torch.testing.assert_close(uncond(x, sigma, labels), uncond(x, sigma))

#----------------------------------------------------------------------------
# Snapshots in NVlabs' layout.

def nvlabs_snapshot(net, encoder):
    """What EDM2's training loop writes: an EasyDict with these keys, the net cast to float16."""
    ema = randomized(net).to(torch.float16)
    return dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dnnlib.EasyDict(
        class_name='training.dataset.ImageFolderDataset', path='data.zip', use_labels=True),
        loss_fn=networks_edm2.EDM2Loss(P_mean=-0.4, P_std=1.0), ema=ema)

def _fresh_source(monkeypatch, module):
    # Make the pickle embed a source text this process has not imported, so that loading it
    # with code allowed really executes it (in a new module), as it would in another program.
    src = persistence._module_to_src(module) + f'\n# embedded copy {id(monkeypatch)}\n'
    for value in vars(module).values():
        if persistence.is_persistent(value):
            monkeypatch.setattr(value, '_orig_module_src', src)

def test_snapshot_loads_safely_and_by_code_with_identical_outputs(monkeypatch):
    torch.manual_seed(0)
    net = networks_edm2.Precond(**TINY_KWARGS, logvar_channels=16, res_balance=0.4, concat_balance=0.6)
    data = nvlabs_snapshot(net, encoders_edm2.StandardRGBEncoder())
    with monkeypatch.context() as m:
        _fresh_source(m, networks_edm2)
        _fresh_source(m, encoders_edm2)
        blob = pickle.dumps(data)
    first = next(op for op in pickletools.genops(blob) if op[0].name in ('GLOBAL', 'STACK_GLOBAL', 'SHORT_BINUNICODE'))
    assert 'dnnlib.util' in str(first[1]) # an EasyDict at the top, as NVlabs writes it
    assert list(data) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']

    safe = safe_pickle.load(io.BytesIO(blob))
    before = set(sys.modules)
    code = safe_pickle.load(io.BytesIO(blob), allow_code=True)
    executed = set(sys.modules) - before
    assert any(name.startswith('_imported_module_') for name in executed) # the source did run
    assert type(safe['ema']) is networks_edm2.Precond
    assert type(code['ema']) is not networks_edm2.Precond and type(code['ema']).__name__ == 'Precond'
    assert next(code['ema'].parameters()).dtype == torch.float16 # as pickled
    assert safe['ema'].init_kwargs == net.init_kwargs
    assert safe['loss_fn'].P_mean == -0.4 and safe['dataset_kwargs']['use_labels'] is True
    assert isinstance(safe['encoder'], encoders_edm2.StandardRGBEncoder)

    torch.manual_seed(3)
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 5.0]), torch.eye(4)[[2, 0]]
    for args in [(x, sigma, labels), (x, sigma, None), (x.double(), torch.tensor(2.0, dtype=torch.float64), labels)]:
        a, b = safe['ema'](*args), code['ema'](*args)
        assert torch.equal(a, b)
    a, b = safe['ema'](x, sigma, labels, return_logvar=True), code['ema'](x, sigma, labels, return_logvar=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # The float16 values are what both compute from.
    ref = randomized(net).to(torch.float16).float()
    torch.testing.assert_close(safe['ema'](x, sigma, labels), ref(x, sigma, labels), rtol=0, atol=0)
    u8 = torch.randint(0, 256, [2, 3, 8, 8], dtype=torch.uint8)
    assert torch.equal(safe['encoder'].decode(safe['encoder'].encode(u8)), u8)
    assert torch.equal(code['encoder'].encode_latents(u8), safe['encoder'].encode_latents(u8))

def test_stability_vae_encoder_state_and_latent_scaling():
    enc = encoders_edm2.StabilityVAEEncoder(vae_name='some/vae', batch_size=4)
    data = dnnlib.EasyDict(encoder=enc, ema=tiny_net(img_channels=4))
    blob = pickle.dumps(data)
    for loaded in (safe_pickle.load(io.BytesIO(blob)), safe_pickle.load(io.BytesIO(blob), allow_code=True)):
        e = loaded['encoder']
        assert e.vae_name == 'some/vae' and e.batch_size == 4 and e._vae is None
        np.testing.assert_array_equal(e.scale, np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]))
        mean = torch.randn(2, 4, 3, 3)
        raw = torch.cat([mean, torch.zeros_like(mean)], dim=1) # zero std: deterministic
        expected = (mean - torch.tensor([5.81, 3.25, 0.12, -2.15]).reshape(1, 4, 1, 1)) * \
            (0.5 / torch.tensor([4.17, 4.62, 3.71, 3.28])).reshape(1, 4, 1, 1)
        torch.testing.assert_close(e.encode_latents(raw), expected, rtol=1e-5, atol=1e-5)

#----------------------------------------------------------------------------
# Loading with code allowed: a failed embedded module.

class _Embedded:
    def __init__(self, src, class_name):
        self.meta = dict(type='class', version=6, module_src=src, class_name=class_name, state={})

    def __reduce__(self):
        return (persistence._reconstruct_persistent_obj, (self.meta,))

def test_failed_embedded_module_is_one_line_and_does_not_poison_the_cache():
    src = 'import _no_such_module_for_this_test\nclass Thing:\n    pass\n'
    blob = pickle.dumps(dict(loss_fn=_Embedded(src, 'Thing')))
    before = set(sys.modules)
    for _ in range(2): # the second try fails the same way, not with a KeyError
        with pytest.raises(ImportError) as info:
            safe_pickle.load(io.BytesIO(blob), allow_code=True)
        message = str(info.value)
        assert '_no_such_module_for_this_test' in message and '\n' not in message
        assert 'pip install _no_such_module_for_this_test' in message
    assert not [m for m in set(sys.modules) - before if m.startswith('_imported_module_')]
    assert src not in persistence._src_to_module_dict
    # Other pickles still load with code allowed.
    good = 'from torch_utils import persistence\n@persistence.persistent_class\nclass Thing:\n    pass\n'
    loaded = safe_pickle.load(io.BytesIO(pickle.dumps(dict(x=_Embedded(good, 'Thing')))), allow_code=True)
    assert type(loaded['x']).__name__ == 'Thing'

#----------------------------------------------------------------------------
# EDM2 snapshots as teachers: --teacher, --gen teacher, generate.py, fid.py.

def write_snapshot(path, net, encoder):
    with open(path, 'wb') as f:
        pickle.dump(nvlabs_snapshot(net, encoder), f)
    return str(path)

def test_edm2_teacher_from_a_snapshot(tmp_path):
    from refine import teachers, teachers_edm2 # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    net = networks_edm2.Precond(**TINY_KWARGS, sigma_data=0.6)
    path = write_snapshot(tmp_path / 'edm2.pkl', net, encoders_edm2.StandardRGBEncoder())
    ref = randomized(net).to(torch.float16).float()
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 3.0]), torch.eye(4)[[1, 3]]
    for allow_code in (False, True):
        teacher = teachers.load_teacher(path, allow_code=allow_code)
        assert isinstance(teacher, teachers_edm2.EDM2Teacher) and teacher.encoder is None # pixels
        assert teacher.sigma_data == 0.6 and teacher.shape == (3, 8, 8) and teacher.label_dim == 4
        assert (teacher.sigma_min, teacher.sigma_max) == (0.002 * 1.2, 80.0 * 1.2)
        assert torch.equal(teacher(x, sigma, labels), ref(x, sigma, labels))
        assert torch.equal(teacher.logvar(sigma), ref(x, sigma, labels, return_logvar=True)[1])

def test_refine_through_a_pixel_edm2_teacher_and_generate_from_the_snapshot(tmp_path):
    from tests.refine_checks import refine_snapshot_resume_generate # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    net = networks_edm2.Precond(**dict(TINY_KWARGS, label_dim=0))
    path = write_snapshot(tmp_path / 'edm2.pkl', net, encoders_edm2.StandardRGBEncoder())
    _, data, _ = refine_snapshot_resume_generate(path, tmp_path, 8, networks_edm2.Precond)
    assert 'encoder' not in data
    # generate.py samples the EDM2 snapshot itself with EDM's Heun sampler.
    from refine import generation # pylint: disable=import-outside-toplevel
    sample, meta = generation.load_for_generation(path, sampler_kwargs=dict(num_steps=4))
    assert meta.kind == 'edm-teacher' and sample([0, 1]).shape == (2, 3, 8, 8)

def tiny_vae(folder):
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(7)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=8).eval()
    vae.save_pretrained(folder)
    return vae

def test_latent_edm2_teacher_end_to_end(tmp_path):
    """A tiny latent EDM2 model with a (random) SD-style VAE: the generator works on 4x4x4
    latents, snapshots carry the encoder, generate.py writes decoded 8x8 PNGs, fid.py reads them."""
    from click.testing import CliRunner # pylint: disable=import-outside-toplevel
    import fid # pylint: disable=import-outside-toplevel
    import PIL.Image # pylint: disable=import-outside-toplevel
    from refine import teachers # pylint: disable=import-outside-toplevel
    from torch_utils.rng import StackedRandomGenerator # pylint: disable=import-outside-toplevel
    from tests.refine_checks import refine_snapshot_resume_generate # pylint: disable=import-outside-toplevel
    vae = tiny_vae(tmp_path / 'vae')
    torch.manual_seed(0)
    net = networks_edm2.Precond(**dict(TINY_KWARGS, img_resolution=4, img_channels=4, attn_resolutions=[2], label_dim=0))
    encoder = encoders_edm2.StabilityVAEEncoder(vae_name=str(tmp_path / 'vae'))
    path = write_snapshot(tmp_path / 'edm2-latent.pkl', net, encoder)

    teacher = teachers.load_teacher(path)
    assert teacher.shape == (4, 4, 4) and teacher.encoder.vae_name == str(tmp_path / 'vae')
    # EDM2's decoding: undo the per-channel scaling, VAE decode, [0, 1] -> uint8 by truncation.
    z = torch.randn(2, 4, 4, 4)
    raw = (z - torch.as_tensor(encoder.bias).reshape(1, 4, 1, 1)) / torch.as_tensor(encoder.scale).reshape(1, 4, 1, 1)
    with torch.no_grad():
        expected = (vae.decode(raw).sample.clamp(0, 1) * 255).to(torch.uint8)
    assert torch.equal(teacher.encoder.decode(z), expected)

    snap, data, out = refine_snapshot_resume_generate(path, tmp_path, 8, networks_edm2.Precond)
    assert isinstance(data['encoder'], encoders_edm2.StabilityVAEEncoder)
    assert data['G_ema'].z_shape == (4, 4, 4) # the generator works in latent space
    # The PNG of seed 0 is the decoded latent of seed 0.
    with torch.no_grad():
        latent = data['G_ema'](StackedRandomGenerator('cpu', [0]).randn([1, 4, 4, 4]))
        pixels = data['encoder'].decode(latent)[0].permute(1, 2, 0).numpy()
    assert (np.asarray(PIL.Image.open(out / '000000.png')) == pixels).all()

    ref = tmp_path / 'ref'
    ref.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        PIL.Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()).save(ref / f'{i}.png')
    for source in (['--images', str(out)], ['--network', snap, '--seeds', '0-3']):
        result = CliRunner().invoke(fid.main, ['calc', *source, '--ref', str(ref), '--detector', 'fast',
            '--num', '4'], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert float(result.stdout.strip().splitlines()[-1]) > 0
