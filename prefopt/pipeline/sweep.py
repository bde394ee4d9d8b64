"""``prefopt sweep SWEEP_FILE``: a grid over config fields x seeds across policies, run on Optuna.

A sweep file (YAML, TOML or JSON)::

    name: dpo-vs-ppo              # the study name (default: the file's stem)
    preset: default               # starting config (optional); `base:` a config file, relative to this file
    set: {data.n_eval: 64}        # overrides for every cell (also from the command line: --set)
    seeds: [0, 1]
    grid: {rm.epochs: [2]}        # crossed with every arm (optional)
    arms:                         # an arm is one policy (its name is the algorithm in the report) and its grid
      dpo: {backend: dpo, grid: {beta: [0.05, 0.1, 0.2, 0.5]}}
      ppo: {backend: ppo, grid: {kl_coef: [0.02, 0.05, 0.1, 0.2]}}
      ppo-gt: {backend: ppo, reward: gold}

Every cell (arm x arm grid x sweep grid x seed) is one run folder ``<out>/cells/<cell>/`` with one policy; stages
the cells share (synthetic pairs, reward model) are computed once in ``<out>/cache/``. Every cell's config is
built and validated before any compute.

The cells are an Optuna study in a storage every worker points at (default: ``sqlite:///<out>/sweep.db``; any
SQLAlchemy URL, e.g. a shared PostgreSQL, lets several machines pull cells of one sweep). The one worker that
creates the study queues every cell as a trial (``study.enqueue_trial``); workers pop queued trials atomically
(``study.ask``: WAITING -> RUNNING), so no cell is handed out twice. A cell killed with ``kill -9`` stops sending
heartbeats, is failed after the grace period by the next worker that looks, and re-queued
(``RetryHeartbeatStaleTrialCallback``); a cell that ended in an error is re-queued when the sweep is started again
(if two workers re-queue one cell at once, the lower trial number runs it, the other is pruned). A worker returns
when every cell is complete (it waits for cells running elsewhere, so it can pick up one that dies).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt import config as C
from prefopt.errors import ConfigError, RunError
from prefopt.pipeline.config import BenchConfig, config_dict
from prefopt.reports.run import MARKER, RunFolder, dump_json, read_marker

SWEEP_FILE = "sweep.json"
_SAFE = re.compile(r"[^A-Za-z0-9_.=-]+")


@dataclass
class Cell:
    id: str
    arm: str
    seed: int
    values: dict[str, Any]  # the grid values of this cell (arm grid + sweep grid)
    config: dict[str, Any]  # the full run config (file form)


@dataclass
class SweepSpec:
    name: str
    cells: list[Cell]
    source: str

    def fingerprint(self) -> str:
        import hashlib

        doc = json.dumps([(c.id, c.config) for c in self.cells], sort_keys=True, default=str)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _grid(spec: Any, where: str) -> list[dict[str, Any]]:
    if spec is None:
        return [{}]
    if not isinstance(spec, dict) or not all(isinstance(v, list) and v for v in spec.values()):
        raise ConfigError(f"{where}: a grid maps field names to non-empty lists of values")
    keys = list(spec)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(spec[k] for k in keys))]


def _value_text(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def load_sweep(path: str | os.PathLike, *, sets: tuple[str, ...] = ()) -> SweepSpec:
    """Read a sweep file and build (and validate) every cell's config."""
    path = Path(path)
    doc = C.load_file(path)
    label = str(path)
    known = {"name", "preset", "base", "set", "seeds", "grid", "arms"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise C.unknown_field(label, "", unknown[0], sorted(known))
    name = str(doc.get("name") or path.stem)
    base = doc.get("base")
    base_file = str((path.parent / base).resolve()) if base else None
    set_spec = doc.get("set") or {}
    if isinstance(set_spec, dict):
        file_sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in set_spec.items()]
    elif isinstance(set_spec, list):
        file_sets = [str(s) for s in set_spec]
    else:
        raise ConfigError(f"{label}: 'set' must map field paths to values")
    seeds = doc.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{label}: 'seeds' must be a non-empty list of integers")
    arms = doc.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{label}: 'arms' must map arm names to policies, e.g. dpo: {{backend: dpo, grid: {{beta: [0.1]}}}}")
    sweep_grid = _grid(doc.get("grid"), f"{label}: grid")
    cells: list[Cell] = []
    for arm, arm_spec in arms.items():
        if not isinstance(arm_spec, dict) or "backend" not in arm_spec:
            raise ConfigError(f"{label}: arm '{arm}' needs a backend")
        fields = {k: v for k, v in arm_spec.items() if k != "grid"}
        for arm_point in _grid(arm_spec.get("grid"), f"{label}: arms.{arm}.grid"):
            for point in sweep_grid:
                for seed in seeds:
                    grid_sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()]
                    where = f"{label}: cell {arm} {arm_point} {point} seed {seed}"
                    try:
                        data = config_dict(str(doc.get("preset", "default")), base_file,
                                           [*file_sets, *sets, *grid_sets, f"seed={seed}"])
                        data["policies"] = {arm: C.merge(fields, arm_point)}
                        C.build(BenchConfig, data, where=where)
                    except ConfigError as e:
                        raise ConfigError(f"{where}: {str(e)}") from None
                    values = {**arm_point, **point}
                    parts = [arm, *(f"{k}={_value_text(v)}" for k, v in values.items()), f"seed={seed}"]
                    cid = _SAFE.sub("_", "__".join(parts))
                    cells.append(Cell(cid, arm, seed, values, data))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{label}: two cells have the same id (repeated grid values?)")
    return SweepSpec(name, cells, label)


