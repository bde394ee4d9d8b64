"""The comparison, end to end: data -> one base with LoRA roles -> reward model -> every policy -> eval -> report.

``run(load_config())`` is what ``prefopt bench`` runs (``prefopt train`` is the same without the final
evaluation). Every stage uses the same base, the same LoRA config and the same seeded split: the reward model and
offline methods train on the same pairs, online methods draw their prompts from the same training prompts, and the
evaluation prompts are held out from all of them. Every trained policy is saved as a PEFT adapter folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import resource
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from prefopt import config as C
from prefopt._alloc import active_allocator, bound_heap, keep_heap, release_heap, trim_heap
from prefopt.backends import BACKENDS
from prefopt.backends import rm as rm_backend
from prefopt.backends import sft as sft_backend
from prefopt.backends._common import REF_LOGPS, TrainData, dist_state, ref_logps_record
from prefopt.data.io import load_pairs, read_demos, read_pairs, read_prompts, write_pairs, write_prompts
from prefopt.data.judges import Judge, load_judge
from prefopt.data.records import PreferencePair, PromptRecord, prompt_key
from prefopt.data.split import holdout_pairs, prompts_from_pairs, split_prompts
from prefopt.data.synthetic import annotator_summary, simulate_preferences
from prefopt.data.tasks import sentiment_prompts
from prefopt.errors import Interrupted, PrefoptError, RunError
from prefopt.eval.harness import REFERENCE, BestOfN, evaluate, evaluate_point
from prefopt.eval.metrics import metric_versions
from prefopt.models.base import load_base, pick_device, resolve_model
from prefopt.models.kernels import linear_kernel
from prefopt.models.ops import decode_responses, encode_prompts, ends_with_eos, render_prompt, sample
from prefopt.models.rewards import SequenceClassifierReward, text_score_fn
from prefopt.models.shared import SharedBase
from prefopt.pipeline.config import EMBEDDED_PROMPTS, BenchConfig, Policy
from prefopt.pipeline.resume import Progress, find_unfinished, run_spec
from prefopt.pipeline.stages import Claim, StageCache, file_digest, fingerprint, pairs_spec, reference_id, rm_spec, sft_spec
from prefopt.reports.run import FILES, RunFolder, fill_run

POLICY_INFO = "policy.json"


@dataclass
class RunResult:
    out_dir: Path | None  # None on the ranks > 0 of a multi-process run (rank 0 writes the run folder)
    summary: list[dict]
    timings: dict[str, float]
    cache_hits: list[str]


class Stages:
    """Rich progress for every long stage, stage timings, and the metrics log (one row per step)."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=self.console, transient=True,
            disable=not self.console.is_terminal,
        )
        self.timings: dict[str, float] = {}
        self.peak_rss: dict[str, float] = {}  # the process's peak RSS (MiB) when each stage ended: which one set it
        self.metrics: list[dict] = []

    @contextmanager
    def stage(self, name: str, total: int | None = None, unit_metrics: tuple[str, ...] = (), done: int = 0):
        """A stage with a progress bar of ``total`` units, ``done`` of them finished before (a resumed stage)."""
        task = self.progress.add_task(name, total=total, info="", completed=done)
        t0 = time.perf_counter()

        def advance(n: int = 1, metrics: dict | None = None):
            nonlocal done
            done += n
            info = ""
            if metrics:
                info = "  ".join(f"{k.split('/')[-1]}={metrics[k]:.3f}" for k in unit_metrics if k in metrics)
                if not self.console.is_terminal:  # no live bar in logs/CI: one line per training step instead
                    self.console.log(f"{name} {done}/{total}  {info}", highlight=False)
            self.progress.update(task, advance=n, info=info)

        with self.progress:
            yield advance
        self.progress.remove_task(task)
        release_heap(force=True)  # what the stage freed goes back before the next stage's peak
        self.timings[name] = round(time.perf_counter() - t0, 1)
        self.peak_rss[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
        self.console.log(f"{name}: {self.timings[name]:.1f}s")

    def rows(self, stage: str) -> list[dict]:
        return [r for r in self.metrics if r["stage"] == stage]

    def note(self, name: str, seconds: float, text: str) -> None:
        self.timings[name] = round(seconds, 1)
        self.console.log(f"{name}: {text}")

    def logger(self, stage: str, advance, extra=None):
        def on_step(step: int, metrics: dict) -> None:
            self.metrics.append({"stage": stage, "step": step, **metrics})
            advance(1, metrics)
            if extra is not None:
                extra(step, metrics)

        return on_step


def versions() -> dict:
    import peft
    import transformers
    import trl

    import prefopt

    git = None
    here = Path(__file__).resolve().parent
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=here).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here.parent)],
                               capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
        if git and dirty:
            git += "+dirty"  # the code that ran is not exactly that commit
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "prefopt": prefopt.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "trl": trl.__version__, "python": platform.python_version(), "git": git,
    }


