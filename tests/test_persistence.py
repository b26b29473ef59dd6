"""The NVlabs pickle format: our writer, the code-executing loader and the safe loader."""

import copy
import io
import os
import pickle

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import persistence, safe_pickle
from training import networks_edm

# Small configurations covering every UNet variant and every preconditioner.
_SONG = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[8], dropout=0.1)
_NCSN = dict(_SONG, embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
    decoder_type='skip', resample_filter=[1, 3, 3, 1])
_SKIP_ENC = dict(_SONG, encoder_type='skip', decoder_type='skip', channel_mult=[1, 2, 2])
_ADM = dict(model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[8], dropout=0.1)

CONFIGS = {
    'edm-ddpmpp':   (networks_edm.EDMPrecond, _SONG),
    'edm-ncsnpp':   (networks_edm.EDMPrecond, _NCSN),
    'edm-skipenc':  (networks_edm.EDMPrecond, _SKIP_ENC),
    'edm-adm':      (networks_edm.EDMPrecond, _ADM),
    'vp-ddpmpp':    (networks_edm.VPPrecond, _SONG),
    've-ncsnpp':    (networks_edm.VEPrecond, _NCSN),
    'iddpm-adm':    (networks_edm.iDDPMPrecond, _ADM),
}

def make_net(name, label_dim=3, augment_dim=9, seed=0):
    cls, kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    net = cls(img_resolution=16, img_channels=2, label_dim=label_dim, augment_dim=augment_dim, **kwargs)
    # Zero-initialised output layers would make every network the identity: perturb all weights.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval().requires_grad_(False)

def dump(obj, protocol=None):
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=protocol)
    return buf.getvalue()

@pytest.fixture
def fresh_sources():
    """Forget which sources belong to live modules, so that the code loader must exec them."""
    saved = dict(persistence._src_to_module_dict)
    persistence._src_to_module_dict.clear()
    yield
    # Keep what real imports registered meanwhile (a module first imported inside the test), drop
    # the modules the code loader made from pickles.
    imported = {src: module for src, module in persistence._src_to_module_dict.items()
        if not module.__name__.startswith('_imported_module_')}
    persistence._src_to_module_dict.clear()
    persistence._src_to_module_dict.update(saved)
    persistence._src_to_module_dict.update(imported)

def _inputs(net, per_sample_sigma, labels):
    g = torch.Generator().manual_seed(1)
    x = torch.randn([3, net.img_channels, 16, 16], generator=g)
    sigma = torch.tensor([0.02, 0.7, 12.0]) if per_sample_sigma else torch.tensor(1.3, dtype=torch.float64)
    c = torch.eye(net.label_dim)[[0, 2, 1]] if labels and net.label_dim else None
    aug = torch.randn([3, 9], generator=g)
    return x, sigma, c, aug

#----------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_round_trip_both_loaders_bitwise(name, fresh_sources):
    net = make_net(name)
    data = dump(dict(ema=net, dataset_kwargs=dict(resolution=16)))
    safe = safe_pickle.load(io.BytesIO(data))['ema']
    code = safe_pickle.load(io.BytesIO(data), allow_code=True)['ema']

    assert type(safe) is type(net)                                  # rebuilt as our class
    assert type(code).__module__.startswith('_imported_module_')   # the embedded source ran
    assert not safe.training and not code.training
    assert not any(p.requires_grad for p in safe.parameters())
    for per_sample in [False, True]:
        for labels in [False, True]:
            x, sigma, c, aug = _inputs(net, per_sample, labels)
            ref = net(x, sigma, c, augment_labels=aug)
            assert torch.equal(safe(x, sigma, c, augment_labels=aug), ref)
            assert torch.equal(code(x, sigma, c, augment_labels=aug), ref)
    # Without augment labels, with force_fp32: still identical.
    x, sigma, c, _ = _inputs(net, True, True)
    assert torch.equal(safe(x, sigma, c, force_fp32=True), net(x, sigma, c))

def test_code_loaded_object_saves_again_with_its_embedded_source(fresh_sources):
    net = make_net('edm-ddpmpp')
    code = safe_pickle.load(io.BytesIO(dump(net)), allow_code=True)
    again = safe_pickle.load(io.BytesIO(dump(code)))
    x, sigma, c, aug = _inputs(net, True, True)
    assert torch.equal(again(x, sigma, c, augment_labels=aug), net(x, sigma, c, augment_labels=aug))

def test_unconditional_network_ignores_labels():
    net = make_net('edm-adm', label_dim=0, augment_dim=0)
    safe = safe_pickle.load(io.BytesIO(dump(net)))
    x, sigma, _, _ = _inputs(net, True, False)
    assert torch.equal(safe(x, sigma), net(x, sigma))
    assert safe.model.map_label is None and safe.model.map_augment is None

#----------------------------------------------------------------------------
# The on-disk format.

