"""tests/gpu: what only a GPU can show. Every test here carries the `gpu` marker and is skipped
without CUDA, so `make test` on a CPU machine passes over them. Run them with `bash bench/gpu.sh`."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu/" in item.nodeid:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance on the GPU host (no S3 endpoint: moto need not be installed there)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
