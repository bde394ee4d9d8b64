"""The run config: one dataclass tree, reachable from presets, config files and ``--set`` overrides.

A run names its **policies** as data: ``{"dpo-b0.05": {"backend": "dpo", "beta": 0.05}, "ppo-gt": {"backend":
"ppo", "reward": "gold"}}``. A policy's settings are its backend's section (``ppo:``, ``dpo:``: the defaults every
policy of that backend starts from) overlaid with the policy's own fields; its adapter role is its name, so several
variants of one backend share one base and one table.

Overrides address any field by its dotted path: ``--set dpo.beta=0.05`` (the DPO section: every DPO policy without
its own beta), ``--set policies.ipo.beta=0.2`` (one policy; ``--set ipo.beta=0.2`` is the same when ``ipo`` is a
policy), ``--set policies=dpo,ppo`` (keep those policies; a backend name adds a policy of that backend).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from prefopt import config as C
from prefopt.backends import BACKENDS
from prefopt.backends import rm as rm_backend
from prefopt.data.synthetic import AnnotatorConfig
from prefopt.errors import ConfigError
from prefopt.eval.harness import REFERENCE, EvalConfig
from prefopt.models.shared import LoraSettings

EMBEDDED_PROMPTS = "embedded:sentiment"
RESERVED_NAMES = {REFERENCE, rm_backend.ROLE}
_POLICY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{1,63}$")


@dataclass
class DataConfig:
    prompts: str = field(default=EMBEDDED_PROMPTS, metadata={"help": "Prompt source: 'embedded:sentiment', a .jsonl/.csv/.parquet file or a hub dataset."})
    prompt_field: str | None = field(default=None, metadata={"help": "Column holding the prompt (default 'prompt')."})
    prefix_words: tuple[int, int] | None = field(default=None, metadata={"help": "Take the first LO..HI words of a text column as the prompt (IMDb-style), e.g. 2-8."})
    pairs: str | None = field(default=None, metadata={"help": "Preference pairs file/dataset; if unset, pairs are synthesised from the reference policy."})
    demos: str | None = field(default=None, metadata={"help": "Demonstrations for an SFT stage before everything else (messages, prompt+completion, "
                                                      "or pairs' chosen): the SFT adapter (section 'sft') is merged into the base, "
                                                      "which becomes the reference of every later stage."})
    encoding_errors: str = field(default="strict", metadata={"help": "Invalid UTF-8 in data files: 'strict' stops with the line; 'replace' reads "
                                                             "bad bytes as U+FFFD and reports how many on which lines."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop rows of data files that cannot be used (each kind counted, "
                                                        "the first locations named, in the console and the run folder's "
                                                        "data_report.json) instead of stopping at the first one."})
    n_eval: int = field(default=128, metadata={"help": "Held-out evaluation prompts."})
    n_train: int | None = field(default=128, metadata={"help": "Training prompts (synthetic pairs and online methods); None = all the rest."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/eval prompt split; fixed across master seeds so every run of a "
                                                 "comparison is evaluated on the same held-out prompts."})
    k: int = field(default=4, metadata={"help": "Responses sampled per prompt for synthetic pairs (>= 2)."})
    pairs_per_prompt: int = field(default=3, metadata={"help": "Labelled pairs kept per prompt (largest gold-score gaps)."})
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    annotators: list[AnnotatorConfig] = field(default_factory=list, metadata={
        "help": "A pool of simulated annotators (AlpacaFarm-style), e.g. [{temperature: 0.1}, {flip_rate: 0.25}, "
                "{position_bias: 0.5}]: each pair is labelled by one drawn at random (meta 'annotator'); "
                "empty: data.annotator labels every pair."})
    max_new_tokens: int = field(default=32, metadata={"help": "Length cap of responses sampled for synthetic pairs."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for synthetic pairs."})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompts keep their last N tokens."})
    gen_batch_size: int = field(default=64, metadata={"help": "Generation batch size."})

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"data.k must be >= 2 (pairs need two responses), got {self.k}")
        for name in ("n_eval", "pairs_per_prompt", "max_new_tokens", "max_prompt_tokens", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_train is not None and self.n_train < 1:
            raise ValueError(f"data.n_train must be >= 1 or None, got {self.n_train}")
        if not self.temperature > 0:
            raise ValueError(f"data.temperature must be > 0, got {self.temperature}")
        if self.encoding_errors not in ("strict", "replace"):
            raise ValueError(f"data.encoding_errors must be 'strict' or 'replace', got {self.encoding_errors!r}")
        if self.prefix_words is not None and not 1 <= self.prefix_words[0] <= self.prefix_words[1]:
            raise ValueError(f"data.prefix_words must be LO-HI with 1 <= LO <= HI, got {self.prefix_words}")


def _with_backend_sections(cls):
    """One section per backend (``ppo``, ``dpo``, ...): the defaults every policy of that backend starts from."""
    for name, backend in BACKENDS.items():
        cls.__annotations__[name] = backend.Config
        setattr(cls, name, field(default_factory=backend.Config, metadata={
            "help": f"Defaults for every policy with backend '{name}'."}))
    return cls


@dataclass
@_with_backend_sections
class BenchConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Base model: alias, hub id, local dir, .gguf, or 'tiny'."})
    judge: str = field(default="vader", metadata={"help": "Gold judge: 'vader', 'chars[:set]', 'hf:<model>', 'py:module:function'."})
    seed: int = field(default=0, metadata={"help": "Master seed: synthetic pairs, annotator, adapter init and every training stage."})
    device: str | None = field(default=None, metadata={"help": "torch device; default cuda if available else cpu."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: all cores; use 1 per process when running several)."})
    bounded_heap: bool = field(default=False, metadata={"help": "Fix glibc's mmap threshold at 64 KiB so freed tensors go back "
                               "to the OS: peak RSS of RM/DPO steps -35%, steps ~1.4x slower (measured; prefopt/_alloc.py). "
                               "Off (the default): freed blocks stay in the heap for reuse (keep_heap)."})
    trim_heap: bool = field(default=False, metadata={"help": "Return the heap's free pages to the OS (glibc malloc_trim) after "
                            "every micro-batch's backward, sampling batch and PPO scoring pass: PPO stage peak RSS "
                            "2100 -> 1930 MiB, training passes ~9% slower (measured; prefopt/_alloc.py)."})
    checkpoint_activations: bool = field(default=False, metadata={"help": "Recompute each decoder layer's activations in the "
                                         "backward pass instead of keeping them: training steps hold ~1 layer's activations "
                                         "instead of all (peak memory), for one more forward of compute; same gradients."})
    policies: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"ppo": {"backend": "ppo"}, "dpo": {"backend": "dpo"}},
        metadata={"help": "The policies to train and compare: name -> {backend: <name>, <field>: <value>, ...}; "
                          "fields not given come from the backend's section."},
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    rm: rm_backend.RewardConfig = field(default_factory=rm_backend.RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if not self.policies:
            raise ValueError("policies must name at least one policy, e.g. {'dpo': {'backend': 'dpo'}}")
        self.resolved_policies()  # validates every policy's fields against its backend's config
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def resolved_policies(self) -> dict[str, "Policy"]:
        """Every policy's full config: backend section, then the policy's own fields; seed None -> master seed."""
        out = {}
        for name, spec in self.policies.items():
            where = f"policies.{name}"
            if not _POLICY_NAME.match(name) or name in RESERVED_NAMES or name in "lora_":
                raise ConfigError(f"config: policy name {name!r} must start with a letter, use only letters, digits, "
                                  f"'.', '-' and '_', have 2+ characters outside 'lora_' (peft's prefix), and not be one "
                                  f"of {sorted(RESERVED_NAMES)}")
            if not isinstance(spec, dict) or "backend" not in spec:
                raise ConfigError(f"config: {where} needs a 'backend' ({', '.join(BACKENDS)})")
            backend = spec["backend"]
            if backend not in BACKENDS:
                raise ConfigError(f"config: {where}.backend {backend!r} is not one of {', '.join(BACKENDS)}")
            fields = {k: v for k, v in spec.items() if k != "backend"}
            merged = C.merge(C.to_dict(getattr(self, backend)), fields)
            cfg = C.build(BACKENDS[backend].Config, merged, where="config", prefix=where + ".")
            if cfg.seed is None:
                cfg.seed = self.seed
            out[name] = Policy(name, backend, cfg)
        roles = [p.role for p in out.values()]
        if len(set(roles)) != len(roles):
            raise ConfigError(f"config: policy names {sorted(out)} differ only in '.' vs '_': rename one")
        return out


@dataclass
class Policy:
    """A resolved policy: its name (its adapter role, with '.' as '_'), backend name and full backend config."""

    name: str
    backend: str
    config: Any

    @property
    def module(self):
        return BACKENDS[self.backend]

    @property
    def role(self) -> str:
        """The adapter name on the shared base (peft forbids '.' in adapter names)."""
        return self.name.replace(".", "_")


# --------------------------------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct, the embedded sentiment task, PPO (with a reward model) vs DPO, cut to the least work
    # that stays conclusive (results/fast_default_search: both beat the reference with win-rate CIs above 0.5,
    # DPO above PPO): 128 training prompts, 16-token responses, one RM epoch, 96 held-out prompts, no evaluations
    # during training. PPO: its 192 rollouts as 12 iterations of 16 (2 epochs, one minibatch each) at kl_coef
    # 0.02, not 6 of 32 at 0.05: conclusive at 3 of 4 seeds against 1 of 4 (results/ppo_default_search). The
    # reward model's and DPO's micro-batches of 256 tokens (not 1024 / 512): on these pairs (8 a step, ~12 + 16
    # tokens) their steps peak at 1581 / 1780 MiB against 2003 / 2193 at the same seconds a step
    # (results/step_memory_default.json); DPO's of 128 since freed blocks stay in the heap (keep_heap): a step peaks
    # at 1405 against 1811 MiB (results/step_memory_keep.json), and the bench's DPO stage took 58.8 s against 57.4
    # at 256 (results/bench_speed_heap.json). PPO's stay at 256: at 128 its stage took 166 s against 140 s. The reward
    # model reads the mean of the response's states other than EOS ('content'), not the last token's: on these
    # pairs it orders held-out reference samples as the gold judge does 0.722 of the time against 0.622, better
    # at each of 4 seeds (results/rm_pooling_study). The plain mean ('mean', 0.730) read the EOS state too, and
    # an empty response's score was that state alone, unseen in training: at seed 3 it ranked the empty
    # response above 96% of reference samples (gold: 17%) and PPO learnt to end at once. With 'content' the
    # default bench at 2 threads is conclusive for PPO at 3 of 4 seeds (0-3: yes, yes, no, yes), with 'mean'
    # at 2 of 4, with 'last' at 0 of 2 (results/rm_pooling_study/README.md); at 1 thread 'content' passed 3 of 4
    # and 'mean' 4 of 4 (results/ppo_pooling_search): 6 of 8 runs each, the failing seed moving with the threads
    "default": {
        # 128 training prompts (~250 pairs), not 64 (~125): with the base's products on oneDNN the bench had room,
        # and the reward model fitted on twice the pairs made PPO conclusive at 4 of 4 seeds (win rates 0.625,
        # 0.708, 0.828, 0.797) where 64 passed 3 (seed 2: 0.495), in 204-248 s (results/bench_speed_n128_seeds.json)
        "data": {"n_train": 128, "n_eval": 96, "pairs_per_prompt": 2, "max_new_tokens": 16},
        "rm": {"epochs": 1, "batch_size": 8, "learning_rate": 2e-3, "normalize_on": 64, "micro_batch_tokens": 256,
               "pooling": "content"},
        "dpo": {"batch_size": 8, "learning_rate": 1e-3, "micro_batch_tokens": 128},
        "ppo": {"steps": 12, "batch_size": 16, "ppo_epochs": 2, "mini_batch_size": 16, "learning_rate": 1e-3,
                "kl_coef": 0.02, "max_new_tokens": 16},
        "rloo": {"max_new_tokens": 16},  # not a default policy; added with --set policies=...,rloo, the same length
        "eval": {"max_new_tokens": 16, "path_points": 0, "held_out_pairs": False},
    },
    # the field defaults: the comparison before the 5-minute cut (26 minutes on 2 cores; 128 training and
    # held-out prompts, 32-token responses, a path of evaluations during training); the IMDb miniature and the
    # sweeps of benchmarks/ start from it
    "full": {},
    # the identical pipeline on a 2-layer character model and a judge it can learn in seconds (the fraction of
    # lowercase letters in the response; VADER scores a tiny model's random characters as 0, so it could not fail)
    "smoke": {
        "model": "tiny",
        "judge": "chars:abcdefghijklmnopqrstuvwxyz",
        "lora": {"r": 4, "alpha": 8},
        "data": {"n_eval": 64, "n_train": 128, "k": 8, "pairs_per_prompt": 4, "max_new_tokens": 12,
                 "gen_batch_size": 128, "annotator": {"temperature": 0.02}},
        "rm": {"batch_size": 64, "epochs": 3, "learning_rate": 1e-2, "max_response_tokens": 16},
        "dpo": {"batch_size": 64, "epochs": 3, "learning_rate": 1e-2, "max_response_tokens": 16},
        "ppo": {"steps": 24, "batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 2, "max_new_tokens": 12,
                "learning_rate": 1e-2, "kl_coef": 0.01},
        "rloo": {"max_new_tokens": 12},
        "eval": {"max_new_tokens": 12, "batch_size": 64, "path_prompts": 32},
    },
}


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return C.merge(C.to_dict(BenchConfig()), PRESETS[name])


def preset(name: str) -> BenchConfig:
    """A named starting config (see :data:`PRESETS`)."""
    return C.build(BenchConfig, preset_dict(name), where=f"preset {name}")


def _merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge, except that a mapping of ``policies`` replaces the policies before it (a file lists its own)."""
    out = C.merge(base, {k: v for k, v in over.items() if k != "policies"})
    if "policies" in over:
        out["policies"] = over["policies"]
    return out


