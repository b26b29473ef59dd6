"""StyleGAN3 networks (configs -t and -r): the layer schedules of the interface tables, pickle
round trips in NVlabs' snapshot layout (safe loader vs the code-executing loader), independent
checks of the Fourier input, the modulated convolution, the filter design, a whole layer and
the mapping network, and a refinement run from a StyleGAN3 pickle."""

import ast
import collections
import copy
import glob
import io
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import dnnlib
import generate
from refine import generators
from torch_utils import persistence, safe_pickle
from training import networks_edm
from training import networks_stylegan2 as sg2
from training import networks_stylegan3 as sg3
from tests.test_refine_e2e import _load_cli, _run_dir

Z_DIM = W_DIM = 8
RES = 16

# name: Generator kwargs beyond z/w/img (small channel counts, real schedules).
CONFIGS = {
    't-uncond': dict(c_dim=0, img_channels=3, channel_base=256, channel_max=8),
    'r-cond':   dict(c_dim=3, img_channels=3, channel_base=512, channel_max=8, conv_kernel=1,
                     use_radial_filters=True, conv_clamp=None, num_fp16_res=0),
}

def _perturb(net, seed):
    """Random values in every trained tensor and EMA (most start at 0 or 1); filters, Fourier
    frequencies and phases keep their designed values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            leaf = name.split('.')[-1]
            if leaf in ('up_filter', 'down_filter', 'freqs', 'phases', 'transform'):
                continue
            if leaf == 'magnitude_ema':
                t.copy_(torch.rand([], generator=g) * 1.5 + 0.5)
            else:
                t.add_(torch.randn(t.shape, generator=g) * 0.3)
    return net

def make_G(c_dim=0, img_channels=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    G = sg3.Generator(z_dim=Z_DIM, c_dim=c_dim, w_dim=W_DIM, img_resolution=RES,
        img_channels=img_channels, mapping_kwargs=dict(num_layers=2), magnitude_ema_beta=0.9, **kwargs)
    return _perturb(G, seed + 100)

def _user_transform(angle_deg, tx, ty):
    """What gen_images.py writes into the transform buffer: the inverse of the wanted transform."""
    a = angle_deg / 180 * np.pi
    m = np.array([[np.cos(a), np.sin(a), tx], [-np.sin(a), np.cos(a), ty], [0, 0, 1]])
    return torch.from_numpy(np.linalg.inv(m)).float()

def _inputs(c_dim, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn([n, Z_DIM], generator=g)
    c = torch.eye(c_dim)[torch.randint(0, c_dim, [n], generator=g)] if c_dim else torch.zeros([n, 0])
    return z, c

def _for_pickle(module):
    return copy.deepcopy(module).eval().requires_grad_(False).cpu()

class _Forged:
    """Pickles as a persistent object with the given meta (class name, source, state)."""
    def __init__(self, meta):
        self.meta = meta
    def __reduce__(self):
        return (persistence._reconstruct_persistent_obj, (self.meta,))

@pytest.fixture
def fresh_sources():
    """Call the returned function to forget which sources belong to live modules, so that the
    code loader must exec them (after copying and pickling, which need the live sources)."""
    saved = dict(persistence._src_to_module_dict)
    yield persistence._src_to_module_dict.clear
    persistence._src_to_module_dict.clear()
    persistence._src_to_module_dict.update(saved)

#----------------------------------------------------------------------------
# Layer schedules: the interface doc's measured tables (B.6).

DOC_T16 = dict(z_dim=32, w_dim=32, mapping_kwargs=dict(num_layers=2), channel_base=512, channel_max=32,
    magnitude_ema_beta=0.9988915792636801, num_fp16_res=4, conv_clamp=256, c_dim=0, img_resolution=16, img_channels=3)
DOC_R16 = dict(z_dim=32, w_dim=32, mapping_kwargs=dict(num_layers=2), channel_base=1024, channel_max=64,
    magnitude_ema_beta=0.9988915792636801, num_fp16_res=4, conv_clamp=256, conv_kernel=1,
    use_radial_filters=True, c_dim=4, img_resolution=16, img_channels=3)
CUTOFFS_16 = [2.0, 2.2449, 2.5198, 2.8284, 3.1748, 3.5636, 4.0, 4.4898, 5.0397, 5.6569, 6.3496, 7.1272, 8.0, 8.0, 8.0]
HALF_WIDTHS_16 = [6.0, 5.7551, 5.4802, 5.1716, 4.8252, 4.4364, 4.0, 3.5102, 2.9603, 2.3431, 2.2246, 2.0624, 1.8492, 1.8492, 1.8492]

def _rows_16(ch, pad, pad13):
    rows = [(f'L{i}_36_{ch}', 36, 36, 16, 16, 2, 2, 12, 12, pad, i >= 12) for i in range(13)]
    rows.append((f'L13_16_{ch}', 36, 16, 16, 16, 2, 2, 12, 12, pad13, True))
    rows.append(('L14_16_3', 16, 16, 16, 16, 1, 1, 1, 1, [0, 0, 0, 0], True))
    return rows

# (name, in size, out size, in s, out s, up, down, up taps, down taps, padding, critical)
SCHEDULES = {
    't16': (DOC_T16, _rows_16(32, [9, 8, 9, 8], [-11, -12, -11, -12]), 148679, 114),
    'r16': (DOC_R16, _rows_16(64, [11, 10, 11, 10], [-9, -10, -9, -10]), 97639, 116),
}
_SIZES_1024 = [(36, 36, 16, 16), (36, 36, 16, 16), (36, 52, 16, 32), (52, 52, 32, 32), (52, 84, 32, 64),
    (84, 148, 64, 128), (148, 148, 128, 128), (148, 276, 128, 256), (276, 276, 256, 256), (276, 532, 256, 512),
    (532, 1044, 512, 1024), (1044, 1044, 1024, 1024), (1044, 1044, 1024, 1024), (1044, 1024, 1024, 1024),
    (1024, 1024, 1024, 1024)]

def _rows_1024(names, pad2, pad4, pad13):
    rows = []
    for i, (name, (si, so, ri, ro)) in enumerate(zip(names, _SIZES_1024)):
        up = 1 if i == 14 else 2 * ro // ri
        taps = (1, 1) if i == 14 else (6 * up, 12)
        pad = [0, 0, 0, 0] if i == 14 else pad13 if i == 13 else pad4 if up == 4 else pad2
        rows.append((name, si, so, ri, ro, up, 1 if i == 14 else 2, *taps, pad, i >= 12))
    return rows

SCHEDULES['t1024'] = (dict(z_dim=512, w_dim=512, c_dim=0, img_resolution=1024, img_channels=3),
    _rows_1024(['L0_36_512', 'L1_36_512', 'L2_52_512', 'L3_52_512', 'L4_84_512', 'L5_148_512', 'L6_148_512',
        'L7_276_323', 'L8_276_203', 'L9_532_128', 'L10_1044_81', 'L11_1044_51', 'L12_1044_32', 'L13_1024_32',
        'L14_1024_3'], [9, 8, 9, 8], [-6, -9, -6, -9], [-11, -12, -11, -12]), None, 114)
SCHEDULES['r1024'] = (dict(z_dim=512, w_dim=512, c_dim=0, img_resolution=1024, img_channels=3,
        channel_base=65536, channel_max=1024, conv_kernel=1, use_radial_filters=True),
    _rows_1024(['L0_36_1024', 'L1_36_1024', 'L2_52_1024', 'L3_52_1024', 'L4_84_1024', 'L5_148_1024',
        'L6_148_1024', 'L7_276_645', 'L8_276_406', 'L9_532_256', 'L10_1044_161', 'L11_1044_102',
        'L12_1044_64', 'L13_1024_64', 'L14_1024_3'], [11, 10, 11, 10], [-2, -5, -2, -5], [-9, -10, -9, -10]), None, 114)
SYNTHESIS_PARAMS_1024 = dict(t1024=21787855, r1024=14567839)

@pytest.mark.parametrize('name', sorted(SCHEDULES))
def test_schedule_matches_interface_tables(name):
    kwargs, rows, total_params, sd_entries = SCHEDULES[name]
    torch.manual_seed(0)
    G = sg3.Generator(**kwargs)
    s = G.synthesis
    radial = kwargs.get('use_radial_filters', False)
    k = kwargs.get('conv_kernel', 3)
    assert s.layer_names == [row[0] for row in rows] and G.num_ws == s.num_ws == 16
    assert s.input.size == [36, 36] and s.input.sampling_rate == 16 and s.input.bandwidth == 2
    fp16_from = 0 if kwargs['img_resolution'] == 16 else 5 # L5 and up sample at >= 128 = 1024 / 2**3
    for idx, (lname, si, so, ri, ro, up, down, ut, dt, pad, crit) in enumerate(rows):
        L = getattr(s, lname)
        assert (L.in_size, L.out_size, L.in_sampling_rate, L.out_sampling_rate) == ([si, si], [so, so], ri, ro), lname
        assert (L.up_factor, L.down_factor, L.up_taps, L.down_taps, L.padding) == (up, down, ut, dt, pad), lname
        assert L.is_critically_sampled == crit and L.is_torgb == (idx == 14) and L.use_fp16 == (idx >= fp16_from)
        assert L.tmp_sampling_rate == max(ri, ro) * (1 if idx == 14 else 2)
        assert L.down_radial == (radial and not crit)
        assert L.conv_kernel == (1 if idx == 14 else k) and tuple(L.weight.shape[2:]) == (L.conv_kernel,) * 2
        if idx == 14:   # 1 tap: registered as None, absent from the state
            assert '_buffers' in vars(L) and L._buffers['up_filter'] is None and L._buffers['down_filter'] is None
            assert 'up_filter' not in L.state_dict()
        else:           # up filters are never radial
            assert L.up_filter.shape == (ut,) and L.down_filter.shape == ((dt, dt) if L.down_radial else (dt,))
            assert abs(float(L.up_filter.sum()) - 1) < 1e-6 and abs(float(L.down_filter.sum()) - 1) < 1e-6
        if kwargs['img_resolution'] == 16:
            p = max(idx - 1, 0) # the input side is the previous layer's output side
            assert math.isclose(L.in_cutoff, CUTOFFS_16[p], abs_tol=1e-4)
            assert math.isclose(L.out_cutoff, CUTOFFS_16[idx], abs_tol=1e-4)
            assert math.isclose(L.in_half_width, HALF_WIDTHS_16[p], abs_tol=1e-4)
            assert math.isclose(L.out_half_width, HALF_WIDTHS_16[idx], abs_tol=1e-4)
    if total_params is not None:
        assert sum(p.numel() for p in G.parameters()) == total_params
        np.testing.assert_allclose(s.L1_36_32.up_filter[:3] if not radial else s.L1_36_64.up_filter[:3],
            [0.000792, 0.010018, 0.03895], atol=1e-6) # the doc's spot check
    else:
        assert sum(p.numel() for p in s.parameters()) == SYNTHESIS_PARAMS_1024[name]
    assert len(G.state_dict()) == sd_entries
    # Synthesis is built before mapping, and each module lists its own tensors before affine.*.
    names = [n for n, _ in G.named_parameters()]
    assert names[0] == 'synthesis.input.weight' and names[1] == 'synthesis.input.affine.weight'
    assert names.index('mapping.fc0.weight') > names.index(f'synthesis.{rows[-1][0]}.affine.bias')
    assert [n for n, _ in getattr(s, rows[1][0]).named_buffers()] == ['magnitude_ema', 'up_filter', 'down_filter']
    assert [n for n, _ in s.input.named_buffers()] == ['transform', 'freqs', 'phases']

#----------------------------------------------------------------------------
# Pickles: NVlabs' snapshot layout, both loaders, bitwise-identical outputs.

def _snapshot(name):
    kwargs = CONFIGS[name]
    c_dim, img_channels = kwargs['c_dim'], kwargs['img_channels']
    G, G_ema = make_G(seed=0, **kwargs), make_G(seed=1, **kwargs)
    G_ema.synthesis.input.transform.copy_(_user_transform(12, 0.1, -0.2))
    torch.manual_seed(2)
    D = _perturb(sg2.Discriminator(c_dim=c_dim, img_resolution=RES, img_channels=img_channels,
        channel_base=256, channel_max=16, mapping_kwargs=dict(num_layers=2),
        epilogue_kwargs=dict(mbstd_group_size=2)), 202)
    return dict(G=_for_pickle(G), D=_for_pickle(D), G_ema=_for_pickle(G_ema), augment_pipe=None,
        training_set_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='x.zip',
            use_labels=c_dim > 0, max_size=10, xflip=False, resolution=RES, random_seed=0))

def _records(raw):
    """Every persistent record in a pickle, read without rebuilding anything."""
    found = []
    def walk(obj):
        if isinstance(obj, safe_pickle.PickledObject):
            found.append(obj)
            for child in (obj.state.get('_modules') or {}).values():
                walk(child)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
    walk(safe_pickle._RestrictedUnpickler(io.BytesIO(raw)).load())
    return found

def _globals(raw):
    """(module, name) of every global the pickle refers to (read by the restricted unpickler)."""
    found = set()
    class Recorder(safe_pickle._RestrictedUnpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)
    Recorder(io.BytesIO(raw)).load()
    return found

@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_snapshot_round_trip_safe_equals_code(name, fresh_sources):
    data = _snapshot(name)
    c_dim, img_channels = CONFIGS[name]['c_dim'], CONFIGS[name]['img_channels']
    raw = pickle.dumps(data)
    # NVlabs' layout: one record per persistent module, the networks file embedded once.
    records = _records(raw)
    classes = {r.class_name for r in records if 'class SynthesisInput' in r.module_src}
    assert classes == {'Generator', 'MappingNetwork', 'FullyConnectedLayer', 'SynthesisNetwork',
        'SynthesisInput', 'SynthesisLayer'}
    assert raw.count(b'class SynthesisInput(torch.nn.Module)') == 1
    # No numpy objects at all (numpy 2 would name numpy._core, which numpy 1 cannot load).
    assert b'numpy._core' not in raw and not any(m.startswith('numpy') for m, _ in _globals(raw))
    assert ('torch_utils.persistence', '_reconstruct_persistent_obj') in _globals(raw)
    assert records[0].state['_init_kwargs']['mapping_kwargs'] == dict(num_layers=2)

    fresh_sources()
    safe = safe_pickle.load(io.BytesIO(raw))
    code = safe_pickle.load(io.BytesIO(raw), allow_code=True)
    assert list(safe) == list(data) and list(code) == list(data)
    assert safe['augment_pipe'] is None and safe['training_set_kwargs'] == data['training_set_kwargs']
    for key in ['G', 'D', 'G_ema']:
        assert type(safe[key]) is type(data[key])                          # rebuilt as our class
        assert type(code[key]).__module__.startswith('_imported_module_')  # the embedded source ran
        assert not safe[key].training and not any(p.requires_grad for p in safe[key].parameters())
        ref = data[key].state_dict()
        for other in [safe[key], code[key]]:
            sd = other.state_dict()
            assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert safe['G_ema'].synthesis.L14_16_3._buffers['up_filter'] is None

    z, c = _inputs(c_dim)
    with torch.no_grad():
        for key in ['G', 'G_ema']:
            for kwargs in [dict(), dict(truncation_psi=0.7, truncation_cutoff=3), dict(truncation_psi=0.5),
                    dict(noise_mode='const', force_fp32=True)]:
                out = [net(z, c, **kwargs) for net in [data[key], safe[key], code[key]]]
                assert out[0].shape == (4, img_channels, RES, RES) and out[0].dtype == torch.float32
                assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
            ws = data[key].mapping(z, c, truncation_psi=0.7)
            assert torch.equal(data[key].synthesis(ws), data[key](z, c, truncation_psi=0.7))
        img = data['G_ema'](z, c)
        logits = [net(img, c) for net in [data['D'], safe['D'], code['D']]]
        assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
        # G and G_ema really differ, so the comparisons could fail.
        assert not torch.equal(data['G'](z, c), img)
        assert float(img.std()) > 1e-3

        # update_emas moves w_avg and every magnitude_ema the same way under both loaders.
        nets = [copy.deepcopy(data['G']), safe['G'], code['G']]
        outs = [net(z, c, update_emas=True) for net in nets]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        moved = [k for k, v in nets[0].state_dict().items() if not torch.equal(v, data['G'].state_dict()[k])]
        assert sorted(moved) == sorted(k for k in moved if k.endswith(('w_avg', 'magnitude_ema')))
        assert len(moved) == 1 + 15
        for net in nets[1:]:
            assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), nets[0].state_dict().values()))

    # Pickled again, the safe-loaded networks are the same records: classes, embedded source,
    # every attribute and every tensor (None filters included).
    again, first = _records(pickle.dumps(dict(G_ema=safe['G_ema']))), _records(pickle.dumps(dict(G_ema=data['G_ema'])))
    # G, synthesis, input and its affine, 15 layers and their affines, mapping, 2 fcs (+ embed)
    assert len(again) == len(first) == 1 + 1 + 2 + 30 + 1 + 2 + (c_dim > 0)
    for a, b in zip(again, first):
        assert (a.class_name, a.module_src) == (b.class_name, b.module_src)
        assert list(a.state) == list(b.state)
        for key, value in a.state.items():
            if key in ('_parameters', '_buffers'):
                assert list(value) == list(b.state[key])
                assert all((v is None and b.state[key][k] is None) or torch.equal(v, b.state[key][k]) for k, v in value.items())
            elif key != '_modules':
                assert value == b.state[key], (a.class_name, key)

# Stands in for NVlabs' own networks_stylegan3.py: the safe loader must never run it.
_FOREIGN_SRC = ("raise SystemExit('the embedded source ran')\n"
    "class SynthesisInput(torch.nn.Module): pass\nclass SynthesisLayer(torch.nn.Module): pass\n")
_NUMPY_ARRAYS = ('size', 'in_size', 'out_size')
_NUMPY_FLOATS = ('sampling_rate', 'bandwidth', 'in_cutoff', 'out_cutoff', 'in_half_width', 'out_half_width', 'weight_gain')

def _nvlabs_style(module):
    """A module tree as NVlabs' code pickles it: numpy arrays and float64 scalars among the
    attributes, EasyDicts in the recorded kwargs, and (here) a source that is not ours."""
    state = dict(vars(module))
    state['_modules'] = collections.OrderedDict((k, _nvlabs_style(v)) for k, v in state['_modules'].items())
    for key in _NUMPY_ARRAYS:
        if key in state:
            state[key] = np.broadcast_to(np.asarray(state[key]), [2])
    for key in _NUMPY_FLOATS:
        if key in state:
            state[key] = np.float64(state[key])
    state['_init_kwargs'] = dnnlib.EasyDict({k: dnnlib.EasyDict(v) if isinstance(v, dict) else v
        for k, v in state['_init_kwargs'].items()})
    return _Forged(dict(type='class', version=6, module_src=_FOREIGN_SRC, class_name=type(module).__name__, state=state))

def test_nvlabs_style_pickle_loads_safely_without_running_its_source():
    data = _snapshot('r-cond')
    raw = pickle.dumps(dict(G=_nvlabs_style(data['G']), D=data['D'], G_ema=_nvlabs_style(data['G_ema']),
        augment_pipe=None, training_set_kwargs=data['training_set_kwargs']))
    assert b'numpy' in raw and b'EasyDict' in raw
    safe = safe_pickle.load(io.BytesIO(raw))
    assert isinstance(safe['G_ema'], sg3.Generator) and isinstance(safe['D'], sg2.Discriminator)
    assert safe['G_ema'].mapping.num_layers == 2
    z, c = _inputs(3)
    with torch.no_grad():
        assert torch.equal(safe['G_ema'](z, c, truncation_psi=0.8), data['G_ema'](z, c, truncation_psi=0.8))
    with pytest.raises(persistence.PickleCodeRefused, match='embeds source code'):
        pickle.load(io.BytesIO(raw)) # plain pickle.load refuses the foreign source too

def test_embedded_source_needs_only_what_nvlabs_provides():
    """The file runs inside NVlabs' StyleGAN3 code base when it loads our pickles: only the
    imports their own networks_stylegan3.py has, and no numpy objects in any attribute."""
    tree = ast.parse(persistence._module_to_src(sg3))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f'{node.module}.{a.name}' for a in node.names}
    assert imported <= {'math', 'numpy', 'torch', 'scipy.signal', 'scipy.special', 'torch_utils.misc',
        'torch_utils.persistence', 'torch_utils.ops.bias_act', 'torch_utils.ops.conv2d_gradfix',
        'torch_utils.ops.filtered_lrelu'}, imported
    assert 'class SynthesisBlock' not in persistence._module_to_src(sg3) # keeps SG2's marker apart
    for net in [make_G(**CONFIGS['r-cond']), make_G(**CONFIGS['t-uncond'])]:
        for module in net.modules():
            for key, value in vars(module).items():
                assert not isinstance(value, (np.generic, np.ndarray)), (type(module).__name__, key)
    src = persistence._module_to_src(sg3)
    for cls in ['Generator', 'MappingNetwork', 'SynthesisNetwork', 'SynthesisInput', 'SynthesisLayer', 'FullyConnectedLayer']:
        assert safe_pickle.find_known_class(cls, src) is getattr(sg3, cls)
        assert safe_pickle.find_known_class(cls, persistence._module_to_src(sg2)) is getattr(sg2, cls, None)

#----------------------------------------------------------------------------
# Independent formulas.

@torch.no_grad()
def test_fourier_input_matches_formula():
    torch.manual_seed(0)
    inp = _perturb(sg3.SynthesisInput(w_dim=4, channels=6, size=[7, 5], sampling_rate=4, bandwidth=1.5), 3)
    # A user transform that also scales, so that some frequencies leave the band and fade.
    inp.transform.copy_(torch.tensor([[1.3, 0.4, 0.2], [-0.5, 1.2, -0.3], [0, 0, 1]]))
    w = torch.randn([2, 4])
    out = inp(w).double().numpy()
    assert out.shape == (2, 6, 5, 7)

    A = inp.affine.weight.double().numpy() / np.sqrt(4)
    b = inp.affine.bias.double().numpy()
    f, phi = inp.freqs.double().numpy(), inp.phases.double().numpy()
    U, Wmix = inp.transform.double().numpy(), inp.weight.double().numpy()
    x = (np.arange(7) + 0.5 - 7 / 2) / 4
    y = (np.arange(5) + 0.5 - 5 / 2) / 4
    faded = 0
    for n in range(2):
        t = w[n].double().numpy() @ A.T + b
        t = t / np.hypot(t[0], t[1])
        R = np.array([[t[0], -t[1], 0], [t[1], t[0], 0], [0, 0, 1]])
        T = np.array([[1, 0, -t[2]], [0, 1, -t[3]], [0, 0, 1]])
        M = R @ T @ U
        features = np.zeros([6, 5, 7])
        for ch in range(6):
            fc = f[ch] @ M[:2, :2]
            ph = phi[ch] + f[ch] @ M[:2, 2]
            amp = np.clip(1 - (np.linalg.norm(fc) - 1.5) / (4 / 2 - 1.5), 0, 1)
            faded += amp < 1
            features[ch] = amp * np.sin(2 * np.pi * (x[None, :] * fc[0] + y[:, None] * fc[1] + ph))
        expected = np.einsum('kc,chw->khw', Wmix / np.sqrt(6), features)
        np.testing.assert_allclose(out[n], expected, rtol=1e-5, atol=1e-5)
    assert faded > 0

@torch.no_grad()
def test_transform_buffer_is_the_inverse_of_the_image_transform():
    """gen_images.py's convention: a translation by k pixels in `transform` = inv(M) shifts
    the features by k pixels (the affine map starts at no rotation and no translation)."""
    torch.manual_seed(0)
    inp = sg3.SynthesisInput(w_dim=4, channels=5, size=16, sampling_rate=8, bandwidth=2)
    w = torch.randn([1, 4])
    base = inp(w)
    inp.transform.copy_(_user_transform(0, 3 / 8, 0)) # 3 pixels to the right
    torch.testing.assert_close(inp(w)[..., 3:], base[..., :-3], rtol=1e-5, atol=1e-5)

def _explicit_modconv(x, weight, styles, gain, padding, demodulate):
    """Per-sample convolution with float64 weights W * s_n (demodulated), times the gain."""
    outs = []
    for n in range(x.shape[0]):
        wn = weight.double() * styles[n].double().reshape(1, -1, 1, 1)
        if demodulate:
            wn = wn / wn.square().sum(dim=[1, 2, 3], keepdim=True).sqrt()
        outs.append(F.conv2d(x[n:n + 1].double(), wn * float(gain), padding=padding))
    return torch.cat(outs)

@pytest.mark.parametrize('demodulate', [True, False])
def test_modulated_conv_matches_per_sample_conv(demodulate):
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn([3, 4, 6, 5], generator=g), torch.randn([5, 4, 3, 3], generator=g)
    styles = torch.randn([3, 4], generator=g) * 2
    gain = torch.tensor(0.7)
    out = sg3.modulated_conv2d(x, weight, styles, demodulate=demodulate, padding=2, input_gain=gain)
    assert out.shape == (3, 5, 8, 7)
    torch.testing.assert_close(out.double(), _explicit_modconv(x, weight, styles, gain, 2, demodulate),
        rtol=1e-5, atol=1e-5)

def _kaiser_beta(numtaps, width, fs):
    atten = 2.285 * (numtaps - 1) * np.pi * (width / (fs / 2)) + 7.95
    if atten > 50:
        return 0.1102 * (atten - 8.7)
    if atten >= 21:
        return 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21)
    return 0.0

def _kaiser(numtaps, beta):
    alpha = (numtaps - 1) / 2
    n = np.arange(numtaps)
    return np.i0(beta * np.sqrt(1 - ((n - alpha) / alpha) ** 2)) / np.i0(beta)

def _bessel_j1(x):
    """J1 by its integral (1/pi) int_0^pi cos(tau - x sin tau) dtau (trapezoid rule; the
    integrand is smooth and periodic, so it converges fast)."""
    tau = np.linspace(0, np.pi, 2001)
    vals = np.cos(tau[None, :] - np.asarray(x).reshape(-1, 1) * np.sin(tau[None, :]))
    trapezoid = getattr(np, 'trapezoid', None) or np.trapz # numpy 2 / numpy 1
    return (trapezoid(vals, tau, axis=1) / np.pi).reshape(np.shape(x))

@pytest.mark.parametrize('numtaps,cutoff,width,fs', [(12, 2.0, 12.0, 32), (24, 3.1748, 9.6504, 64),
    (12, 7.1272, 4.1248, 32), (12, 50.7968, 154.4064, 512)])
def test_filter_design_matches_formula(numtaps, cutoff, width, fs):
    alpha = (numtaps - 1) / 2
    window = _kaiser(numtaps, _kaiser_beta(numtaps, width, fs))
    n = np.arange(numtaps)
    h = 2 * cutoff / fs * np.sinc(2 * cutoff / fs * (n - alpha)) * window
    f = sg3.design_lowpass_filter(numtaps, cutoff, width, fs)
    assert f.dtype == torch.float32 and f.shape == (numtaps,)
    np.testing.assert_allclose(f.numpy(), h / h.sum(), rtol=1e-5, atol=1e-7)

    pos = (n - alpha) / fs
    r = np.hypot(pos[None, :], pos[:, None])
    h2 = _bessel_j1(2 * np.pi * cutoff * r) / (np.pi * r) * np.outer(window, window)
    f2 = sg3.design_lowpass_filter(numtaps, cutoff, width, fs, radial=True)
    assert f2.dtype == torch.float32 and f2.shape == (numtaps, numtaps)
    np.testing.assert_allclose(f2.numpy(), h2 / h2.sum(), rtol=1e-5, atol=1e-7)
    assert sg3.design_lowpass_filter(1, cutoff, width, fs) is None

def _explicit_upfirdn(x, f, up, down, pad):
    """Zero insertion, padding (negative: crop), true convolution with f, decimation (float64)."""
    n, c, h, w = x.shape
    u = torch.zeros([n, c, h * up, w * up], dtype=torch.float64)
    u[:, :, ::up, ::up] = x
    u = F.pad(u, pad)
    if f is None:
        f2 = torch.ones([1, 1], dtype=torch.float64)
    else:
        f2 = torch.outer(f, f).double() if f.ndim == 1 else f.double()
    y = F.conv2d(u.reshape(n * c, 1, *u.shape[2:]), f2.flip([0, 1])[None, None])
    return y.reshape(n, c, *y.shape[2:])[:, :, ::down, ::down]

LAYER_CASES = {
    # An upsampling layer (4x up, 2x down, 3x3 conv), clamp active, radial down filter.
    'up-radial-clamp': dict(is_torgb=False, is_critically_sampled=False, in_channels=3, out_channels=4,
        in_size=12, out_size=20, in_sampling_rate=8, out_sampling_rate=16, in_cutoff=2, out_cutoff=3,
        in_half_width=2, out_half_width=4, conv_kernel=3, use_radial_filters=True, conv_clamp=0.5),
    # A critically sampled layer that crops (negative padding), 1x1 conv, separable filters.
    'crop-1x1': dict(is_torgb=False, is_critically_sampled=True, in_channels=4, out_channels=3,
        in_size=[20, 20], out_size=[6, 6], in_sampling_rate=6, out_sampling_rate=6, in_cutoff=3, out_cutoff=3,
        in_half_width=1, out_half_width=1, conv_kernel=1, use_radial_filters=True, conv_clamp=None),
    'torgb': dict(is_torgb=True, is_critically_sampled=True, in_channels=4, out_channels=2, in_size=6,
        out_size=6, in_sampling_rate=6, out_sampling_rate=6, in_cutoff=3, out_cutoff=3, in_half_width=1,
        out_half_width=1, conv_clamp=0.3),
}

@torch.no_grad()
@pytest.mark.parametrize('case', sorted(LAYER_CASES))
def test_layer_matches_explicit_composition(case):
    kw = LAYER_CASES[case]
    torch.manual_seed(0)
    layer = _perturb(sg3.SynthesisLayer(w_dim=5, use_fp16=True, **kw), 4)
    size = kw['in_size'] if isinstance(kw['in_size'], int) else kw['in_size'][0]
    x = torch.randn([2, kw['in_channels'], size, size]) * 3
    w = torch.randn([2, 5])
    out = layer(x, w, noise_mode='random')

    k = layer.conv_kernel
    styles = w.double() @ (layer.affine.weight.double() / np.sqrt(5)).T + layer.affine.bias.double()
    if layer.is_torgb:
        styles = styles / np.sqrt(kw['in_channels'] * k * k)
    y = _explicit_modconv(x, layer.weight, styles, float(layer.magnitude_ema) ** -0.5, k - 1, not layer.is_torgb)
    y = y + layer.bias.double().reshape(1, -1, 1, 1)
    x0, x1, y0, y1 = layer.padding
    y = _explicit_upfirdn(y, layer.up_filter, layer.up_factor, 1, [x0, x1, y0, y1]) * layer.up_factor ** 2
    y = F.leaky_relu(y, 0.2) * np.sqrt(2) if not layer.is_torgb else y
    if kw['conv_clamp'] is not None:
        assert float(y.abs().max()) > kw['conv_clamp'] # the clamp matters here
        y = y.clamp(-kw['conv_clamp'], kw['conv_clamp'])
    y = _explicit_upfirdn(y, layer.down_filter, 1, layer.down_factor, [0, 0, 0, 0])
    out_size = kw['out_size'] if isinstance(kw['out_size'], int) else kw['out_size'][0]
    assert out.shape == y.shape == (2, kw['out_channels'], out_size, out_size)
    torch.testing.assert_close(out.double(), y, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32 # fp16 layers compute in fp32 off CUDA

@torch.no_grad()
def test_magnitude_ema_normalises_the_input():
    torch.manual_seed(0)
    layer = _perturb(sg3.SynthesisLayer(w_dim=5, use_fp16=False, magnitude_ema_beta=0.9, **LAYER_CASES['crop-1x1']), 5)
    x, w = torch.randn([2, 4, 20, 20]) * 3, torch.randn([2, 5])
    ema = float(layer.magnitude_ema)
    plain = layer(x, w)
    assert float(layer.magnitude_ema) == ema # no update unless asked
    # The input gain is magnitude_ema^-1/2: scaling the EMA by a is scaling the input by a^-1/2.
    scaled = copy.deepcopy(layer)
    scaled.magnitude_ema.mul_(4)
    torch.testing.assert_close(scaled(x, w), layer(x / 2, w), rtol=1e-5, atol=1e-6)
    updated = layer(x, w, update_emas=True)
    expected = float(x.square().mean()) + 0.9 * (ema - float(x.square().mean()))
    assert math.isclose(float(layer.magnitude_ema), expected, rel_tol=1e-6)
    assert torch.equal(updated, layer(x, w)) and not torch.equal(updated, plain) # updated first, then used

@torch.no_grad()
def test_mapping_matches_formula():
    torch.manual_seed(0)
    m = _perturb(sg3.MappingNetwork(z_dim=6, c_dim=3, w_dim=5, num_ws=4, num_layers=3, w_avg_beta=0.9), 6)
    z, c = torch.randn([4, 6]), torch.eye(3)[[0, 2, 1, 1]]
    def norm(v):
        return v / np.sqrt(np.mean(v ** 2, axis=1, keepdims=True) + 1e-8)
    def fc(layer, v, lr):
        W, b = layer.weight.double().numpy(), layer.bias.double().numpy()
        return v @ (W * lr / np.sqrt(W.shape[1])).T + b * lr
    x = np.concatenate([norm(z.double().numpy()), norm(fc(m.embed, c.double().numpy(), 1))], axis=1)
    for i in range(3):
        x = fc(getattr(m, f'fc{i}'), x, 0.01)
        x = np.where(x >= 0, x, 0.2 * x) * np.sqrt(2)
    w_avg = m.w_avg.double().numpy().copy()
    np.testing.assert_allclose(m(z, c).double().numpy(), np.repeat(x[:, None], 4, axis=1), rtol=1e-5, atol=1e-6)
    trunc = m(z, c, truncation_psi=0.6, truncation_cutoff=2).double().numpy()
    np.testing.assert_allclose(trunc[:, :2], (w_avg + 0.6 * (x - w_avg))[:, None].repeat(2, axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trunc[:, 2:], x[:, None].repeat(2, axis=1), rtol=1e-5, atol=1e-6)
    assert np.array_equal(m.w_avg.double().numpy(), w_avg)
    m(z, c, update_emas=True)
    np.testing.assert_allclose(m.w_avg.double().numpy(), x.mean(0) + 0.9 * (w_avg - x.mean(0)), rtol=1e-5, atol=1e-6)

@torch.no_grad()
def test_generator_is_its_layers_in_sequence():
    G = make_G(**CONFIGS['t-uncond']).eval()
    z, c = _inputs(0)
    ws = G.mapping(z, c)
    x = G.synthesis.input(ws[:, 0])
    for i, name in enumerate(G.synthesis.layer_names):
        x = getattr(G.synthesis, name)(x, ws[:, i + 1])
    assert torch.equal(G(z, c), x * 0.25)
    # fp16 layers compute in fp32 off CUDA: the same numbers without fp16 layers.
    G32 = copy.deepcopy(G)
    for layer in G32.synthesis.modules():
        if isinstance(layer, sg3.SynthesisLayer):
            layer.use_fp16 = False
    assert torch.equal(G32(z, c), G(z, c, force_fp32=True)) and torch.equal(G(z, c), G(z, c, force_fp32=True))

#----------------------------------------------------------------------------
# Refusals: one line naming the file.

def _forged_pickle(path, **kwarg_changes):
    G = _for_pickle(make_G(**CONFIGS['t-uncond']))
    meta = dict(G.__reduce__()[1][0])
    meta['state'] = dict(meta['state'], _init_kwargs=dict(meta['state']['_init_kwargs'], **kwarg_changes))
    with open(path, 'wb') as f:
        pickle.dump(dict(G=_Forged(meta), D=None, G_ema=_Forged(meta), augment_pipe=None, training_set_kwargs={}), f)
    return str(path)

@pytest.mark.parametrize('changes,message', [
    (dict(channel_mix=2), r"constructor arguments .*channel_mix"),
    (dict(z_dim=9), r"'Generator' does not match our implementation \(wrong shape: mapping\.fc0\.weight\)"),
    (dict(channel_max=16), r"'Generator' does not match our implementation \(missing: synthesis\.L0_36_16"),
    (dict(num_critical=20), r"constructor arguments .*num_critical"),
])
def test_safe_loader_refuses_with_one_line_naming_the_file(tmp_path, changes, message):
    path = _forged_pickle(tmp_path / 'bad-sg3.pkl', **changes)
    with pytest.raises(safe_pickle.UnsafePickleError, match=message) as info:
        safe_pickle.load_network_pkl(path)
    assert str(info.value).startswith(path) and '\n' not in str(info.value)
    with pytest.raises(generators.SetupError, match=message) as info:
        generators.build_generator(path, teacher=None)
    assert path in str(info.value) and '\n' not in str(info.value)

#----------------------------------------------------------------------------
# Refinement from a StyleGAN3 pickle.

C_DIM = 2

@pytest.fixture(scope='module')
def pickles(tmp_path_factory):
    root = tmp_path_factory.mktemp('sg3')
    torch.manual_seed(0)
    teacher = networks_edm.EDMPrecond(img_resolution=RES, img_channels=1, label_dim=C_DIM,
        model_type='SongUNet', model_channels=8, channel_mult=[1, 1], num_blocks=1,
        attn_resolutions=[], dropout=0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kwargs = dict(CONFIGS['r-cond'], c_dim=C_DIM, img_channels=1, channel_max=4)
    G = make_G(seed=3, **kwargs)
    torch.manual_seed(4)
    D = sg2.Discriminator(c_dim=C_DIM, img_resolution=RES, img_channels=1, channel_base=128,
        channel_max=16, epilogue_kwargs=dict(mbstd_group_size=2))
    paths = dict(teacher=str(root / 'teacher.pkl'), gan=str(root / 'stylegan3-r.pkl'))
    persistence.save_network_pkl(dict(ema=_for_pickle(teacher)), paths['teacher'])
    persistence.save_network_pkl(dict(G=_for_pickle(G), D=_for_pickle(D), G_ema=_for_pickle(G),
        augment_pipe=None, training_set_kwargs=dict(path='mnist.zip', use_labels=True)), paths['gan'])
    return paths

def _refine(args):
    result = CliRunner().invoke(_load_cli().main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output

def _run(pickles, outdir, kimg):
    return _refine(['--teacher', pickles['teacher'], '--gen', pickles['gan'], '--outdir', str(outdir),
        '--batch', '4', '--lr', '1e-3', '--glr', '1e-2', '--kimg', kimg, '--tick', '0.004', '--snap', '1'])

def _final_state(run_dir):
    return torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], weights_only=True)

def test_refine_snapshots_resumes_and_generates(pickles, tmp_path, fresh_sources):
    _run(pickles, tmp_path / 'a', '0.012')
    _run(pickles, tmp_path / 'b', '0.004')
    run_b = _run_dir(tmp_path / 'b')
    assert 'Resuming' in _refine(['--resume', run_b, '--kimg', '0.012'])
    a, b = _final_state(_run_dir(tmp_path / 'a')), _final_state(run_b)
    assert a['cur_nimg'] == b['cur_nimg'] == 12
    for key in ('G', 'G_ema', 'fake'):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key

    # G moved; w_avg is tracked (the mapping network is trained); the magnitude EMAs stay.
    gan = safe_pickle.load_network_pkl(pickles['gan'])
    before = gan['G_ema'].state_dict()
    after = {k[len('G.'):]: v for k, v in a['G'].items()}
    assert after.keys() == before.keys()
    assert not torch.equal(after['synthesis.L3_36_4.weight'], before['synthesis.L3_36_4.weight'])
    assert not torch.equal(after['mapping.w_avg'], before['mapping.w_avg'])
    for name in before:
        if name.endswith(('magnitude_ema', 'filter', 'freqs', 'phases', 'transform')):
            assert torch.equal(after[name], before[name]), name

    # The snapshot is a StyleGAN3 pickle for both loaders, with the same images.
    snap = sorted(glob.glob(os.path.join(run_b, 'network-snapshot-*.pkl')))[-1]
    fresh_sources()
    safe = safe_pickle.load_network_pkl(snap)
    code = safe_pickle.load_network_pkl(snap, allow_code=True)
    assert {'G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs', 'generator_options'} <= set(safe)
    assert isinstance(safe['G_ema'], sg3.Generator) and isinstance(safe['G'], sg3.Generator)
    assert isinstance(safe['D'], sg2.Discriminator) and safe['training_set_kwargs'] == gan['training_set_kwargs']
    assert type(code['G_ema']).__module__.startswith('_imported_module_')
    z, c = torch.randn([3, Z_DIM]), torch.eye(C_DIM)[[0, 1, 1]]
    with torch.no_grad():
        out = safe['G_ema'](z, c)
        assert torch.equal(out, code['G_ema'](z, c))
        assert not torch.allclose(out, gan['G_ema'](z, c))
    result = CliRunner().invoke(generate.main, ['--network', snap, '--outdir', str(tmp_path / 'img'),
        '--seeds', '0-3', '--batch', '2'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(os.listdir(tmp_path / 'img')) == 4
