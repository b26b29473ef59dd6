"""The MLP generator's slots: z[:, 0] picks one of `slots` equally likely learned codes, so a
generator's mass can sit on separated mixture components without bridges between them."""

import numpy as np
import pytest
import scipy.stats
import torch

from refine import generators, run, teachers
from torch_utils import persistence, safe_pickle
from training import networks_mlp

def _slots_of(z, slots):
    """Slot index of each latent, computed here with scipy: floor(slots * Phi(z_0))."""
    return np.minimum((scipy.stats.norm.cdf(z[:, 0].double().numpy()) * slots).astype(np.int64), slots - 1)

def test_slots_are_equally_likely_and_each_sample_sees_only_its_own_code():
    torch.manual_seed(0)
    G = networks_mlp.MLPGenerator(z_dim=3, dim=2, hidden=32, num_layers=2, slots=8, code_dim=4)
    z = torch.randn(80000, 3, generator=torch.Generator().manual_seed(1))
    k = _slots_of(z, 8)
    np.testing.assert_allclose(np.bincount(k, minlength=8) / len(z), 1 / 8, atol=0.005)
    x = G(z).detach()
    with torch.no_grad():
        G.codes[3] += 1.0 # moves the samples of slot 3, no other
    y = G(z).detach()
    moved = (y - x).abs().amax(1) > 0
    assert np.array_equal(moved.numpy(), k == 3)
    # The continuous coordinates still matter within a slot.
    z2 = z[:2].clone()
    z2[1, 0] = z2[0, 0]
    assert not torch.equal(G(z2)[0], G(z2)[1])

def test_codes_get_gradients_only_from_their_samples():
    torch.manual_seed(0)
    G = networks_mlp.MLPGenerator(z_dim=3, dim=2, hidden=32, num_layers=2, slots=16)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    G(z).square().sum().backward()
    used = set(_slots_of(z, 16).tolist())
    for slot in range(16):
        assert bool(G.codes.grad[slot].abs().sum() > 0) == (slot in used), slot

def test_slot_generator_pickles_and_loads_safely_bit_exact(tmp_path):
    t = teachers.load_teacher('gmm:ring8')
    torch.manual_seed(0)
    G, _ = generators.build_generator('mlp', t, mlp_kwargs=dict(hidden=32, slots='auto'))
    assert G.net.slots == generators.auto_slots(t) == 64 and tuple(G.z_shape) == (3,)
    path = str(tmp_path / 'g.pkl')
    persistence.save_network_pkl(dict(G_ema=G), path)
    loaded = safe_pickle.load_network_pkl(path)['G_ema']
    z = torch.randn(64, 3)
    assert torch.equal(loaded(z), G(z))

def test_auto_slot_count_and_option_errors(tmp_path):
    assert generators.auto_slots(teachers.load_teacher('gmm:mog40')) == 320
    assert generators.auto_slots(teachers.make_gmm('grid25')) == 200
    many = teachers.GMMTeacher(means=torch.randn(100, 2) * 5, std=0.1)
    assert generators.auto_slots(many) == 512
    with pytest.raises(ValueError, match='--mlp-slots applies to --gen mlp'):
        run.resolve_options(dict(teacher='edm.pkl', gen='teacher', mlp_slots=4))
    G = networks_mlp.MLPGenerator(z_dim=3, dim=2, hidden=8, num_layers=1, slots=4)
    with pytest.raises(ValueError, match='latents of 3 numbers'):
        G(torch.randn(6, 2))
    # A plain MLP (slots 0) is what --mlp-slots 0 and runs saved before slots existed build.
    o = run.resolve_options(dict(teacher='gmm:ring8', gen='mlp', mlp_slots=0, allow_pickle_code=False))
    setup = run.prepare(o)
    assert setup.G.net.slots == 0 and tuple(setup.G.z_shape) == (2,) and o.mlp_slots == 0
