"""``prefopt eval RUN...``: evaluate saved runs' policies and the reference together, on the same held-out
prompts with identical decoding, into one result folder (every ``eval/*`` metric and every head-to-head win rate).

Policies are loaded from their PEFT adapter folders onto one copy of the base; each policy's proxy reward is the
reward model of its own run (when that run trained one).
"""

from __future__ import annotations

import copy
import os
import re
import time
from datetime import datetime
from pathlib import Path

import torch

from prefopt import config as C
from prefopt.backends import BACKENDS
from prefopt.backends import rm as rm_backend
from prefopt.data.io import load_prompts
from prefopt.data.judges import load_judge
from prefopt.errors import RunError
from prefopt.eval.harness import REFERENCE, BestOfN, evaluate
from prefopt.eval.metrics import metric_versions
from prefopt.models.base import pick_device
from prefopt.models.shared import LoraSettings, SharedBase
from prefopt.pipeline.bench import (
    POLICY_INFO,
    SFT_DIR,
    RunResult,
    Stages,
    base_model,
    eval_settings,
    reward_fn,
    sft_digest,
    versions,
)
from prefopt.pipeline.config import BenchConfig
from prefopt.reports.run import FILES, read_marker, write_run


def _saved_run(path: Path) -> dict:
    marker = read_marker(path)
    if marker is None or marker.get("kind") != "run":
        raise RunError(f"{path}: not a prefopt run folder (written by `prefopt bench` or `prefopt train`)")
    if not marker.get("complete"):
        raise RunError(f"{path}: incomplete run (stopped before it finished): run it again")
    config = C.load_file(path / FILES["config"])
    policies = sorted(p.parent.name for p in (path / "policies").glob(f"*/{POLICY_INFO}"))
    if not policies:
        raise RunError(f"{path}: has no saved policies (policies/<name>/adapter_model.safetensors)")
    return {"dir": path, "config": config, "policies": policies}


