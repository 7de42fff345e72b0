"""Shared test setup: every test starts from a fixed seed (its own, derived from its name, so
adding a test does not change the data of the others), and tests marked `cuda` skip without a
GPU."""
import random
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# `@requires_cuda` on a test, or `pytestmark = requires_cuda` in a module.
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded(request):
    """Seeds torch and random from the test's id; yields the seed."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(seed)
    random.seed(seed)
    yield seed
    # Process-wide numerics must not leak into later tests (a flushed denormal changes how every
    # later CPU op rounds): the test that changed them fails here, not an innocent one later.
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0, "this test left torch.set_flush_denormal(True) on"
