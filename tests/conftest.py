import os
import tempfile

import pytest
import torch

# one thread: tests may run beside a benchmark, and tiny matmuls gain nothing from more
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# converted GGUF bases go to a folder of this test session, never the user's ~/.cache
os.environ["PREFOPT_BASE_CACHE"] = tempfile.mkdtemp(prefix="prefopt-test-bases-")


@pytest.fixture
def tiny():
    """A 2-layer, 64-wide Llama built from a config with a character tokenizer (no download)."""
    from prefopt.models.base import load_base

    return load_base("tiny", device=torch.device("cpu"), seed=0)


# a pipeline small enough for unit tests (seconds): the smoke preset cut down further
MICRO = (
    "threads=1", "data.n_eval=8", "data.n_train=8", "data.k=2", "data.pairs_per_prompt=1", "data.max_new_tokens=6",
    "rm.epochs=1", "rm.batch_size=8", "rm.normalize_on=8", "dpo.epochs=1", "dpo.batch_size=4",
    "ppo.steps=2", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.max_new_tokens=6",
    "eval.path_points=1", "eval.path_prompts=4", "eval.max_new_tokens=6", "eval.batch_size=8",
)


def micro(*extra: str):
    from prefopt.pipeline.config import load_config

    return load_config("smoke", None, (*MICRO, *extra))


class Killed(Exception):
    """What KilledAfter raises: the process "dies" there."""


def killed_after(at: int):
    """A StepCheckpoint class whose process "dies" right after writing step ``at``'s slot."""
    from prefopt.backends.checkpoint import StepCheckpoint

    class KilledAfter(StepCheckpoint):
        def save(self, step, **kw):
            super().save(step, **kw)
            if step == at:
                raise Killed

    return KilledAfter
