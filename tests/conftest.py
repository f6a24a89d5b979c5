"""Test-wide settings: the text-embedding cache goes to a temporary folder, never to the user's home."""

import os
import tempfile

import pytest

os.environ["VOCABSEG_CACHE"] = tempfile.mkdtemp(prefix="vocabseg-test-cache-")


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep torch on the cores CI has; tests stay deterministic in speed and results."""
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
