"""Shared test set-up: run from the repository root without installation."""
import os
import sys

# Before numpy/scipy load: BLAS worker threads make small sqrtm calls 50x slower on a busy
# 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread: the tests' networks are tiny, and on a 2-core machine that is busy with
# anything else, torch's spinning worker threads make small ops tens of times slower.
import torch # pylint: disable=wrong-import-position
torch.set_num_threads(1)

import pytest # pylint: disable=wrong-import-position

@pytest.fixture(autouse=True, scope='module')
def _one_thread_per_module():
    """Every test module starts with one thread, whatever an earlier one (a bench script) set."""
    torch.set_num_threads(1)
    yield
