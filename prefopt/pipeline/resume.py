"""Resume from any kill: a run keeps its progress next to its output folder until the output is complete.

``prefopt bench`` / ``train`` (and so every sweep cell) write ``<out>.resume/`` once their inputs are validated::

    resume.json     which run this is: the fingerprint of the resolved config, the inputs' contents, the model and
                    prefopt's version; the output folder; when it started
    lock            held (flock) by the process running it: a second process on the same run refuses to start
    stages/         the stage cache (pairs, reward model, SFT adapter) when no --cache is given
    train/<stage>/  the step checkpoint of a training stage in progress (prefopt.backends.checkpoint), with the
                    stage's metrics rows and path evaluations so far
    done/<stage>/   a finished policy: its adapter folder and rows.json (metrics rows, path rows)
    eval/<policy>.json  a policy's evaluation samples and scores, written as each policy's evaluation ends

Started again with the same command after a kill (SIGKILL, power loss, Ctrl-C), a run finds its progress by the
fingerprint, takes finished stages from it and continues a training stage after its last saved step; on CPU with the
same seed it ends with the same ``summary.json`` metrics as a run that was never stopped (tested by killing real
processes). The folder is removed when the run folder is complete, and also when the run stops on a user error (the
command must change, so its fingerprint will too). Nothing in it is pickled.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import prefopt
from prefopt import config as C
from prefopt.backends.checkpoint import StepCheckpoint
from prefopt.errors import RunError
from prefopt.models.kernels import linear_kernel
from prefopt.pipeline.config import EMBEDDED_PROMPTS, BenchConfig
from prefopt.pipeline.stages import fingerprint, model_identity, source_identity

SUFFIX = ".resume"
INFO = "resume.json"
ROWS = "rows.json"
VERSION = 1


def run_spec(cfg: BenchConfig, evaluate: bool) -> dict:
    """What a run's results depend on: two commands with the same spec compute the same thing."""
    d = cfg.data
    files = {k: source_identity(getattr(d, k)) for k in ("pairs", "prompts", "demos")
             if getattr(d, k) and getattr(d, k) != EMBEDDED_PROMPTS}
    return {"v": VERSION, "prefopt": prefopt.__version__, "config": C.to_dict(cfg), "evaluate": evaluate,
            "model": model_identity(cfg.model), "inputs": files,
            "linear_kernel": linear_kernel()}  # oneDNN's products differ from MKL's by rounding


def progress_folder(out: Path) -> Path:
    return out.with_name(out.name + SUFFIX)


def find_unfinished(root: Path, spec: dict, pattern: str = "bench-*") -> Path | None:
    """The output folder of the newest unfinished run under ``root`` with this spec that no process is running
    (how ``prefopt bench`` without --out finds the run it was killed in)."""
    key = fingerprint(spec)
    found = []
    for info in root.glob(f"{pattern}{SUFFIX}/{INFO}"):
        try:
            doc = json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if doc.get("fingerprint") == key and doc.get("default_out") and not _locked(info.parent):
            found.append((doc.get("created", ""), info.parent))
    if not found:
        return None
    folder = max(found)[1]
    return folder.with_name(folder.name[: -len(SUFFIX)])


