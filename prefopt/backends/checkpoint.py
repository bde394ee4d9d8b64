"""Resumable training state, one slot per step: a training loop killed at any moment loses at most one step.

A checkpoint is a slot folder ``step-NNNNNN/`` holding ``tensors.safetensors`` (the trained weights, the optimizer's
moments, torch's RNG state and any tensors the loop adds) and ``state.json`` (the step, optimizer hyper-parameters
and scalars, the LR scheduler, Python RNG states, the loop's own state -- prompt order, KL coefficient, a round's
pairs -- and whatever the caller attaches). ``latest.json`` points at the newest slot and is switched atomically
(``os.replace``) only after the slot is complete, so a kill at any moment leaves the previous checkpoint whole.
Nothing is pickled: resuming never unpickles code from a file.

A backend's loop calls :meth:`StepCheckpoint.save` after each step's ``on_step`` callback returned (so what the
caller records per step -- the pipeline's metrics rows and path evaluations -- is in the same slot through
``extra``), and :meth:`StepCheckpoint.load` once before the first step. Only the main process writes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

LATEST = "latest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"


@dataclass
class Saved:
    """One checkpoint, read back: ``weights`` / ``tensors`` are what the loop passed to :meth:`StepCheckpoint.save`."""

    step: int
    weights: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    state: dict
    extra: Any = None
    _optimizer: dict = field(default_factory=dict, repr=False)
    _scheduler: dict | None = field(default=None, repr=False)
    _rngs: dict = field(default_factory=dict, repr=False)
    _torch_rng: torch.Tensor | None = field(default=None, repr=False)

    def restore(self, opt: torch.optim.Optimizer, sched=None, rngs: dict[str, random.Random] | None = None) -> None:
        """Put the optimizer, scheduler, Python RNGs and torch's RNG back as they were after ``step``."""
        opt.load_state_dict(self._optimizer)
        if sched is not None:
            if self._scheduler is None:
                raise ValueError("the checkpoint has no LR scheduler state")
            sched.load_state_dict(self._scheduler)
        for name, rng in (rngs or {}).items():
            version, internal, gauss = self._rngs[name]
            rng.setstate((version, tuple(internal), gauss))
        if self._torch_rng is not None:
            torch.set_rng_state(self._torch_rng)


_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file (the format: 8-byte header length, JSON header, raw little-endian data), each tensor
    written straight from its own memory. ``safetensors.torch.save_file`` first builds the whole file in one
    buffer: a PPO step's 58 MB checkpoint (adapter, Adam moments) sat on top of the stage's heap and set the
    default bench's peak RSS (2084 MiB, at the save). Read back by ``safetensors.torch.load_file`` as the same
    tensors (tests/test_resume.py). On a big-endian host (where a tensor's memory is not the file's byte order)
    safetensors' own writer, which converts, does it instead."""
    if sys.byteorder != "little":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return
    names = sorted(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot checkpoint tensor {name!r} of dtype {t.dtype}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in names:
            t = tensors[name].contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class StepCheckpoint:
    """Where one training loop keeps its latest state. ``every``: steps between saves (the last step is always
    saved); ``extra()``: JSON-able state of the caller, stored with each slot and returned as ``Saved.extra``."""

    def __init__(self, folder: str | os.PathLike[str], every: int = 1, extra: Callable[[], Any] | None = None):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {every}")
        self.folder, self.every, self.extra = Path(folder), every, extra
        self._loaded: tuple[Saved | None] | None = None  # load() is read once (the caller and the loop both ask)

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    def save(self, step: int, *, weights: dict[str, torch.Tensor], opt: torch.optim.Optimizer, sched=None,
             rngs: dict[str, random.Random] | None = None, state: dict | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> None:
        from prefopt.backends._common import dist_state

        self._loaded = None
        if not dist_state().is_main_process:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        slot = self.folder / f"step-{step:06d}"
        shutil.rmtree(slot, ignore_errors=True)
        slot.mkdir()
        flat = {f"weights/{k}": v for k, v in weights.items()}
        flat.update({f"tensors/{k}": v for k, v in (tensors or {}).items()})
        opt_state = opt.state_dict()
        opt_scalars: dict[str, dict] = {}
        for idx, st in opt_state["state"].items():
            for name, val in st.items():
                if torch.is_tensor(val):
                    flat[f"opt/{idx}/{name}"] = val
                else:
                    opt_scalars.setdefault(str(idx), {})[name] = val
        flat["torch_rng"] = torch.get_rng_state()
        write_safetensors({k: v.detach().contiguous().cpu() for k, v in flat.items()}, slot / TENSORS)
        meta = {
            "step": step, "state": state or {}, "param_groups": opt_state["param_groups"], "opt_scalars": opt_scalars,
            "scheduler": sched.state_dict() if sched is not None else None,
            "rngs": {name: rng.getstate() for name, rng in (rngs or {}).items()},
            "extra": self.extra() if self.extra is not None else None,
        }
        (slot / STATE).write_text(json.dumps(meta), encoding="utf-8")
        previous = self._latest()
        tmp = self.folder / (LATEST + ".tmp")
        tmp.write_text(json.dumps({"slot": slot.name}), encoding="utf-8")
        os.replace(tmp, self.folder / LATEST)  # the switch: atomic
        if previous is not None and previous != slot:
            shutil.rmtree(previous, ignore_errors=True)

    def _latest(self) -> Path | None:
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        return self.folder / json.loads(pointer.read_text(encoding="utf-8"))["slot"]

    def load(self) -> Saved | None:
        """The newest complete checkpoint, or None when there is none (nothing is unpickled)."""
        if self._loaded is None:
            self._loaded = (self._read(),)
        return self._loaded[0]

    def _read(self) -> Saved | None:
        from safetensors.torch import load_file

        slot = self._latest()
        if slot is None or not (slot / STATE).is_file():
            return None
        meta = json.loads((slot / STATE).read_text(encoding="utf-8"))
        flat = load_file(str(slot / TENSORS))
        opt_state: dict[int, dict] = {}
        for k, v in flat.items():
            if k.startswith("opt/"):
                _, idx, name = k.split("/", 2)
                opt_state.setdefault(int(idx), {})[name] = v
        for idx, scalars in meta["opt_scalars"].items():
            opt_state.setdefault(int(idx), {}).update(scalars)
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
        pick = lambda prefix: {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}  # noqa: E731
        return Saved(meta["step"], pick("weights/"), pick("tensors/"), meta["state"], meta["extra"],
                     {"state": opt_state, "param_groups": groups}, meta["scheduler"], meta["rngs"], flat.get("torch_rng"))


def resume(checkpoint: StepCheckpoint | None, shared, role: str, opt: torch.optim.Optimizer, sched=None,
           rngs: dict[str, random.Random] | None = None) -> Saved | None:
    """A loop's start: the newest checkpoint's weights put back into ``role``, and its optimizer, scheduler and
    RNG states restored (None, and nothing touched, without one)."""
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        shared.load_adapter_state(role, saved.weights)
        saved.restore(opt, sched, rngs)
    return saved
