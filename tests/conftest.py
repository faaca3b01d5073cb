"""Session-wide test settings."""

import torch

# The CPU test machine has 2 cores shared with other jobs: with intra-op threads, every tiny op
# pays for thread hand-offs under contention (measured ~100x slower); one thread avoids that.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: object, items: list) -> None:
    """Tests marked `gpu` skip on machines without CUDA (CI); `pytest -m gpu` runs them on one."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
