"""Post-hoc EMA (training/phema.py): the profile maths against direct computations, and a
reconstruction from EDM2-layout snapshots against an EMA tracked with the target length."""

import os
import pickle

import numpy as np
import pytest
import torch

import dnnlib
from refine import teachers
from torch_utils import safe_pickle
from training import encoders_edm2, networks_edm2, phema

def _trapezoid(y, x): # numpy 1.x has no np.trapezoid, numpy 2.x deprecates np.trapz
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))

def test_exponent_and_relative_std():
    # The interface document's values of EDM2's own function.
    for std, exp in [(0.010, 96.9949), (0.050, 16.9722), (0.100, 6.9372), (0.150, 3.5579), (0.200, 1.8262), (0.250, 0.7198)]:
        assert abs(phema.std_to_exp(std) - exp) < 1e-4
        assert abs(phema.exp_to_std(phema.std_to_exp(std)) - std) < 1e-12
    # sigma_rel is the profile's std over t: check by integration.
    t, g = 5.0, 3.0
    tau = np.linspace(0, t, 200001)
    p = (g + 1) * tau ** g / t ** (g + 1)
    mean = _trapezoid(tau * p, tau)
    assert abs(np.sqrt(_trapezoid((tau - mean) ** 2 * p, tau)) / t - phema.exp_to_std(g)) < 1e-6
    with pytest.raises(ValueError, match='sigma_rel'):
        phema.std_to_exp(0.29)

def test_profile_inner_product_by_integration():
    for t_a, g_a, t_b, g_b in [(3.0, 2.0, 5.0, 7.0), (5.0, 7.0, 3.0, 2.0), (4.0, 0.5, 4.0, 12.0)]:
        tau = np.linspace(0, min(t_a, t_b), 400001)
        p_a = (g_a + 1) * tau ** g_a / t_a ** (g_a + 1)
        p_b = (g_b + 1) * tau ** g_b / t_b ** (g_b + 1)
        assert abs(phema.profile_inner(t_a, g_a, t_b, g_b) / _trapezoid(p_a * p_b, tau) - 1) < 1e-6

def test_a_target_equal_to_an_input_gets_that_input():
    times = [8192 * k for k in range(1, 5) for _ in range(2)]
    stds = [0.05, 0.10] * 4
    X = phema.solve_weights(times, stds, times[-1], [0.10, 0.05])
    np.testing.assert_allclose(X[:, 0], np.eye(8)[7], atol=1e-6)
    np.testing.assert_allclose(X[:, 1], np.eye(8)[6], atol=1e-6)

def tiny_net():
    torch.manual_seed(0)
    return networks_edm2.Precond(img_resolution=4, img_channels=1, label_dim=0, model_channels=8,
        channel_mult=[1], num_blocks=1, attn_resolutions=[])

def test_reconstruction_from_snapshots_matches_a_tracked_ema(tmp_path):
    """Train along a known smooth path, track sigma_rel 0.05 and 0.10 (as EDM2 does) and 0.15
    directly; the 0.15 reconstructed from the snapshots matches the tracked one."""
    net = tiny_net().train()
    start = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(1)
    u = [torch.randn(p.shape, generator=g) for p in start]
    v = [torch.randn(p.shape, generator=g) for p in start]
    tracked = phema.PowerFunctionEMA(net, stds=[0.05, 0.10])
    truth = phema.PowerFunctionEMA(net, stds=[0.15])
    batch, steps, every = 1024, 96, 8
    for step in range(1, steps + 1):
        s = step / steps
        with torch.no_grad():
            for p, p0, a, b in zip(net.parameters(), start, u, v):
                p.copy_(p0 + np.sin(3 * s) * a + s ** 2 * b)
        tracked.update(step * batch, batch)
        truth.update(step * batch, batch)
        if step % every == 0:
            for ema, suffix in tracked.get():
                data = dnnlib.EasyDict(encoder=encoders_edm2.StandardRGBEncoder(), dataset_kwargs=dnnlib.EasyDict(),
                    loss_fn=networks_edm2.EDM2Loss(), ema=ema.to(torch.float16))
                with open(tmp_path / f'network-snapshot-{step * batch // 1000:07d}{suffix}.pkl', 'wb') as f:
                    pickle.dump(data, f)
                ema.to(torch.float32)

    out = tmp_path / 'out'
    assert phema.main(['--indir', str(tmp_path), '--outdir', str(out), '--std', '0.15,0.05']) == None
    names = sorted(os.listdir(out))
    assert names == [f'phema-{steps * batch // 1000:07d}-0.050.pkl', f'phema-{steps * batch // 1000:07d}-0.150.pkl']
    rebuilt = safe_pickle.load_network_pkl(str(out / names[1]))
    assert list(rebuilt) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    assert isinstance(rebuilt['ema'], networks_edm2.Precond)
    with open(out / names[1], 'rb') as f: # stored in float16, as EDM2's
        assert all(p.dtype == torch.float16 for p in safe_pickle.load(f, allow_code=True)['ema'].parameters())
    expected = truth.get()[0][0]
    diff = torch.cat([(a - b).flatten() for a, b in zip(rebuilt['ema'].parameters(), expected.parameters())])
    travel = torch.cat([(b - p0).flatten() for b, p0 in zip(expected.parameters(), start)])
    err = float(diff.norm() / travel.norm())
    print(f'reconstructed vs tracked sigma_rel 0.15: error {err:.2e} of the parameters\' travel (L2)')
    assert err < 3e-3
    # The 0.05 profile is one of the inputs: reconstructed exactly (to float16 rounding).
    same = safe_pickle.load_network_pkl(str(out / names[0]))['ema']
    for a, b in zip(same.parameters(), tracked.get()[0][0].parameters()):
        torch.testing.assert_close(a, b.to(torch.float16).float(), rtol=2e-3, atol=1e-3)
    # A reconstruction is a teacher.
    assert teachers.load_teacher(str(out / names[1])).sigma_data == 0.5