def _locked(folder: Path) -> bool:
    try:
        with open(folder / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


@dataclass
class Done:
    folder: Path  # the stage's artifact (a policy's adapter folder)
    metrics: list[dict]
    path: list[dict]


class Progress:
    """One run's progress folder, locked by this process while it is open. The other ranks of a multi-process run
    :meth:`follow` rank 0's: they read its checkpoints and write nothing."""

    def __init__(self, folder: Path, lock, resumed: bool, created: str, writer: bool = True):
        self.folder, self._lock, self.resumed, self.created, self.writer = folder, lock, resumed, created, writer

    @classmethod
    def follow(cls, out: Path, resumed: bool) -> "Progress":
        return cls(progress_folder(out), None, resumed, "", writer=False)

    @classmethod
    def open(cls, out: Path, spec: dict, *, overwrite: bool = False, default_out: bool = False) -> "Progress":
        """Take (or start) the progress of the run writing ``out``. A folder left by a run with another spec is
        refused unless ``overwrite``, which discards it."""
        folder = progress_folder(out)
        key = fingerprint(spec)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / "lock", "a")
        except OSError as e:
            raise RunError(f"{folder}: cannot write the run's progress ({e.strerror or e}): choose a writable --out") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RunError(f"{out}: another prefopt process is running this run ({folder} is locked): wait for it "
                           "to finish or choose another --out") from None
        info = folder / INFO
        doc = None
        if info.is_file():
            try:
                doc = json.loads(info.read_text(encoding="utf-8"))
            except ValueError:
                doc = None  # torn by a kill while it was first written: nothing was computed yet
        if doc is not None and doc.get("fingerprint") != key:
            if not overwrite:
                lock.close()
                raise RunError(f"{folder}: holds an unfinished run of a different config or data (started "
                               f"{doc.get('created', '?')}): run its original command to continue it, or pass "
                               "--overwrite to discard it")
            doc = None
        if doc is None:  # a fresh start: whatever is there belongs to no run
            for item in folder.iterdir():
                if item.name != "lock":
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
            doc = {"fingerprint": key, "out": str(out), "default_out": default_out,
                   "created": datetime.now().isoformat(timespec="seconds"), "spec": spec}
            _write_json(info, doc)
            return cls(folder, lock, False, doc["created"])
        return cls(folder, lock, True, doc.get("created", "?"))

    # ------------------------------------------------------------------------------------------ stages
    @property
    def cache_root(self) -> Path:
        return self.folder / "stages"

    def checkpoint(self, stage: str, extra: Callable[[], Any] | None = None) -> StepCheckpoint:
        return StepCheckpoint(self.folder / "train" / stage, extra=extra)

    def done(self, stage: str) -> Done | None:
        rows = self.folder / "done" / stage / ROWS
        if not rows.is_file():
            return None
        doc = json.loads(rows.read_text(encoding="utf-8"))
        return Done(rows.parent, doc["metrics"], doc["path"])

    def rows(self, stage: str) -> list[dict]:
        """A stage's metrics rows: from its done record, else from its last checkpoint (killed between storing
        its artifact and recording it), else none."""
        done = self.done(stage)
        if done is not None:
            return done.metrics
        saved = self.checkpoint(stage).load()
        return saved.extra["metrics"] if saved is not None and saved.extra else []

    def finish_stage(self, stage: str, metrics: list[dict], path: list[dict] = (), write=None) -> None:
        """Record a finished stage (atomically: written aside, renamed into place), then drop its checkpoint."""
        if not self.writer:
            return
        final = self.folder / "done" / stage
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if write is not None:
            write(tmp)
        _write_json(tmp / ROWS, {"metrics": list(metrics), "path": list(path)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        shutil.rmtree(self.folder / "train" / stage, ignore_errors=True)

    def eval_store(self, on_restore: Callable[[str], None] | None = None,
                   on_put: Callable[[str], None] | None = None) -> "EvalSamples":
        """The evaluation's per-policy samples (``on_restore(name)`` is called for each one found, ``on_put(name)``
        for each one stored)."""
        return EvalSamples(self.folder / "eval", self.writer, on_restore, on_put)

    # ------------------------------------------------------------------------------------------ the end
    def remove(self) -> None:
        """The run is complete (or cannot continue as configured): drop the progress and the lock."""
        if not self.writer:
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Keep the progress for the next start, let other processes take it."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class EvalSamples:
    """A :class:`prefopt.eval.harness.SampleStore` in the progress folder: one JSON file per evaluated policy
    (responses as token ids, texts, per-sample gold / KL / proxy scores; floats exact), written atomically."""

    def __init__(self, folder: Path, writer: bool, on_restore: Callable[[str], None] | None = None,
                 on_put: Callable[[str], None] | None = None):
        self.folder, self.writer, self.on_restore, self.on_put = folder, writer, on_restore, on_put

    def get(self, name: str):
        from prefopt.eval.harness import PolicySamples

        path = self.folder / f"{name}.json"
        try:
            samples = PolicySamples.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):  # absent, or torn by a kill: evaluate it again
            return None
        if self.on_restore is not None:
            self.on_restore(name)
        return samples

    def put(self, name: str, samples) -> None:
        if self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_json(self.folder / f"{name}.json", samples.to_json())
        if self.on_put is not None:
            self.on_put(name)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
