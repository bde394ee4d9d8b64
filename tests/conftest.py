import os

import pytest
import torch

# one thread: tests may run beside a benchmark, and tiny matmuls gain nothing from more
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def tiny():
    """A 2-layer, 64-wide Llama built from a config with a character tokenizer (no download)."""
    from prefopt.models.base import load_base

    return load_base("tiny", device=torch.device("cpu"), seed=0)
