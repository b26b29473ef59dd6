"""Load the compiled ops (once per process) through `torch_utils.custom_ops`.

A plugin holds the CPU kernels and, when torch sees a GPU, the CUDA kernels too. None means
the reference path (the build failed and warned once, or DI_CUSTOM_OPS=ref).
"""

import os

import torch

from .. import custom_ops

_DIR = os.path.dirname(os.path.abspath(__file__))
# -march=native is safe: the cache key holds the CPU's flags. -fno-trapping-math lets the
# compiler vectorise branches (a ? b : c*d) without changing any result. -fopenmp only compiles
# at::parallel_for's OpenMP region; it binds to torch's own OpenMP runtime when loaded.
CFLAGS = ['-O3', '-march=native', '-fno-trapping-math', '-fopenmp']
CUDA_CFLAGS = ['-O3', '-DWITH_CUDA']
_plugins = dict()


def load(name, cpp, cu, headers, with_cuda=None):
    """The plugin module or None; `with_cuda` defaults to whether torch sees a GPU."""
    if custom_ops.mode() == 'ref':
        return None
    if with_cuda is None:
        with_cuda = torch.cuda.is_available()
    key = (name, with_cuda)
    if key not in _plugins:
        sources = [cpp] + ([cu] if with_cuda else [])
        _plugins[key] = custom_ops.get_plugin(
            name, sources=sources, headers=['plugin_common.h'] + headers, source_dir=_DIR,
            extra_cflags=CFLAGS + (['-DWITH_CUDA'] if with_cuda else []), extra_cuda_cflags=CUDA_CFLAGS,
            with_cuda=with_cuda)
    return _plugins[key]


def dtype_code(dtype):
    return {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}[dtype]


def stream_of(t):
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == 'cuda' else 0
