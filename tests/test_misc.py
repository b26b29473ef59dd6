"""Tests for torch_utils.misc."""

import itertools
import warnings

import numpy as np
import pytest
import torch

from torch_utils import misc

# ----------------------------------------------------------------------------
# constant


def test_constant_values_and_defaults():
    t = misc.constant([1, 2, 3])
    assert t.dtype == torch.get_default_dtype() and t.device.type == 'cpu'
    assert t.tolist() == [1.0, 2.0, 3.0]
    assert misc.constant(7, dtype=torch.int64).dtype == torch.int64
    assert misc.constant(np.float64(2.5)).item() == 2.5


def test_constant_is_cached():
    a = misc.constant([1.5, 2.5], shape=[3, 2])
    assert a is misc.constant(np.array([1.5, 2.5]), shape=(3, 2))
    assert a is not misc.constant([1.5, 2.5])
    assert a is not misc.constant([1.5, 2.6], shape=[3, 2])
    assert a is not misc.constant([1.5, 2.5], shape=[3, 2], dtype=torch.float64)
    assert misc.constant(np.zeros(2, np.float32)) is not misc.constant(np.zeros(4, np.float16))


def test_constant_broadcast_and_memory_format():
    t = misc.constant(3, shape=[2, 3])
    assert t.shape == (2, 3) and t.is_contiguous() and (t == 3).all()
    t = misc.constant([1, 2, 3], shape=[2, 3])
    assert t.tolist() == [[1, 2, 3], [1, 2, 3]]
    t = misc.constant(1, shape=[2, 3, 4, 5], memory_format=torch.channels_last)
    assert t.is_contiguous(memory_format=torch.channels_last)

# ----------------------------------------------------------------------------
# assert_shape, profiled_function, suppress_tracer_warnings


def test_assert_shape():
    x = torch.zeros(2, 3, 4)
    misc.assert_shape(x, [2, 3, 4])
    misc.assert_shape(x, [None, 3, None])
    with pytest.raises(AssertionError, match='dimensions'):
        misc.assert_shape(x, [2, 3])
    with pytest.raises(AssertionError, match='dimension 1'):
        misc.assert_shape(x, [2, 5, 4])
    misc.assert_shape(x, [torch.tensor(2), None, 4])
    with pytest.raises(AssertionError):
        misc.assert_shape(x, [torch.tensor(3), None, 4])


@pytest.mark.filterwarnings('ignore:.*torch.jit.trace.*is deprecated:DeprecationWarning')
def test_assert_shape_under_tracing():
    def fn(x):
        misc.assert_shape(x, [None, 3])
        return x * 2

    with warnings.catch_warnings():
        warnings.simplefilter('error', torch.jit.TracerWarning)
        traced = torch.jit.trace(fn, torch.zeros(2, 3))
    assert traced(torch.ones(5, 3)).shape == (5, 3)


def test_profiled_function():
    @misc.profiled_function
    def my_op(x, y=1):
        """Doc."""
        return x + y

    assert my_op.__name__ == 'my_op' and my_op.__doc__ == 'Doc.'
    with torch.autograd.profiler.profile() as prof:
        assert my_op(torch.ones(1), y=2).item() == 3
    assert any(event.name == 'my_op' for event in prof.function_events)


def test_suppress_tracer_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with misc.suppress_tracer_warnings():
            warnings.warn('hidden', torch.jit.TracerWarning)
        warnings.warn('shown', UserWarning)
    assert [str(w.message) for w in caught] == ['shown']

# ----------------------------------------------------------------------------
# Parameters, buffers, distributed helpers


class Net(torch.nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.fc = torch.nn.Linear(width, 2)
        self.register_buffer('stat', torch.zeros(width))


def test_named_params_and_buffers():
    names = [name for name, _ in misc.named_params_and_buffers(Net())]
    assert names == ['fc.weight', 'fc.bias', 'stat']


def test_copy_params_and_buffers():
    src, dst = Net(), Net()
    with torch.no_grad():
        src.stat.fill_(5)
    dst.fc.bias.requires_grad_(False)
    dst.extra = torch.nn.Parameter(torch.ones(2))
    dst.stat = dst.stat.double()
    dst_weight, dst_stat = dst.fc.weight, dst.stat
    misc.copy_params_and_buffers(src, dst)
    assert torch.equal(dst_weight, src.fc.weight), 'copied in place into the existing tensor'
    assert dst_stat.dtype == torch.float64 and (dst_stat == 5).all()
    assert dst.fc.weight.requires_grad and not dst.fc.bias.requires_grad
    assert dst.fc.weight is not src.fc.weight
    assert torch.equal(dst.extra, torch.ones(2))
    with pytest.raises(AssertionError, match='extra'):
        misc.copy_params_and_buffers(src, dst, require_all=True)
    with pytest.raises(AssertionError, match='shape'):
        misc.copy_params_and_buffers(Net(4), Net(3))


def test_ddp_sync_plain_module():
    net = Net()
    for sync in [False, True]:
        with misc.ddp_sync(net, sync):
            pass


def test_check_ddp_consistency(tmp_path):
    net = Net()
    misc.check_ddp_consistency(net)  # No process group: nothing to compare.
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        with torch.no_grad():
            net.stat[0] = float('nan')  # NaNs must compare equal.
        misc.check_ddp_consistency(net)
        misc.check_ddp_consistency(net, ignore_regex=r'Net\.stat')
    finally:
        torch.distributed.destroy_process_group()

# ----------------------------------------------------------------------------
# InfiniteSampler


def take(sampler, n):
    return [int(i) for i in itertools.islice(iter(sampler), n)]


def test_infinite_sampler_laps_are_permutations():
    dataset = list(range(10))
    stream = take(misc.InfiniteSampler(dataset, seed=3), 40)
    for lap in range(4):
        assert sorted(stream[lap * 10:(lap + 1) * 10]) == dataset
    assert stream[:10] != stream[10:20], 'the order should keep changing'
    assert stream != take(misc.InfiniteSampler(dataset, seed=4), 40)
    assert stream == take(misc.InfiniteSampler(dataset, seed=3), 40)
    assert take(misc.InfiniteSampler(dataset, shuffle=False), 25) == (dataset * 3)[:25]


def test_infinite_sampler_rank_split():
    dataset = list(range(7))
    stream = take(misc.InfiniteSampler(dataset, seed=1), 30)
    per_rank = [take(misc.InfiniteSampler(dataset, rank=r, num_replicas=3, seed=1), 10) for r in range(3)]
    for r in range(3):
        assert per_rank[r] == stream[r::3]
    with pytest.raises(AssertionError):
        misc.InfiniteSampler(dataset, rank=3, num_replicas=3)

# ----------------------------------------------------------------------------
# print_module_summary


def test_print_module_summary(capsys):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 2)))
    x = torch.randn(3, 4)
    out = misc.print_module_summary(net, [x])
    assert torch.equal(out, net(x))
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert any(line.split()[:2] == ['0', '40'] for line in lines)
    assert any(line.split()[:2] == ['2.0', '18'] for line in lines)
    assert any(line.startswith('Total') and '58' in line for line in lines)
    assert '[3, 8]' in text and 'float32' in text
    assert not any(line.split()[:1] == ['<top-level>'] for line in lines), 'redundant row expected to be skipped'
    misc.print_module_summary(net, [x], skip_redundant=False)
    assert '<top-level>' in capsys.readouterr().out
    misc.print_module_summary(net, [x], max_nesting=1)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ['2', '18'] for line in lines)
    assert not any(line.startswith('2.0') for line in lines)
