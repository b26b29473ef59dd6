"""Shared test set-up: run from the repository root without installation."""
import os
import sys

# Before numpy/scipy load: BLAS worker threads make small sqrtm calls 50x slower on a busy
# 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Nothing downloads in the tests: Hugging Face loaders stay offline (a missing file is an error,
# not a download), and sockets connect only to this machine (tests/test_download_paths.py).
os.environ["HF_HUB_OFFLINE"] = "1"

import ipaddress # pylint: disable=wrong-import-position
import socket # pylint: disable=wrong-import-position

def _local_only(connect):
    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            try:
                local = host == "localhost" or ipaddress.ip_address(host.split("%")[0]).is_loopback
            except ValueError:
                local = False
            if not local:
                raise OSError(f"tests must not use the network (a connection to {host} was attempted)")
        return connect(self, address)
    return guarded

socket.socket.connect = _local_only(socket.socket.connect)
socket.socket.connect_ex = _local_only(socket.socket.connect_ex)

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