def evaluate_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None, *,
                  sets: tuple[str, ...] = (), console=None, overwrite: bool = False) -> RunResult:
    """Evaluate every policy of ``run_dirs`` and the reference; ``sets`` may change ``eval.*`` / ``judge``."""
    t_start = time.perf_counter()
    runs = [_saved_run(Path(d)) for d in run_dirs]
    if len({str(r["dir"].resolve()) for r in runs}) != len(runs):
        raise RunError("a run folder is given twice: each run is evaluated once")
    models = {r["config"].get("model") for r in runs}
    if len(models) > 1:
        raise RunError(f"runs are on different base models ({', '.join(sorted(map(str, models)))}): evaluate each base separately")
    sfts = {sft_digest(r["dir"] / SFT_DIR) if (r["dir"] / SFT_DIR).is_dir() else None for r in runs}
    if len(sfts) > 1:
        raise RunError("runs are on different SFT bases (or some had an SFT stage and others not): evaluate each "
                       "base separately")
    sft_id = sfts.pop()
    data = copy.deepcopy(runs[0]["config"])
    for text in sets:
        path, raw = C.parse_assignment(text)
        if path[0] not in ("eval", "judge", "threads", "device"):
            raise RunError(f"--set {text}: prefopt eval only changes eval.*, judge, threads and device")
        C.set_path(data, path, C.coerce(raw, C.field_type(BenchConfig, path, where=f"--set {text}"),
                                        where=f"--set {text}", path=".".join(path)))
    cfg = C.build(BenchConfig, data, where=str(runs[0]["dir"] / FILES["config"]))
    prompts = load_prompts(runs[0]["dir"] / FILES["eval_prompts"])
    judge = load_judge(cfg.judge)
    stages = Stages(console)
    names: dict[str, tuple[Path, str]] = {}  # display name -> (run dir, policy)
    for i, r in enumerate(runs):
        for p in r["policies"]:
            names[p if len(runs) == 1 else f"{r['dir'].name}/{p}"] = (r["dir"], p)
    if len(names) != sum(len(r["policies"]) for r in runs):
        raise RunError("two runs share a folder name: give runs with distinct folder names")
    infos = {display: C.load_file(run_dir / "policies" / policy / POLICY_INFO) for display, (run_dir, policy) in names.items()}
    text_rewards = {}  # best-of-n trains nothing: it is rebuilt from its n and its run's reward source
    for display, info in infos.items():
        if info.get("backend") != "bon":
            continue
        spec, run_dir = info.get("config", {}).get("reward", "rm"), names[display][0]
        if spec == "rm" and not (run_dir / "rm").is_dir():
            raise RunError(f"{run_dir}: best-of-n policy '{names[display][1]}' ranks by the run's reward model, "
                           "but the run has no rm/ folder")
        if spec not in ("rm", "gold") and spec not in text_rewards:
            from prefopt.models.rewards import SequenceClassifierReward

            text_rewards[spec] = SequenceClassifierReward.load(spec[3:]) if spec.startswith("hf:") else load_judge(spec)

    out = Path(out_dir) if out_dir else Path("runs") / datetime.now().strftime("eval-%Y%m%d-%H%M%S")
    from prefopt.reports.run import RunFolder

    RunFolder.create(out, kind="eval", overwrite=overwrite).abort()  # is the output writable? (before compute)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = pick_device(cfg.device)
    with stages.stage("load base"):
        lm, tok = base_model(cfg.model, device)
    shared = SharedBase(lm, tok, LoraSettings(**data.get("lora", {})))
    if sft_id is not None:  # the runs' base: their SFT adapter merged in (the reference is the SFT model)
        shared.load_role(SFT_DIR, runs[0]["dir"] / SFT_DIR)
        shared = shared.merge_role(SFT_DIR)
    roles, proxies, rms, policy_info = {}, {}, {}, {}
    for display, (run_dir, policy) in names.items():
        info = infos[display]
        if (run_dir / "rm").is_dir():
            if run_dir not in rms:
                rms[run_dir] = rm_backend.RewardModel.load(shared, run_dir / "rm", role=f"rm{len(rms)}")
            proxies[display] = rms[run_dir].score_ids
        if info.get("backend") == "bon":
            spec = info.get("config", {}).get("reward", "rm")
            roles[display] = BestOfN(int(info["config"]["n"]), reward_fn(spec, rms.get(run_dir), judge, tok, text_rewards))
        else:
            role = re.sub(r"[^A-Za-z0-9_]", "_", f"p{len(roles)}_{policy}")
            shared.load_role(role, run_dir / "policies" / policy)
            roles[display] = role
        policy_info[display] = {"backend": info.get("backend"), "config": info.get("config", {}), "run": str(run_dir)}
    if runs[0]["dir"] in rms:
        proxies[REFERENCE] = rms[runs[0]["dir"]].score_ids
    policies = {REFERENCE: None, **roles}
    with stages.stage("eval", total=len(prompts) * len(policies)) as adv:
        result = evaluate(shared, policies, prompts, judge, cfg.eval, proxies=proxies,
                          on_progress=lambda name, k: adv(k))
    timings = dict(stages.timings, total=round(time.perf_counter() - t_start, 1))
    meta = {"versions": versions(), "runs": [str(r["dir"]) for r in runs], "device": str(shared.device),
            "timings_s": timings, "n_eval_prompts": len(prompts), "n_held_out_eval_pairs": result.n_held_out_pairs,
            "seed": cfg.seed, "created": datetime.now().isoformat(timespec="seconds")}
    extra = {"eval_settings": eval_settings(cfg, prompts, sft_id), "metric_versions": metric_versions(),
             "policy_info": policy_info, "backends": list(BACKENDS)}
    path = write_run(out, config=C.to_dict(cfg), metrics=[], summary=result.summary, samples=result.samples,
                     meta=meta, policies=list(policies), overwrite=overwrite, kind="eval", extra=extra)
    return RunResult(path, result.summary, timings, [])