def _globals_of(data):
    """(module, name) of every global a pickle refers to."""
    found = set()
    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)
    Recorder(io.BytesIO(data)).load() # our own live source: maps to live classes, runs nothing
    return found

def test_pickle_layout_matches_nvlabs_format():
    net = make_net('edm-ddpmpp')
    data = dump(net)
    # The only custom global is the reconstructor; nothing names our package layout.
    allowed = {('torch_utils.persistence', '_reconstruct_persistent_obj'),
        ('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_parameter'),
        ('torch.storage', '_load_from_bytes'), ('collections', 'OrderedDict'),
        ('torch.nn.modules.container', 'ModuleDict')}
    assert _globals_of(data) <= allowed
    assert ('torch_utils.persistence', '_reconstruct_persistent_obj') in _globals_of(data)
    # No numpy-2-only names (numpy._core), which numpy 1.x could not load.
    assert b'numpy._core' not in data and not any(m.startswith('numpy') for m, _ in _globals_of(data))

    reduced = net.__reduce__()
    assert reduced[0] is persistence._reconstruct_persistent_obj and reduced[2] is None
    meta = reduced[1][0]
    assert list(meta) == ['type', 'version', 'module_src', 'class_name', 'state']
    assert meta['type'] == 'class' and meta['version'] == 6 and meta['class_name'] == 'EDMPrecond'
    with open(networks_edm.__file__, encoding='utf-8') as f:
        assert meta['module_src'] == f.read()
    assert meta['state']['_init_kwargs']['model_type'] == 'SongUNet'
    assert data.count(meta['module_src'].encode()) == 1 # written once, then memoized

def test_loads_numpy1_era_pickles_with_numpy_scalars():
    net = make_net('edm-ddpmpp')
    for block in net.model.enc.values():
        if isinstance(block, networks_edm.UNetBlock):
            block.skip_scale = np.float64(block.skip_scale) # as NVlabs nets hold them
    data = dump(net, protocol=2) # text GLOBAL opcodes, easy to rename below
    assert b'numpy._core.multiarray\nscalar' in data
    data = data.replace(b'numpy._core.multiarray\nscalar', b'numpy.core.multiarray\nscalar')
    loaded = safe_pickle.load(io.BytesIO(data))
    x, sigma, c, aug = _inputs(net, True, True)
    assert torch.equal(loaded(x, sigma, c, augment_labels=aug), net(x, sigma, c, augment_labels=aug))

#----------------------------------------------------------------------------
# Safety.

class _Forged:
    """Pickles as a persistent object with arbitrary embedded source."""
    def __init__(self, class_name, module_src, state):
        self.meta = dict(type='class', version=6, module_src=module_src, class_name=class_name, state=state)
    def __reduce__(self):
        return (persistence._reconstruct_persistent_obj, (self.meta,))

def _payload_source(path, class_name):
    return (f"open({str(path)!r}, 'w').write('pwned')\n"
            f"class {class_name}:\n    def __call__(self, *a, **k): return 'payload ran'\n")

def test_default_loaders_never_run_embedded_code(tmp_path, fresh_sources):
    marker = tmp_path / 'marker.txt'
    data = dump(dict(ema=_Forged('Payload', _payload_source(marker, 'Payload'), {})))

    loaded = safe_pickle.load(io.BytesIO(data))
    assert isinstance(loaded['ema'], safe_pickle.UnknownPersistentObject)
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"'Payload'.*--allow-pickle-code"):
        loaded['ema']()
    with pytest.raises(safe_pickle.UnsafePickleError, match='Payload'):
        safe_pickle.require_module(loaded, 'ema')
    with pytest.raises(persistence.PickleCodeRefused, match='Payload'):
        pickle.load(io.BytesIO(data)) # even plain pickle.load refuses through our torch_utils
    assert not marker.exists()

    # The test can fail: with permission, the same file does run its code.
    assert safe_pickle.load(io.BytesIO(data), allow_code=True)['ema']() == 'payload ran'
    assert marker.read_text() == 'pwned'

def test_known_class_name_with_hostile_source_is_rebuilt_without_running_it(tmp_path, fresh_sources):
    marker = tmp_path / 'marker.txt'
    net = make_net('vp-ddpmpp')
    state = net.__reduce__()[1][0]['state']
    data = dump(_Forged('VPPrecond', _payload_source(marker, 'VPPrecond'), state))
    loaded = safe_pickle.load(io.BytesIO(data))
    assert type(loaded) is networks_edm.VPPrecond and not marker.exists()
    x, sigma, c, aug = _inputs(net, True, True)
    assert torch.equal(loaded(x, sigma, c, augment_labels=aug), net(x, sigma, c, augment_labels=aug))

