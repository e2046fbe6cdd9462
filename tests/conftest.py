"""Shared test configuration: GPU markers skip (never delete) where the hardware is absent."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU (marker 'cuda')")
    skip_multi = pytest.mark.skip(reason=f"needs >= 2 GPUs (marker 'multigpu'), found {n_gpus}")
    for item in items:
        if "cuda" in item.keywords and n_gpus == 0:
            item.add_marker(skip_cuda)
        if "multigpu" in item.keywords and n_gpus < 2:
            item.add_marker(skip_multi)