# ------------------------------------------------------------------------------------------------ running
@dataclass
class SweepResult:
    out_dir: Path
    done: list[str]
    ran: list[str]


def _storage(url: str, heartbeat: int, grace: int, lock_dir: Path):
    """Optuna's RDB storage with heartbeats. Two workers creating a fresh database at the same moment race in
    its schema setup: a lock serialises that on one machine, and a retry covers several machines."""
    import fcntl

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:
            with open(lock_dir / ".storage.lock", "w") as lock, warnings.catch_warnings():
                fcntl.flock(lock, fcntl.LOCK_EX)
                warnings.simplefilter("ignore")  # heartbeat is 'experimental' in Optuna's terms
                return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                                  engine_kwargs=kwargs), optuna
        except Exception as e:  # sqlalchemy IntegrityError / OperationalError while another worker sets up
            if attempt == 4:
                raise RunError(f"cannot open the sweep storage {url} ({' '.join(str(e).split())[:200]})") from None
            time.sleep(1 + attempt)


def _init_folder(out: Path, spec: SweepSpec) -> None:
    """Create the sweep folder (marker + sweep.json) or check that an existing one is this same sweep."""
    marker = read_marker(out)
    doc = {"name": spec.name, "fingerprint": spec.fingerprint(), "source": spec.source,
           "cells": [{"id": c.id, "arm": c.arm, "seed": c.seed, "values": c.values} for c in spec.cells]}
    if marker is not None:
        if marker["kind"] != "sweep":
            raise RunError(f"{out}: is a prefopt {marker['kind']} folder, not a sweep folder: choose another --out")
        old = json.loads((out / SWEEP_FILE).read_text(encoding="utf-8"))
        if old.get("fingerprint") != doc["fingerprint"]:
            raise RunError(f"{out}: holds a different sweep (its cells or their configs changed since it started): "
                           "use another --out, or the same sweep file and --set values")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out}: exists and is not a prefopt sweep folder: choose another --out")
    folder = RunFolder.create(out, kind="sweep")
    folder.write_text(SWEEP_FILE, dump_json(doc))
    try:
        folder.finish()
    except RunError:  # another worker created it first: fine if it is the same sweep
        _init_folder(out, spec)