def normalise_path(path: list[str], data: dict[str, Any]) -> list[str]:
    """``ipo.beta`` -> ``policies.ipo.beta`` when ``ipo`` is a policy and not a top-level field or section."""
    top = {f for f in BenchConfig.__dataclass_fields__}
    if path[0] in top:
        return path
    if path[0] in data.get("policies", {}):
        return ["policies", *path]
    known = sorted(top | set(data.get("policies", {})))
    raise C.unknown_field("--set", "", path[0], known)


def _check_assignment(path: list[str], raw: str, data: dict[str, Any]) -> Any:
    """Type-check one ``--set`` before merging, so the error names the override; returns the typed value."""
    where = f"--set {'.'.join(path)}={raw}"
    if path[0] != "policies":
        return C.coerce(raw, C.field_type(BenchConfig, path, where=where), where=where, path=".".join(path))
    if len(path) == 1:
        return _select_policies(raw, data, where)
    name = path[1]
    if len(path) == 2:
        return C.coerce(raw, dict[str, Any], where=where, path=".".join(path))
    field_name = path[2]
    if field_name == "backend":
        if raw not in BACKENDS:
            raise ConfigError(f"{where}: backend must be one of {', '.join(BACKENDS)}")
        return raw
    backend = data.get("policies", {}).get(name, {}).get("backend")
    if backend is None:
        raise ConfigError(f"{where}: policy '{name}' has no backend: add --set policies.{name}.backend=<{'|'.join(BACKENDS)}> first")
    tp = C.field_type(BACKENDS[backend].Config, path[2:], where=where)
    return C.coerce(raw, tp, where=where, path=".".join(path))


