"""training/conv_discriminator.py: the logit against an independent torch.nn computation, and
pickles that the safe loader rebuilds without running their code."""

import io
import math
import pickle

import torch

from torch_utils import persistence, safe_pickle
from training.conv_discriminator import ConvDiscriminator

def reference_logits(D, img, c):
    """The same network from torch.nn layers: 4x4 stride-2 convs + leaky ReLU, a linear
    read-out and the projection term <embed(c), h> / sqrt(len(h))."""
    x = img
    for idx in range(D.num_convs):
        weight = getattr(D, f'conv{idx}_weight')
        conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 4, stride=2, padding=1)
        conv.weight.data.copy_(weight)
        conv.bias.data.copy_(getattr(D, f'conv{idx}_bias'))
        x = torch.nn.LeakyReLU(0.2)(conv(x))
    h = x.reshape(x.shape[0], -1)
    out = h @ D.out_weight.t() + D.out_bias
    if c is not None:
        out = out + ((c @ D.embed_weight.t()) * h).sum(1, keepdim=True) / math.sqrt(h.shape[1])
    return out

def test_logits_match_torch_nn_reference_and_depend_on_the_label():
    torch.manual_seed(0)
    D = ConvDiscriminator(c_dim=10, img_resolution=32, img_channels=1)
    assert D.num_convs == 3 and D.num_features == 128 * 16
    img, c = torch.randn(5, 1, 32, 32), torch.eye(10)[[0, 3, 3, 7, 9]]
    with torch.no_grad():
        got, expected = D(img, c), reference_logits(D, img, c)
    assert got.shape == (5, 1)
    assert torch.allclose(got, expected, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(D(img, torch.eye(10)[[1, 1, 1, 1, 1]]), got)

def test_unconditional_and_default_init_bounds():
    torch.manual_seed(1)
    D = ConvDiscriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=8, channel_max=16)
    assert D.embed_weight is None and D.num_convs == 2
    # PyTorch's default init: |w| <= 1/sqrt(fan_in), and the bound is nearly reached.
    bound = 1 / math.sqrt(3 * 16)
    assert D.conv0_weight.abs().max() <= bound and D.conv0_weight.abs().max() > 0.95 * bound
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(D(img, None), reference_logits(D, img, None), atol=1e-6)

def test_safe_load_rebuilds_it_with_identical_outputs():
    torch.manual_seed(2)
    D = ConvDiscriminator(c_dim=3, img_resolution=8, img_channels=1).eval()
    buf = io.BytesIO()
    pickle.dump(dict(D=D), buf)
    safe = safe_pickle.load(io.BytesIO(buf.getvalue()))['D']
    unsafe = safe_pickle.load(io.BytesIO(buf.getvalue()), allow_code=True)['D']
    assert type(safe) is ConvDiscriminator # rebuilt as our class, nothing from the file ran
    assert persistence.is_persistent(type(unsafe))
    img, c = torch.randn(3, 1, 8, 8), torch.eye(3)
    with torch.no_grad():
        assert torch.equal(safe(img, c), D(img, c))
        assert torch.equal(unsafe(img, c), D(img, c))
