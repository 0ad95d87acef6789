import os
import sys

import pytest
import torch

# tests import the run-time modules from the repository root and the parity checker from tests/
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models run single-threaded for the whole module (opt in with pytest.mark.usefixtures): with two
    threads, OpenMP synchronisation dominates and stalls for seconds when another process holds a core. The thread
    count is restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def default_denormals():
    """For modules that call train.main, which turns on flushing of denormals for the whole process: back to torch's
    default (off) after the module."""
    yield
    torch.set_flush_denormal(False)