# ------------------------------------------------------------------------------------------------ step 0: inputs
@dataclass
class Inputs:
    """Everything read and validated before the first compute."""

    prompts: list[PromptRecord]
    given_pairs: list[PreferencePair] | None
    judge: Judge
    train: list[PromptRecord]
    eval: list[PromptRecord]
    held_out: int
    policies: dict[str, Policy]
    text_rewards: dict[str, object]  # 'hf:..' / 'py:..' reward sources, loaded once
    data_reports: list[dict] = field(default_factory=list)  # per data file: rows read, kept, dropped by kind
    demos: list = field(default_factory=list)  # demonstrations of the SFT stage (empty: no SFT stage)


def load_inputs(cfg: BenchConfig) -> Inputs:
    """Read and validate every input before any compute (bad input fails fast, nothing written)."""
    d = cfg.data
    resolve_model(cfg.model)  # a missing local model file fails here, not after minutes of work
    reports = []
    pairs = None
    if d.pairs:
        pairs, report = read_pairs(d.pairs, encoding_errors=d.encoding_errors, skip_invalid=d.skip_invalid)
        reports.append({"data": "pairs", **report.to_dict(), "line": report.line(), "format": report.format_line()})
    demos = []
    if d.demos:
        demos, report = read_demos(d.demos, encoding_errors=d.encoding_errors, skip_invalid=d.skip_invalid,
                                   prefix_words=d.prefix_words or (2, 8), seed=d.split_seed)
        reports.append({"data": "demos", **report.to_dict(), "line": report.line(), "format": report.format_line()})
    if d.prompts == EMBEDDED_PROMPTS:
        prompts = prompts_from_pairs(pairs) if pairs is not None else sentiment_prompts()
    else:
        prompts, report = read_prompts(d.prompts, field=d.prompt_field, prefix_words=d.prefix_words, seed=d.split_seed,
                                       encoding_errors=d.encoding_errors, skip_invalid=d.skip_invalid)
        reports.append({"data": "prompts", **report.to_dict(), "line": report.line(), "format": report.format_line()})
    judge = load_judge(cfg.judge)
    split = split_prompts(prompts, n_eval=d.n_eval, n_train=d.n_train, seed=d.split_seed)
    held_out = 0
    if pairs is not None:
        pairs, held_out = holdout_pairs(pairs, split.eval)
    if demos:  # an evaluation prompt never has its continuation in the SFT data (IMDb: the same review's words)
        demos, held = holdout_pairs(demos, split.eval)
        next(r for r in reports if r["data"] == "demos")["held_out_eval_prompts"] = held
    policies = cfg.resolved_policies()
    text_rewards: dict[str, object] = {}
    for pol in policies.values():
        spec = getattr(pol.config, "reward", None)
        if spec is None or spec in ("rm", "gold") or spec in text_rewards:
            continue
        if spec.startswith("hf:"):
            text_rewards[spec] = SequenceClassifierReward.load(spec[3:])
        else:
            text_rewards[spec] = load_judge(spec)  # py:module:function
    return Inputs(prompts, pairs, judge, split.train, split.eval, held_out, policies, text_rewards, reports, demos)


