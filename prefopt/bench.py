"""The whole comparison, end to end: data -> one base with LoRA roles -> RM -> PPO, DPO -> eval -> report.

``run_bench(BenchConfig())`` is what ``prefopt bench`` runs. Every stage uses the same base, the same LoRA
config, the same seeded split: the reward model and DPO train on the same pairs, PPO draws its prompts from the
same training prompts, and evaluation prompts are held out from all of them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from prefopt.backends import dpo as dpo_backend
from prefopt.backends import ppo as ppo_backend
from prefopt.backends import rm as rm_backend
from prefopt.data.io import load_pairs, load_prompts
from prefopt.data.judges import load_judge
from prefopt.data.records import PreferencePair, PromptRecord, prompt_key
from prefopt.data.split import holdout_pairs, prompts_from_pairs, split_prompts
from prefopt.data.synthetic import AnnotatorConfig, simulate_preferences
from prefopt.data.tasks import sentiment_prompts
from prefopt.eval.harness import REFERENCE, EvalConfig, evaluate
from prefopt.models.base import load_base, pick_device
from prefopt.models.ops import decode_responses, encode_prompts, ends_with_eos, render_prompt, sample
from prefopt.models.rewards import SequenceClassifierReward, text_score_fn
from prefopt.models.shared import LoraSettings, SharedBase
from prefopt.reports import write_run

EMBEDDED_PROMPTS = "embedded:sentiment"
ALGORITHMS = ("ppo", "dpo")


@dataclass
class DataConfig:
    prompts: str = field(default=EMBEDDED_PROMPTS, metadata={"help": "Prompt source: 'embedded:sentiment', a .jsonl/.csv/.parquet file or a hub dataset."})
    prompt_field: str | None = field(default=None, metadata={"help": "Column holding the prompt (default 'prompt')."})
    prefix_words: tuple[int, int] | None = field(default=None, metadata={"help": "Take the first lo..hi words of a text column as the prompt (IMDb-style)."})
    pairs: str | None = field(default=None, metadata={"help": "Preference pairs file/dataset; if unset, pairs are synthesised."})
    n_eval: int = field(default=128, metadata={"help": "Held-out evaluation prompts."})
    n_train: int | None = field(default=128, metadata={"help": "Training prompts (synthetic pairs and PPO); None = all the rest."})
    k: int = field(default=4, metadata={"help": "Responses sampled per prompt for synthetic pairs (>= 2)."})
    pairs_per_prompt: int = field(default=3, metadata={"help": "Labelled pairs kept per prompt (largest gold-score gaps)."})
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    max_new_tokens: int = field(default=32, metadata={"help": "Length cap of responses sampled for synthetic pairs."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for synthetic pairs."})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompts keep their last N tokens."})
    gen_batch_size: int = field(default=64, metadata={"help": "Generation batch size."})


@dataclass
class BenchConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Base model: alias, hub id, local dir, .gguf, or 'tiny'."})
    judge: str = field(default="vader", metadata={"help": "Gold judge: 'vader', 'hf:<model>', 'py:module:function'."})
    algorithms: tuple[str, ...] = field(default=ALGORITHMS, metadata={"help": "Policies to train and compare."})
    ppo_reward: str = field(default="rm", metadata={"help": "PPO's reward source: 'rm' (trained on the pairs), 'gold' (the gold judge: PPO-GT), 'hf:<classifier>', 'py:module:function'."})
    ppo_value_from_rm: bool = field(default=False, metadata={"help": "Initialise PPO's value head from the reward model's score head."})
    seed: int = field(default=0, metadata={"help": "Master seed (split, sampling, annotator, training)."})
    device: str | None = field(default=None, metadata={"help": "torch device; default cuda if available else cpu."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: all cores)."})
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    rm: rm_backend.RewardConfig = field(default_factory=rm_backend.RewardConfig)
    ppo: ppo_backend.PPOConfig = field(default_factory=ppo_backend.PPOConfig)
    dpo: dpo_backend.DPOConfig = field(default_factory=dpo_backend.DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms must be a non-empty subset of {ALGORITHMS}, got {list(self.algorithms)}")
        if not (self.ppo_reward in ("rm", "gold") or self.ppo_reward.startswith(("hf:", "py:"))):
            raise ValueError(f"ppo_reward must be 'rm', 'gold', 'hf:<model>' or 'py:module:function', got {self.ppo_reward!r}")
        if self.data.k < 2:
            raise ValueError(f"data.k must be >= 2 (pairs need two responses), got {self.data.k}")


def preset(name: str) -> BenchConfig:
    """Named starting configs. 'default': SmolLM2-135M on 2 CPU cores in < 20 min; 'smoke': tiny model, < 1 min."""
    if name == "default":
        return BenchConfig()
    if name == "smoke":
        cfg = BenchConfig(model="tiny")
        cfg.data = DataConfig(n_eval=16, n_train=16, k=2, pairs_per_prompt=1, max_new_tokens=8, gen_batch_size=16)
        cfg.rm = rm_backend.RewardConfig(batch_size=8, max_response_tokens=16)
        cfg.dpo = dpo_backend.DPOConfig(batch_size=8, max_response_tokens=16)
        cfg.ppo = ppo_backend.PPOConfig(steps=2, batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=8)
        cfg.eval = EvalConfig(max_new_tokens=8, batch_size=16)
        cfg.lora = LoraSettings(r=4, alpha=8)
        return cfg
    raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}")


PRESETS = ("default", "smoke")


@dataclass
class BenchResult:
    out_dir: Path
    summary: list[dict]
    timings: dict[str, float]


class _Stages:
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
        self.metrics: list[dict] = []

    @contextmanager
    def stage(self, name: str, total: int | None = None, unit_metrics: tuple[str, ...] = ()):
        task = self.progress.add_task(name, total=total, info="")
        t0 = time.perf_counter()

        done = 0

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
        self.timings[name] = round(time.perf_counter() - t0, 1)
        self.console.log(f"{name}: {self.timings[name]:.1f}s")

    def logger(self, stage: str, advance):
        def on_step(step: int, metrics: dict) -> None:
            self.metrics.append({"stage": stage, "step": step, **metrics})
            advance(1, metrics)

        return on_step


def _versions() -> dict:
    import peft
    import transformers
    import trl

    import prefopt

    git = None
    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "prefopt": prefopt.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "trl": trl.__version__, "python": platform.python_version(), "git": git,
    }


def load_inputs(cfg: BenchConfig) -> tuple[list[PromptRecord], list[PreferencePair] | None]:
    """Read and validate every input before any compute (bad input fails fast, nothing written)."""
    d = cfg.data
    pairs = load_pairs(d.pairs) if d.pairs else None
    if d.prompts == EMBEDDED_PROMPTS:
        prompts = prompts_from_pairs(pairs) if pairs is not None else sentiment_prompts()
    else:
        prompts = load_prompts(d.prompts, field=d.prompt_field, prefix_words=d.prefix_words, seed=cfg.seed)
    return prompts, pairs


def synthesize_pairs(shared: SharedBase, judge, prompts: list[PromptRecord], cfg: BenchConfig, advance) -> list[PreferencePair]:
    """AlpacaFarm-style: k reference samples per prompt, gold-scored, labelled by the simulated annotator."""
    d, tok = cfg.data, shared.tokenizer
    ids = encode_prompts([p.prompt for p in prompts], tok, d.max_prompt_tokens)
    flat = [p for p in ids for _ in range(d.k)]  # prompt i's k samples are rows i*k .. i*k+k-1
    with shared.reference() as lm:
        responses = sample(lm, tok, flat, max_new_tokens=d.max_new_tokens, temperature=d.temperature,
                           seed=cfg.seed, batch_size=d.gen_batch_size, on_batch=advance)
    texts = decode_responses(responses, tok)
    rendered = [render_prompt(p.prompt, tok) for p in prompts for _ in range(d.k)]
    scores = judge.score(rendered, texts)
    ended = ends_with_eos(responses, tok.eos_token_id)
    eos = {}
    grouped_texts, grouped_scores = [], []
    for i in range(len(prompts)):
        rows = range(i * d.k, (i + 1) * d.k)
        grouped_texts.append([texts[j] for j in rows])
        grouped_scores.append([float(scores[j]) for j in rows])
        for j in rows:
            eos[(i, texts[j])] = ended[j]
    pairs = simulate_preferences(
        [p.prompt for p in prompts], grouped_texts, grouped_scores,
        annotator=d.annotator, pairs_per_prompt=d.pairs_per_prompt, seed=cfg.seed,
    )
    # remember which responses were cut at the length cap, so training does not append an EOS they never had
    index = {prompt_key(p.prompt): i for i, p in enumerate(prompts)}
    for pair in pairs:
        i = index[prompt_key(pair.prompt)]
        pair.meta["chosen_eos"] = eos[(i, pair.chosen)]
        pair.meta["rejected_eos"] = eos[(i, pair.rejected)]
    return pairs


def ppo_score_fn(cfg: BenchConfig, rm, judge, tokenizer):
    """The reward source PPO optimises, by name (dispatch happens here, once)."""
    if cfg.ppo_reward == "rm":
        return rm.score_ids  # fast path: same base, same tokenizer, token ids
    if cfg.ppo_reward == "gold":
        return text_score_fn(judge.score, tokenizer, name=judge.name)
    if cfg.ppo_reward.startswith("hf:"):
        return text_score_fn(SequenceClassifierReward.load(cfg.ppo_reward[3:]).score, tokenizer, name=cfg.ppo_reward)
    return text_score_fn(load_judge(cfg.ppo_reward).score, tokenizer, name=cfg.ppo_reward)  # py:module:function


def run_bench(cfg: BenchConfig, out_dir: str | os.PathLike | None = None, *, console=None, overwrite: bool = False) -> BenchResult:
    cfg = copy.deepcopy(cfg)
    stages = _Stages(console)
    out = Path(out_dir) if out_dir else Path("runs") / datetime.now().strftime("bench-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty: pass --overwrite or another --out")
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)

    # 0. inputs: read and validate everything first
    prompts, given_pairs = load_inputs(cfg)
    judge = load_judge(cfg.judge)
    split = split_prompts(prompts, n_eval=cfg.data.n_eval, n_train=cfg.data.n_train, seed=cfg.seed)
    held_out = 0
    if given_pairs is not None:
        train_pairs, held_out = holdout_pairs(given_pairs, split.eval)

    # 1. one base, one LoRA config, a role per learner
    device = pick_device(cfg.device)
    with stages.stage("load base"):
        lm, tok = load_base(cfg.model, device=device, seed=cfg.seed)
    shared = SharedBase(lm, tok, cfg.lora)

    # 2. preference pairs (synthetic unless given)
    if given_pairs is None:
        n_gen = len(split.train) * cfg.data.k
        with stages.stage("synthetic pairs", total=n_gen) as adv:
            train_pairs = synthesize_pairs(shared, judge, split.train, cfg, adv)

    # 3. reward model -> PPO (the RM is trained whenever PPO runs: it is also the proxy reward in evaluation)
    rm = None
    if "ppo" in cfg.algorithms:
        steps = cfg.rm.epochs * -(-len(train_pairs) // cfg.rm.batch_size)
        with stages.stage("reward model", total=steps, unit_metrics=("train/loss", "train/reward_accuracy")) as adv:
            rm = rm_backend.train(shared, train_pairs, cfg.rm, on_step=stages.logger("rm", adv))
        ppo_prompts = encode_prompts([p.prompt for p in split.train], tok, cfg.ppo.max_prompt_tokens)
        value_init = None
        if cfg.ppo_value_from_rm:
            value_init = torch.nn.Linear(rm.head.in_features, 1)
            value_init.load_state_dict(rm.head.state_dict())
            with torch.no_grad():
                value_init.bias -= rm.offset  # the value predicts the normalised score
        with stages.stage("ppo", total=cfg.ppo.steps, unit_metrics=("train/score", "train/kl")) as adv:
            ppo_backend.train(shared, ppo_prompts, ppo_score_fn(cfg, rm, judge, tok), cfg.ppo,
                              on_step=stages.logger("ppo", adv), init_value_head=value_init)

    # 4. DPO on the same pairs
    if "dpo" in cfg.algorithms:
        steps = cfg.dpo.epochs * -(-len(train_pairs) // cfg.dpo.batch_size)
        with stages.stage("dpo", total=steps, unit_metrics=("train/loss", "train/reward_accuracy")) as adv:
            dpo_backend.train(shared, train_pairs, cfg.dpo, on_step=stages.logger("dpo", adv))

    # 5. evaluation on held-out prompts, identical decoding for every policy
    policies = {REFERENCE: None, **{a: getattr(cfg, a).role for a in cfg.algorithms}}
    with stages.stage("eval", total=len(split.eval) * len(policies)) as adv:
        summary, samples = evaluate(
            shared, policies, split.eval, judge, cfg.eval,
            proxy=rm.score_ids if rm is not None else None,
            on_progress=lambda name, k: adv(k),
        )

    # 6. report (atomic: nothing is written until everything above succeeded)
    timings = dict(stages.timings, total=round(time.perf_counter() - t_start, 1))
    meta = {
        "versions": _versions(), "seed": cfg.seed, "device": str(device), "threads": torch.get_num_threads(),
        "timings_s": timings, "n_train_prompts": len(split.train), "n_eval_prompts": len(split.eval),
        "n_pairs": len(train_pairs), "n_pairs_held_out": held_out,
        "rm_score_offset": rm.offset if rm is not None else None,
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    path = write_run(out, config=dataclasses.asdict(cfg), metrics=stages.metrics, summary=summary,
                     samples=samples, meta=meta, policies=list(policies), overwrite=overwrite,
                     pairs=[dataclasses.asdict(p) for p in train_pairs])
    return BenchResult(path, summary, timings)