def _select_policies(raw: str, data: dict[str, Any], where: str) -> dict[str, Any]:
    """``--set policies=dpo,ppo-gt``: keep those of the current policies; a backend name adds a policy of it."""
    if raw.strip().startswith("{"):
        return C.coerce(raw, dict[str, dict[str, Any]], where=where, path="policies")
    current = data.get("policies", {})
    out = {}
    for name in (n.strip() for n in raw.split(",") if n.strip()):
        if name in current:
            out[name] = current[name]
        elif name in BACKENDS:
            out[name] = {"backend": name}
        else:
            raise ConfigError(f"{where}: '{name}' is neither a policy of this config ({', '.join(current) or 'none'}) "
                              f"nor a backend ({', '.join(BACKENDS)})")
    if not out:
        raise ConfigError(f"{where}: name at least one policy")
    return out


def config_dict(preset_name: str = "default", file: str | None = None, sets: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Preset -> config file -> ``--set`` overrides, merged as a plain dict and checked layer by layer."""
    data = preset_dict(preset_name)
    if file is not None:
        loaded = C.load_file(file)
        start = loaded.pop("preset", None)
        if start is not None:
            data = preset_dict(str(start))
        data = _merge_config(data, loaded)
        C.build(BenchConfig, data, where=str(file))  # errors name the file
    for text in sets:
        path, raw = C.parse_assignment(text)
        path = normalise_path(path, data)
        value = _check_assignment(path, raw, data)
        C.set_path(data, path, value)
    return data


def load_config(preset_name: str = "default", file: str | None = None, sets: list[str] | tuple[str, ...] = ()) -> BenchConfig:
    """The one validated :class:`BenchConfig` a command runs with (every error is one line, before any compute)."""
    data = config_dict(preset_name, file, sets)
    return C.build(BenchConfig, data, where="--set" if sets else (str(file) if file else f"preset {preset_name}"))