# ------------------------------------------------------------------------------------------------ stages
def synthesize_pairs(shared: SharedBase, judge, prompts: list[PromptRecord], cfg: BenchConfig, advance,
                     sft_key: str | None = None) -> list[PreferencePair]:
    """AlpacaFarm-style: k reference samples per prompt, gold-scored, labelled by the simulated annotator.

    At temperature 1 each pair also carries what the reference computed while sampling it: its log-probs of both
    responses (``meta["ref_logps"]``, with the run's reference id and the ids' digest), which DPO then takes
    instead of a forward pass over every pair (tests/test_pipeline.py checks them against that pass)."""
    d, tok = cfg.data, shared.tokenizer
    ids = encode_prompts([p.prompt for p in prompts], tok, d.max_prompt_tokens)
    flat = [p for p in ids for _ in range(d.k)]  # prompt i's k samples are rows i*k .. i*k+k-1
    record = d.temperature == 1.0  # sampled at another temperature, the recorded log-probs are not pi_ref's
    with shared.reference() as lm:  # several processes share the batches (the same samples as one process)
        got = sample(lm, tok, flat, max_new_tokens=d.max_new_tokens, temperature=d.temperature,
                     seed=cfg.seed, batch_size=d.gen_batch_size, on_batch=advance, dist=dist_state(), logprobs=record)
    responses, logps = got if record else (got, None)
    texts = decode_responses(responses, tok)
    rendered = [render_prompt(p.prompt, tok) for p in prompts for _ in range(d.k)]
    scores = judge.score(rendered, texts)
    ended = ends_with_eos(responses, tok.eos_token_id)
    eos, drawn = {}, {}
    grouped_texts, grouped_scores = [], []
    for i in range(len(prompts)):
        rows = range(i * d.k, (i + 1) * d.k)
        grouped_texts.append([texts[j] for j in rows])
        grouped_scores.append([float(scores[j]) for j in rows])
        for j in rows:
            eos[(i, texts[j])] = ended[j]
            drawn[(i, texts[j])] = j
    pairs = simulate_preferences(
        [p.prompt for p in prompts], grouped_texts, grouped_scores,
        annotator=d.annotators or d.annotator, pairs_per_prompt=d.pairs_per_prompt, seed=cfg.seed,
    )
    # remember which responses were cut at the length cap, so training does not append an EOS they never had
    index = {prompt_key(p.prompt): i for i, p in enumerate(prompts)}
    ref = reference_id(cfg, shared.device, sft_key) if record else None
    for pair in pairs:
        i = index[prompt_key(pair.prompt)]
        pair.meta["chosen_eos"] = eos[(i, pair.chosen)]
        pair.meta["rejected_eos"] = eos[(i, pair.rejected)]
        if record:
            c, r = drawn[(i, pair.chosen)], drawn[(i, pair.rejected)]
            pair.meta[REF_LOGPS] = ref_logps_record(ref, (flat[c], responses[c], logps[c]), (flat[r], responses[r], logps[r]))
    return pairs


def reward_fn(spec: str, rm, judge: Judge, tokenizer, text_rewards: dict):
    """The score function a policy's ``reward`` names (dispatch on the name happens here, once)."""
    if spec == "rm":
        return rm.score_ids  # fast path: same base, same tokenizer, token ids
    if spec == "gold":
        return text_score_fn(judge.score, tokenizer, name=judge.name)
    return text_score_fn(text_rewards[spec].score, tokenizer, name=spec)


def checkpoint_steps(total: int, points: int) -> set[int]:
    """``points`` evenly spaced steps inside 1..total, plus the last one: a path evaluated on the same prompts
    from start to end (the full evaluation after training is on all held-out prompts)."""
    if points <= 0:
        return set()
    return {s for s in (round(total * i / (points + 1)) for i in range(1, points + 1)) if 0 < s < total} | {total}


_BASES: dict[tuple, tuple] = {}  # the pristine base a process that runs many cells keeps (see keep_bases)
_KEEP = False  # inside keep_bases()


@contextmanager
def keep_bases():
    """Within this block, :func:`base_model` keeps one pristine copy of the base in memory and hands each run a
    copy of it: a sweep worker loads the base once for all its cells (about 20 s each for SmolLM2 from GGUF) at
    the price of a second copy of the weights. Outside it a run loads its own base and no copy is kept, so a
    single ``prefopt bench`` holds the weights once."""
    global _KEEP
    before, _KEEP = _KEEP, True
    try:
        yield
    finally:
        _KEEP = before
        if not before:
            _BASES.clear()


