import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Engine tests use tiny tensors: on a loaded 2-core machine an OpenMP region of 2 threads turns a
    3 us softmax into ~15 ms of waiting for the second thread, so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
