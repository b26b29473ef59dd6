"""Compile the CUDA plugins without a GPU: catches .cu compile and link errors early.

Run with a CUDA build of torch (a separate environment, never CI) and nvcc; the modules are
built WITH_CUDA for TORCH_CUDA_ARCH_LIST (default 8.0;9.0) and imported, and their CUDA entry
points are checked. Exits 1 if a plugin does not build.

  TORCH_EXTENSIONS_DIR=/tmp/cuda-ext /tmp/cudavenv/bin/python bench/cuda_build_check.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '8.0;9.0')
os.environ['DI_CUSTOM_OPS'] = 'require'  # A failed build raises with the log path.
import torch  # noqa: E402 pylint: disable=wrong-import-position

from torch_utils.ops import bias_act, filtered_lrelu, upfirdn2d  # noqa: E402 pylint: disable=wrong-import-position


def main():
    if torch.version.cuda is None:
        sys.exit('needs a CUDA build of torch')
    print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, archs {os.environ["TORCH_CUDA_ARCH_LIST"]}')
    for module, entry in [(bias_act, 'bias_act_cuda'), (upfirdn2d, 'upfirdn2d_cuda'),
                          (filtered_lrelu, 'filtered_lrelu_cuda')]:
        t0 = time.time()
        plugin = module._plugin(with_cuda=True)  # pylint: disable=protected-access
        assert hasattr(plugin, entry), f'{plugin} lacks {entry}'
        print(f'{module.__name__}: {os.path.basename(plugin.__file__)} has {entry} ({time.time() - t0:.0f} s)')
    print('CUDA plugins build')


if __name__ == '__main__':
    main()
