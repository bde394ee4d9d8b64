"""Stages computed once: synthetic pairs and the reward model, cached by a fingerprint of what they depend on.

A sweep over DPO's beta generates its pairs once; a sweep over PPO's KL coefficient also trains its reward model
once. A stage's key is a hash of every config field and input it depends on (model identity, data files' contents,
seeds, the stage's own config, prefopt's version); its folder holds the artifact (``pairs.jsonl``; a PEFT adapter
folder for the reward model) and ``stage.json`` with the spec that produced it. Writes are atomic (staging folder
renamed into place) and guarded by a lock, so two sweep workers needing the same stage compute it once: the second
waits and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import prefopt
from prefopt.pipeline.config import EMBEDDED_PROMPTS, BenchConfig

STAGE_VERSIONS = {"pairs": 2, "rm": 1, "sft": 1}
DONE = "stage.json"


def file_digest(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def source_identity(spec: str | None) -> Any:
    """What a data/model source *is*: a local file's content hash, a local folder's files (size, mtime), else the
    name (hub ids, aliases, 'embedded:...')."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if p.is_file():
        return {"file": p.name, "sha256": file_digest(p)}
    if p.is_dir():
        return {"dir": p.name, "files": sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())}
    return spec


def model_identity(spec: str) -> Any:
    from prefopt.models.base import ALIASES, resolve_model

    if spec in ALIASES or spec.endswith(".gguf"):
        src = resolve_model(spec)
        f = Path(src.path) / src.gguf_file
        return {"model": spec, "gguf": src.gguf_file, "size": f.stat().st_size}
    return {"model": spec, "source": source_identity(spec) if Path(spec).exists() else spec}


def fingerprint(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pairs_spec(cfg: BenchConfig, sft_key: str | None = None) -> dict:
    d = asdict(cfg.data)
    spec = {"stage": "pairs", "v": STAGE_VERSIONS["pairs"], "prefopt": prefopt.__version__,
            "model": model_identity(cfg.model), "judge": cfg.judge, "seed": cfg.seed, "data": d,
            "prompts": source_identity(None if cfg.data.prompts == EMBEDDED_PROMPTS else cfg.data.prompts)}
    if sft_key is not None:  # sampled from the SFT model
        spec["sft"] = sft_key
    return spec


def reference_id(cfg: BenchConfig, device, sft_key: str | None = None) -> str:
    """Names the run's pi_ref (base model, SFT stage, device and dtype): reference log-probs recorded under one
    are used only under the same one."""
    from prefopt.models.base import pick_dtype

    return fingerprint({"model": model_identity(cfg.model), "sft": sft_key, "device": str(device),
                        "dtype": str(pick_dtype(device))})


def rm_spec(cfg: BenchConfig, pairs_key: str, sft_key: str | None = None) -> dict:
    rm = asdict(cfg.rm)
    rm["seed"] = cfg.seed if cfg.rm.seed is None else cfg.rm.seed
    rm.pop("when", None)  # when to train it does not change what is trained
    spec = {"stage": "rm", "v": STAGE_VERSIONS["rm"], "prefopt": prefopt.__version__,
            "model": model_identity(cfg.model), "pairs": pairs_key, "rm": rm, "lora": asdict(cfg.lora)}
    if sft_key is not None:  # trained on the SFT base
        spec["sft"] = sft_key
    return spec


def sft_spec(cfg: BenchConfig, demos: list) -> dict:
    """The SFT stage depends on the base, the demonstrations themselves, the 'sft' section, LoRA and the seed."""
    sft = asdict(cfg.sft)
    sft["seed"] = cfg.seed if cfg.sft.seed is None else cfg.sft.seed
    content = json.dumps([[d.prompt, d.response, d.meta] for d in demos], sort_keys=True, default=str)
    return {"stage": "sft", "v": STAGE_VERSIONS["sft"], "prefopt": prefopt.__version__, "model": model_identity(cfg.model),
            "demos": hashlib.sha256(content.encode()).hexdigest()[:16], "sft": sft, "lora": asdict(cfg.lora)}


class StageCache:
    """Folders ``<root>/<stage>/<key>/`` holding finished stage artifacts; ``root=None`` caches nothing."""

    def __init__(self, root: str | os.PathLike[str] | None):
        self.root = Path(root) if root is not None else None

    @contextlib.contextmanager
    def claim(self, stage: str, spec: dict) -> Iterator["Claim"]:
        """Hold the stage's lock: ``claim.hit`` is the finished folder, or None (then compute and ``store``)."""
        if self.root is None:
            yield Claim(None, None, fingerprint(spec))
            return
        key = fingerprint(spec)
        base = self.root / stage
        base.mkdir(parents=True, exist_ok=True)
        folder = base / key
        with open(base / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here while the first computes
            try:
                hit = folder if (folder / DONE).is_file() else None
                yield Claim(folder, hit, key, spec)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class Claim:
    def __init__(self, folder: Path | None, hit: Path | None, key: str, spec: dict | None = None):
        self.folder, self.hit, self.key, self.spec = folder, hit, key, spec

    def store(self, write) -> Path | None:
        """Write the artifact with ``write(staging_folder)`` and rename it into place (no-op without a cache)."""
        if self.folder is None:
            return None
        staging = self.folder.with_name(f"{self.folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            write(staging)
            (staging / DONE).write_text(json.dumps({"key": self.key, "spec": self.spec}, indent=2, default=str) + "\n")
            shutil.rmtree(self.folder, ignore_errors=True)
            os.replace(staging, self.folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.folder


def link_tree(src: Path, dst: Path) -> None:
    """Put a cached artifact folder into a run folder: hard links where possible (no copy), else a copy."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name == DONE:
            continue
        target = dst / item.name
        if item.is_dir():
            link_tree(item, target)
            continue
        try:
            os.link(item, target)
        except OSError:
            shutil.copy2(item, target)