def run_sweep(spec: SweepSpec, out: str | os.PathLike, *, storage: str | None = None, heartbeat: int = 30,
              grace: int | None = None, console=None, poll: float | None = None) -> SweepResult:
    """Run cells until every cell of the sweep is complete (this worker and any others on the same storage)."""
    from rich.console import Console

    from prefopt.pipeline.bench import keep_bases
    from prefopt.pipeline.bench import run as run_cell

    console = console or Console(stderr=True)
    out = Path(out)
    try:
        _init_folder(out, spec)
    except OSError as e:
        raise RunError(f"{out}: cannot write the sweep folder ({e.strerror or e}): choose a writable --out") from None
    url = storage or f"sqlite:///{(out / 'sweep.db').resolve()}"
    grace = grace or 3 * heartbeat
    store, optuna = _storage(url, heartbeat, grace, out)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    ids = [c.id for c in spec.cells]
    by_id = {c.id: c for c in spec.cells}
    TS = optuna.trial.TrialState
    ran: list[str] = []
    returned: list[int] = []  # trials whose objective ended with a value (their result is on disk)
    try:  # exactly one worker creates the study and queues every cell
        study = optuna.create_study(study_name=spec.name, storage=store, direction="maximize")
        for cid in ids:
            study.enqueue_trial({"cell": cid})
        study.set_user_attr("queued", len(ids))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=store)
        deadline = time.time() + 60
        while "queued" not in study.user_attrs and time.time() < deadline:  # its creator is still queueing
            time.sleep(0.5)

    def cell_of(t) -> str | None:
        return t.params.get("cell", t.system_attrs.get("fixed_params", {}).get("cell"))

    def objective(trial) -> float:
        trials = study.get_trials(deepcopy=False)
        attrs = next(t.system_attrs for t in trials if t.number == trial.number)
        if "fixed_params" not in attrs and "failed_trial" not in attrs:
            raise optuna.TrialPruned("no cell: another worker took the queued one")
        cell_id = trial.suggest_categorical("cell", ids)
        for t in trials:  # a cell queued twice (two workers re-queued it at once): the lower trial number runs it
            if t.number < trial.number and cell_of(t) == cell_id and t.state in (TS.WAITING, TS.RUNNING, TS.COMPLETE):
                raise optuna.TrialPruned(f"cell {cell_id} is handled by trial {t.number}")
        cell = by_id[cell_id]
        cell_dir = out / "cells" / cell_id
        trial.set_user_attr("run_dir", str(cell_dir))
        marker = read_marker(cell_dir)
        if marker is None or not marker.get("complete"):
            console.log(f"[bold]cell {cell_id}[/] (trial {trial.number})")
            cfg = C.build(BenchConfig, cell.config, where=f"cell {cell_id}")
            run_cell(cfg, cell_dir, cache_dir=out / "cache", console=console,
                     extra_meta={"sweep": spec.name, "cell": cell_id, "arm": cell.arm, "values": cell.values})
            ran.append(cell_id)
        else:  # finished on disk by a worker killed before it could report it
            console.log(f"cell {cell_id}: already complete on disk")
        summary = json.loads((cell_dir / "summary.json").read_text(encoding="utf-8"))
        gold = next(r["mean"] for r in summary["summary"] if r["policy"] == cell.arm and r["metric"] == "eval/gold_reward")
        returned.append(trial.number)
        return float(gold)

    with keep_bases():  # the cells this worker runs share one loaded base (each gets a copy)
        said_waiting = False
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optuna.storages.fail_stale_trials(study)  # killed cells: failed and re-queued after the grace period
            trials = study.get_trials(deepcopy=False)
            complete = {cell_of(t) for t in trials if t.state == TS.COMPLETE}
            if complete >= set(ids):
                break
            live = {cell_of(t) for t in trials if t.state in (TS.WAITING, TS.RUNNING)}
            for cid in ids:  # cells whose trials all ended in an error (or were never queued): queue them again
                if cid not in complete and cid not in live:
                    study.enqueue_trial({"cell": cid})
            if study.get_trials(deepcopy=False, states=(TS.WAITING,)):
                said_waiting = False
                before = len(returned)
                try:
                    study.optimize(objective, n_trials=1, catch=())
                except (ValueError, AssertionError):
                    # the objective ended with its value, but another worker had settled the trial first (its
                    # heartbeat looked stale while this process was starved of CPU, so it was failed there): optuna's
                    # tell refuses ("Cannot tell a FAIL trial") and then trips its own assert. The cell's result is
                    # on disk; the next pass re-queues the cell and takes it from there. Anything else is a defect.
                    if len(returned) == before:
                        raise
                    console.log(f"trial {returned[-1]} was settled by another worker while it ran; its cell is "
                                f"complete on disk")
                continue
            if not said_waiting:
                running = sorted(c for c in live if c not in complete)
                console.log(f"waiting for {len(running)} cell(s) running in other workers: {', '.join(running[:4])}"
                            f"{' ...' if len(running) > 4 else ''}")
                said_waiting = True
            time.sleep(poll if poll is not None else min(heartbeat, 10))
    return SweepResult(out, ids, ran)


__all__ = ["MARKER", "SweepSpec", "load_sweep", "run_sweep"]