def test_restricted_unpickler_refuses_other_globals(tmp_path):
    marker = tmp_path / 'marker.txt'
    class Exploit:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"'(posix|os|nt)\.system'"):
        safe_pickle.load(io.BytesIO(dump(dict(ema=Exploit()))))
    assert not marker.exists()

def test_snapshot_with_unknown_extras_still_gives_network():
    net = make_net('edm-ddpmpp')
    loss = _Forged('AugmentPipe', 'class AugmentPipe: pass\n', dict(p=0.1))
    data = safe_pickle.load(io.BytesIO(dump(dict(ema=net, loss_fn=loss, augment_pipe=None,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset')))))
    assert isinstance(safe_pickle.require_module(data, 'ema'), networks_edm.EDMPrecond)
    assert data['loss_fn'].class_name == 'AugmentPipe'
    with pytest.raises(safe_pickle.UnsafePickleError, match='AugmentPipe'):
        data['loss_fn'].p
    with pytest.raises(safe_pickle.UnsafePickleError, match="no 'G_ema' entry"):
        safe_pickle.require_module(data, 'G_ema')

def test_mismatched_state_is_a_clear_error():
    net = make_net('edm-ddpmpp')
    meta = net.__reduce__()[1][0]
    state = dict(meta['state'])
    state['_init_kwargs'] = dict(state['_init_kwargs'], model_channels=8) # shapes no longer fit
    with pytest.raises(safe_pickle.UnsafePickleError, match="'EDMPrecond' does not match.*wrong shape"):
        safe_pickle.load(io.BytesIO(dump(_Forged('EDMPrecond', meta['module_src'], state))))

def test_safe_loading_leaves_global_rng_alone():
    data = dump(make_net('edm-adm'))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    safe_pickle.load(io.BytesIO(data))
    assert torch.equal(torch.rand(4), expected)

#----------------------------------------------------------------------------
# Decorator behaviour.

def test_decorator_records_init_args_and_is_idempotent():
    net = make_net('edm-ddpmpp')
    assert isinstance(net.init_kwargs, dnnlib.EasyDict)
    assert net.init_kwargs.model_channels == 16 and net.init_args == ()
    net.init_kwargs.model_channels = 99 # a copy: the record is unchanged
    assert net.init_kwargs.model_channels == 16
    cls = networks_edm.EDMPrecond
    assert persistence.persistent_class(cls) is cls
    assert persistence.is_persistent(cls) and persistence.is_persistent(net)
    assert not persistence.is_persistent(torch.nn.Linear(1, 1))
    assert cls.__name__ == 'EDMPrecond' and cls.__module__ == 'training.networks_edm'

def test_deepcopy_of_persistent_object_needs_no_permission():
    net = make_net('ve-ncsnpp')
    clone = copy.deepcopy(net)
    assert type(clone) is type(net)
    x, sigma, c, aug = _inputs(net, True, True)
    assert torch.equal(clone(x, sigma, c, augment_labels=aug), net(x, sigma, c, augment_labels=aug))

def test_import_hook_sees_and_may_rewrite_meta(fresh_sources):
    seen = []
    def hook(meta):
        seen.append(meta.class_name)
        meta.module_src = meta.module_src.replace("'payload ran'", "'patched'")
        return meta
    persistence.import_hook(hook)
    try:
        data = dump(_Forged('Payload', 'class Payload:\n    def __call__(self): return \'payload ran\'\n', {}))
        assert persistence.load(io.BytesIO(data), allow_code=True)() == 'patched'
        assert seen == ['Payload']
    finally:
        persistence._import_hooks.remove(hook)

@persistence.persistent_class
class _Holder:
    def __init__(self, value):
        self.value = value

def test_unpicklable_constructor_argument_fails_at_construction():
    assert _Holder([1, np.float32(2), torch.zeros(2)]).init_args[0][0] == 1
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        _Holder(lambda: 0)

def test_save_network_pkl_is_atomic(tmp_path):
    path = tmp_path / 'network-snapshot-000000.pkl'
    net = make_net('edm-ddpmpp')
    persistence.save_network_pkl(dict(ema=net), path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        persistence.save_network_pkl(dict(ema=net, bad=lambda: 0), path) # lambdas don't pickle
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [path.name]
    assert isinstance(safe_pickle.load(open(path, 'rb'))['ema'], networks_edm.EDMPrecond)

def test_plain_persistent_object_keeps_its_pickled_attributes():
    from training import loss as loss_module # pylint: disable=import-outside-toplevel
    state = dict(_init_args=(), _init_kwargs=dict(P_mean=-1.2), P_mean=-0.4, P_std=1.2, sigma_data=0.5)
    loaded = safe_pickle.load(io.BytesIO(dump(_Forged('EDMLoss', 'class EDMLoss: pass\n', state))))
    assert type(loaded) is loss_module.EDMLoss
    assert (loaded.P_mean, loaded.P_std, loaded.sigma_data) == (-0.4, 1.2, 0.5)