def base_model(spec: str, device: torch.device):
    """The base (model, tokenizer) for one run: freshly loaded, or a copy of the one kept by :func:`keep_bases`."""
    key = (spec, str(device))
    if not _KEEP:
        return load_base(spec, device=device)
    if key not in _BASES:
        _BASES.clear()  # keep one pristine base in memory, not one per model ever used
        _BASES[key] = load_base(spec, device=device)
    lm, tok = _BASES[key]
    return copy.deepcopy(lm), tok


def prompts_digest(prompts: list[PromptRecord]) -> str:
    return hashlib.sha256("\n".join(prompt_key(p.prompt) for p in prompts).encode()).hexdigest()[:16]


def eval_settings(cfg: BenchConfig, eval_prompts: list[PromptRecord], sft: str | None = None) -> dict:
    """What two evaluations must share to be pooled (the report refuses otherwise); ``sft``: the digest of the SFT
    adapter merged into the base (the reference differs without the same one)."""
    out = {"model": cfg.model, "judge": cfg.judge, "eval": cfg.eval.settings(),
           "eval_prompts": prompts_digest(eval_prompts), "n_eval": len(eval_prompts)}
    if sft is not None:
        out["sft"] = sft
    return out


SFT_DIR = "sft"  # the SFT stage's adapter in a run folder (merged into the base of every later stage)


def sft_digest(folder: Path) -> str:
    return file_digest(Path(folder) / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------ the run
def run(
    cfg: BenchConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    evaluate_policies: bool = True,
    cache_dir: str | os.PathLike | None = None,
    console=None,
    overwrite: bool = False,
    extra_meta: dict | None = None,
) -> RunResult:
    from rich.console import Console

    cfg = copy.deepcopy(cfg)
    dist = dist_state()  # `accelerate launch -m prefopt bench`: every rank runs this; rank 0 alone writes and speaks
    main = dist.is_main_process
    stages = Stages(console if main else Console(quiet=True))
    t_start = time.perf_counter()
    # the same command continues a run that was killed: its output folder names its progress (without --out: the
    # newest unfinished run of this spec under runs/)
    spec = run_spec(cfg, evaluate_policies)
    out = Path(out_dir) if out_dir else (find_unfinished(Path("runs"), spec)
                                         or Path("runs") / datetime.now().strftime("bench-%Y%m%d-%H%M%S"))
    out = Path(_from_rank0(str(out), dist))

    # 0. claim the output folder (is it writable?), then read and validate every input, all before any compute
    folder = RunFolder.create(out, kind="run", overwrite=overwrite) if main else RunFolder.scratch()
    progress = None
    try:
        inputs = load_inputs(cfg)
        if main:
            progress = Progress.open(out, spec, overwrite=overwrite, default_out=out_dir is None)
        progress = progress if dist.num_processes == 1 else _followed(progress, out, dist)
        if progress.resumed:
            stages.console.log(f"continuing the run started {progress.created} (its progress: {progress.folder})",
                               highlight=False, markup=False)
        for report in inputs.data_reports:  # the detected format; with --skip-invalid what was left out, before
            stages.console.log(f"{report['data']}: {report['format']}", highlight=False, markup=False)  # any training
            if report["dropped"]:
                stages.console.log(f"skipped invalid rows: {report['line']}", highlight=False, markup=False)
        cache = StageCache(cache_dir if cache_dir is not None else progress.cache_root)
        result = _run(cfg, inputs, folder, stages, evaluate_policies, cache, progress, cache_dir is None, t_start,
                      extra_meta or {})
    except PrefoptError:  # the command has to change: its progress would never be continued
        folder.abort()
        if progress is not None:
            progress.remove()
        raise
    except KeyboardInterrupt:
        folder.abort()
        if progress is None:
            raise
        progress.release()
        raise Interrupted(progress.folder) from None
    except BaseException:  # killed or a bug: keep the progress for the next start
        folder.abort()
        if progress is not None:
            progress.release()
        raise
    progress.remove()
    return result


def _from_rank0(obj, dist):
    """Rank 0's value of ``obj`` on every rank (itself with one process)."""
    if dist.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def _followed(progress: Progress | None, out: Path, dist) -> Progress:
    """Rank 0's progress on every rank: rank 0 writes it, the others read its checkpoints."""
    resumed = _from_rank0(progress.resumed if progress is not None else None, dist)
    return progress if progress is not None else Progress.follow(out, resumed)


@contextmanager
def _claim(cache: StageCache, stage: str, spec: dict, dist):
    """A stage-cache claim made by rank 0 for every rank: rank 0 holds the lock and stores; the others learn
    whether it was a hit and compute along (a data-parallel stage needs every rank). The kernel of the base's
    products is part of the key: a stage trained with one is not reused by a run with the other."""
    spec = {**spec, "linear_kernel": linear_kernel()}
    if dist.num_processes == 1:
        with cache.claim(stage, spec) as claim:
            yield claim
        return
    if dist.is_main_process:
        with cache.claim(stage, spec) as claim:
            _from_rank0(str(claim.hit) if claim.hit is not None else None, dist)
            yield claim
        return
    hit = _from_rank0(None, dist)
    yield Claim(None, Path(hit) if hit else None, fingerprint(spec))


def _same_on_every_rank(shared: SharedBase, role: str, dist, stage: str) -> None:
    """Data-parallel training must leave every rank with the same weights: compare a checksum of ``role``'s."""
    if dist.num_processes == 1:
        return
    from accelerate.utils import gather

    weights = shared.adapter_state(role)
    local = torch.stack([sum(v.double().sum() for v in weights.values()),
                         sum(v.double().square().sum() for v in weights.values())]).to(shared.device)
    sums = gather(local[None]).cpu()  # (world, 2)
    if not torch.allclose(sums, sums[:1].expand_as(sums), rtol=1e-6, atol=1e-9):
        raise RunError(f"{stage}: the ranks ended with different weights (checksums {sums.tolist()}): the processes "
                       "did not train in step; report this with the accelerate config used")


def _checkpoint(progress: Progress, stages: Stages, key: str, stage: str, path_rows: list | None = None,
                policy: str | None = None, resumed: list | None = None, title: str | None = None):
    """The step checkpoint of training stage ``key`` (metrics rows logged as ``stage``, path rows of ``policy``);
    a stage continued from it gets its rows back. Returns (checkpoint, steps already done)."""
    def extra() -> dict:
        return {"metrics": stages.rows(stage), "path": [r for r in path_rows if r["policy"] == policy] if policy else []}

    ck = progress.checkpoint(key, extra=extra)
    saved = ck.load()
    if saved is None:
        return ck, 0
    stages.metrics.extend(saved.extra["metrics"])
    if policy is not None:
        path_rows.extend(saved.extra["path"])
    stages.console.log(f"{title or stage}: continuing after step {saved.step}", highlight=False)
    if resumed is not None:
        resumed.append(f"{stage}@{saved.step}")
    return ck, saved.step


def _run(cfg: BenchConfig, inputs: Inputs, folder: RunFolder, stages: Stages, evaluate_policies: bool,
         cache: StageCache, progress: Progress, own_cache: bool, t_start: float, extra_meta: dict) -> RunResult:
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    # before the base is loaded (process-wide, set by every run: a sweep process's cells may differ)
    if cfg.bounded_heap:
        bound_heap()
    else:
        keep_heap()
    trim_heap(cfg.trim_heap)  # process-wide switch, set by every run
    allocator = active_allocator()
    if allocator == "jemalloc" and (cfg.bounded_heap or cfg.trim_heap):
        stages.console.log("bounded_heap/trim_heap act on glibc's malloc, and this process runs jemalloc: they do "
                           "nothing here (PREFOPT_MALLOC=system runs glibc's)", highlight=False)
    dist = dist_state()
    hits: list[str] = []
    resumed: list[str] = []  # what this start took from the progress of an earlier one

    def reused(stage: str, name: str, seconds: float, what: str = "") -> None:
        """A stage whose artifact was found: from the user's --cache, or done before a restart."""
        (resumed if own_cache else hits).append(stage)
        stages.metrics.extend(progress.rows(stage) if own_cache else [])
        stages.note(name, seconds, f"{what}{'finished before the restart' if own_cache else 'from the cache'}")

    # 1. one base, one LoRA config, a role per learner
    device = pick_device(cfg.device)
    with stages.stage("load base"):
        lm, tok = base_model(cfg.model, device)
    shared = SharedBase(lm, tok, cfg.lora, cfg.checkpoint_activations)

    # 1b. the SFT stage (optional): an adapter on the demonstrations, merged into the base, which becomes the
    #     reference of every later stage
    sft_key = sft_id = None
    if inputs.demos:
        sft_cfg = copy.deepcopy(cfg.sft)
        sft_cfg.seed = cfg.seed if sft_cfg.seed is None else sft_cfg.seed
        with _claim(cache, "sft", sft_spec(cfg, inputs.demos), dist) as claim:
            sft_key = claim.key
            if claim.hit is not None:
                t0 = time.perf_counter()
                shared.load_role(SFT_DIR, claim.hit)
                reused("sft", "sft", time.perf_counter() - t0)
            else:
                data = TrainData(demos=inputs.demos)
                ck, at = _checkpoint(progress, stages, "sft", "sft", resumed=resumed)
                with stages.stage("sft", total=sft_backend.total_steps(sft_cfg, data), unit_metrics=("train/loss",),
                                  done=at) as adv:
                    sft_backend.train(shared, sft_cfg, data, role=SFT_DIR, on_step=stages.logger("sft", adv),
                                      checkpoint=ck)
                _same_on_every_rank(shared, SFT_DIR, dist, "sft")
                claim.store(lambda d: shared.save_role(SFT_DIR, d))
                progress.finish_stage("sft", stages.rows("sft"))
        shared.save_role(SFT_DIR, folder.path / SFT_DIR)
        sft_id = sft_digest(folder.path / SFT_DIR)
        shared = shared.merge_role(SFT_DIR)

    # 2. preference pairs (synthetic unless given; cached by what they depend on)
    if inputs.given_pairs is not None:
        train_pairs = inputs.given_pairs
        pairs_key = hashlib.sha256(json.dumps([p.__dict__ for p in train_pairs], sort_keys=True, default=str).encode()).hexdigest()[:16]
    else:
        with _claim(cache, "pairs", pairs_spec(cfg, sft_key), dist) as claim:
            pairs_key = claim.key
            if claim.hit is not None:
                t0 = time.perf_counter()
                train_pairs = load_pairs(claim.hit / FILES["pairs"])
                reused("pairs", "synthetic pairs", time.perf_counter() - t0, f"{len(train_pairs)} pairs ")
            else:
                with stages.stage("synthetic pairs", total=len(inputs.train) * cfg.data.k) as adv:
                    train_pairs = synthesize_pairs(shared, inputs.judge, inputs.train, cfg, adv, sft_key)
                claim.store(lambda d: write_pairs(d / FILES["pairs"], train_pairs))
    if not train_pairs:
        raise PrefoptError("no preference pairs to train on (every prompt's samples were identical?): raise data.k "
                           "or data.temperature")
    write_pairs(folder.path / FILES["pairs"], train_pairs)
    write_prompts(folder.path / FILES["eval_prompts"], inputs.eval)

    # 3. the reward model: trained once when a policy needs it (or rm.when='always'), cached
    rm = None
    if cfg.rm.when == "always" or any(p.config.needs_reward_model() for p in inputs.policies.values()):
        rm_cfg = copy.deepcopy(cfg.rm)
        rm_cfg.seed = cfg.seed if rm_cfg.seed is None else rm_cfg.seed
        with _claim(cache, "rm", rm_spec(cfg, pairs_key, sft_key), dist) as claim:
            if claim.hit is not None:
                t0 = time.perf_counter()
                rm = rm_backend.RewardModel.load(shared, claim.hit)
                reused("rm", "reward model", time.perf_counter() - t0)
            else:
                steps = rm_backend.total_steps(rm_cfg, train_pairs)
                ck, at = _checkpoint(progress, stages, "rm", "rm", resumed=resumed, title="reward model")
                with stages.stage("reward model", total=steps, unit_metrics=("train/loss", "train/reward_accuracy"),
                                  done=at) as adv:
                    rm = rm_backend.train(shared, train_pairs, rm_cfg, on_step=stages.logger("rm", adv), checkpoint=ck)
                _same_on_every_rank(shared, rm.role, dist, "reward model")
                claim.store(lambda d: rm.save(d))
                progress.finish_stage("rm", stages.rows("rm"))
        rm.save(folder.path / "rm")
    annotators = _annotators(train_pairs, rm, stages)

    # 4. every policy on the same base, data and reward sources; evaluations along the way draw its path
    path_rows: list[dict] = []
    path_prompts = inputs.eval[: cfg.eval.path_prompts]
    proxy = rm.score_ids if rm is not None else None
    ref_path = None
    if cfg.eval.path_points and evaluate_policies:
        ref_path = _path_point(shared, None, path_prompts, inputs.judge, cfg, proxy, None, path_rows, REFERENCE, 0, 0.0)
    policy_info = {}
    samplers: dict[str, BestOfN] = {}
    ref_id = reference_id(cfg, shared.device, sft_key)
    for name, pol in inputs.policies.items():
        spec = getattr(pol.config, "reward", None)
        data = TrainData(pairs=train_pairs, prompts=inputs.train, reward_model=rm, reference_id=ref_id,
                         score_fn=reward_fn(spec, rm, inputs.judge, tok, inputs.text_rewards) if spec else None)
        policy_info[name] = {"backend": pol.backend, "config": C.to_dict(pol.config)}
        if not getattr(pol.module, "TRAINS", True):  # best-of-n: nothing to train or save but its config
            samplers[name] = BestOfN(pol.config.n, data.score_fn)
            folder.write_json(f"policies/{name}/{POLICY_INFO}", {"policy": name, **policy_info[name], "model": cfg.model})
            continue
        total = pol.module.total_steps(pol.config, data)
        marks = checkpoint_steps(total, cfg.eval.path_points) if ref_path is not None else set()

        def at_checkpoint(step: int, metrics: dict, name=name, role=pol.role, total=total, marks=marks) -> None:
            if step in marks:
                with torch.random.fork_rng(devices=[]):  # evaluation never moves the training's random stream
                    _path_point(shared, role, path_prompts, inputs.judge, cfg, proxy, ref_path, path_rows, name,
                                step, step / total)

        key = f"policies/{name}"
        done = progress.done(key)
        if done is not None:  # trained before a restart: its adapter, metrics rows and path points
            t0 = time.perf_counter()
            shared.load_role(pol.role, done.folder)
            stages.metrics.extend(done.metrics)
            path_rows.extend(done.path)
            stages.note(name, time.perf_counter() - t0, "finished before the restart")
            resumed.append(name)
        else:
            ck, at = _checkpoint(progress, stages, key, name, path_rows, name, resumed)
            unit = ("train/score", "train/kl") if spec else ("train/loss", "train/reward_accuracy")
            with stages.stage(name, total=total, unit_metrics=unit, done=at) as adv:
                pol.module.train(shared, pol.config, data, role=pol.role, on_step=stages.logger(name, adv, at_checkpoint),
                                 checkpoint=ck)
            _same_on_every_rank(shared, pol.role, dist, name)
            progress.finish_stage(key, stages.rows(name), [r for r in path_rows if r["policy"] == name],
                                  write=lambda d, role=pol.role: shared.save_role(role, d))
        shared.save_role(pol.role, folder.path / "policies" / name)
        folder.write_json(f"policies/{name}/{POLICY_INFO}", {"policy": name, **policy_info[name], "model": cfg.model,
                                                             "lora": asdict(cfg.lora)})

    # 5. evaluation on held-out prompts, identical decoding for every policy
    summary: list[dict] = []
    samples: list[dict] = []
    n_pairs_eval = 0
    if evaluate_policies:
        policies = {REFERENCE: None, **{name: samplers.get(name, pol.role) for name, pol in inputs.policies.items()}}
        say = lambda text: stages.console.log(text, highlight=False, markup=False)  # noqa: E731
        store = progress.eval_store(on_restore=lambda name: say(f"eval: {name} evaluated before the restart"),
                                    on_put=lambda name: say(f"eval: {name} evaluated"))
        with stages.stage("eval", total=len(inputs.eval) * len(policies)) as adv:
            result = evaluate(shared, policies, inputs.eval, inputs.judge, cfg.eval,
                              proxies={n: proxy for n in policies} if proxy else None,
                              on_progress=lambda name, k: adv(k), dist=dist, store=store)
        summary, samples, n_pairs_eval = result.summary, result.samples, result.n_held_out_pairs

    # 6. report (atomic: the folder appears only now, complete)
    timings = dict(stages.timings, total=round(time.perf_counter() - t_start, 1))
    meta = {
        "versions": versions(), "seed": cfg.seed, "device": str(shared.device), "threads": torch.get_num_threads(),
        "processes": dist.num_processes, "allocator": allocator,
        "linear_kernel": linear_kernel() if shared.device.type == "cpu" else None,  # the base's CPU products
        "timings_s": timings, "peak_rss_mib_after": stages.peak_rss, "cache_hits": hits, "resumed": resumed, "n_train_prompts": len(inputs.train),
        "n_eval_prompts": len(inputs.eval), "n_pairs": len(train_pairs), "n_pairs_held_out": inputs.held_out,
        "n_held_out_eval_pairs": n_pairs_eval, "rm_score_offset": rm.offset if rm is not None else None,
        "rm_score_scale": rm.scale if rm is not None else None,
        "data_reports": inputs.data_reports, "annotators": annotators, "sft": {"demos": len(inputs.demos), "adapter": sft_id} if sft_id else None,
        "created": datetime.now().isoformat(timespec="seconds"), **extra_meta,
    }
    if inputs.data_reports:  # what was read from each data file and what was dropped: a run trains on nothing unreported
        folder.write_json(FILES["data_report"], inputs.data_reports)
    extra = {"eval_settings": eval_settings(cfg, inputs.eval, sft_id), "metric_versions": metric_versions(),
             "policy_info": policy_info, "backends": list(BACKENDS)}
    if not dist.is_main_process:  # rank 0 writes the run folder
        folder.abort()
        return RunResult(None, summary, timings, hits)
    fill_run(folder, config=C.to_dict(cfg), metrics=stages.metrics, summary=summary, samples=samples, meta=meta,
             policies=[REFERENCE, *inputs.policies] if summary else list(inputs.policies), extra=extra,
             path=path_rows)
    path = folder.finish(evaluated=bool(summary))
    return RunResult(path, summary, timings, hits)


def _annotators(pairs: list, rm, stages: Stages) -> list[dict]:
    """A pool's pairs stratified by annotator (who labelled what; agreement with gold and, with a reward model,
    whose labels it learned), logged one line each; [] without a pool."""
    if not any("annotator" in p.meta for p in pairs):
        return []
    proxy = rm_backend.score_pairs(rm, pairs) if rm is not None else None
    rows = annotator_summary(pairs, proxy)

    def f(x) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    for a in rows:
        rm_part = f", RM {f(a['proxy_agreement'])}" if proxy is not None else ""
        stages.console.log(f"annotator {a['annotator']}: {a['pairs']} pairs; agree: gold {f(a['gold_agreement'])}"
                           f"{rm_part}", highlight=False)
    return rows


def _path_point(shared, role, prompts, judge, cfg: BenchConfig, proxy, ref, rows: list, name: str, step: int,
                progress: float):
    """Evaluate ``role`` on the path prompts and append its rows (gold, KL, proxy, win rate vs the reference)."""
    d, estimates = evaluate_point(shared, role, prompts, judge, cfg.eval, proxy=proxy, ref=ref, dist=dist_state())
    for metric, est in estimates.items():
        rows.append({"step": step, "progress": round(progress, 4), **est.summary_row(name, metric)})
    return d
