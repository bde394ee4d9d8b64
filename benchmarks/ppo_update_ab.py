"""Interleaved A/B of the PPO update's forward + backward, in one process: the peer benchmark's work (SmolLM2-135M,
LoRA, 16 rollouts of the sentiment prompts x 32 sampled tokens, fp32, 2 threads), one update epoch (the policy's
log-probs and values of every rollout, a PPO-shaped loss, backward) per timing, the variants taking turns round
after round, so a slow spell of this shared machine slows them all alike. Variants: the LoRA forward (peft's own,
or prefopt's fused addmm), the micro-batch cut (the former greedy cut in minibatch order, or
:func:`~prefopt.backends._common.micro_batches`: length order, fewest runs, balanced), the token budget and,
with ``--heads``, the log-probs' head (autograd's graph of ``gather_logprobs(response_logits(...))``, or
:func:`~prefopt.models.ops.response_token_logprobs`, bit-identical with an in-place backward).
Peak memory is not measured here (one process); ``benchmarks/ppo_peer.py --set micro_batch_tokens=N`` gives it.

    python benchmarks/ppo_update_ab.py --rounds 5 --out results/ppo_update_ab.json
    python benchmarks/ppo_update_ab.py --heads --rounds 8 --out results/ppo_update_ab_head.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ppo_peer  # noqa: E402


def greedy_in_order(idx, lengths, max_tokens):
    """The cut before this change: consecutive items of the (shuffled) minibatch, a new micro-batch when the next
    item would push the padded tokens over the budget."""
    groups, cur, P, R = [], [], 0, 0
    for i in idx:
        p, r = lengths(i)
        p2, r2 = max(P, p), max(R, max(r, 1))
        if cur and (len(cur) + 1) * (p2 + r2) > max_tokens:
            groups.append(cur)
            cur, p2, r2 = [], p, max(r, 1)
        cur.append(i)
        P, R = p2, r2
    return groups + ([cur] if cur else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=ppo_peer.THREADS)
    ap.add_argument("--budgets", default="256,384,512")
    ap.add_argument("--heads", action="store_true",
                    help="compare only the two log-prob heads (fused LoRA, balanced cut, budget 256)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from peft.tuners.lora.layer import Linear as LoraLinear

    from prefopt._alloc import active_allocator
    from prefopt.backends._common import micro_batches
    from prefopt.data.tasks import sentiment_prompts
    from prefopt.models.base import load_base
    from prefopt.models.ops import encode_prompts, gather_logprobs, hidden_states, make_batch, response_hidden, \
        response_logits, response_token_logprobs, sample
    from prefopt.models.shared import LoraSettings, SharedBase, fuse_lora

    torch.set_num_threads(args.threads)
    lm, tok = load_base(ppo_peer.MODEL, device=torch.device("cpu"), seed=0)
    shared = SharedBase(lm, tok, LoraSettings())
    shared.add_role("policy", head=True, seed=0)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the LoRA path carries real values
        for n, p in shared.peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    params = shared.adapter_parameters("policy")
    head = shared.heads["policy"]
    prompts = encode_prompts([p.prompt for p in sentiment_prompts()[: ppo_peer.SAME_WORK["batch_size"]]], tok, 64)
    with shared.role("policy") as m:
        responses = sample(m, tok, prompts, max_new_tokens=ppo_peer.SAME_WORK["max_new_tokens"], seed=0)
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)  # a minibatch as PPO draws it
    size = lambda i: (len(prompts[i]), len(responses[i]))  # noqa: E731
    layers = [mod for mod in shared.lm.modules() if type(mod) is LoraLinear]

    def set_lora(kind: str) -> None:
        for mod in layers:
            if kind == "peft" and "forward" in vars(mod):
                del mod.forward
                mod._prefopt_fused = False
        if kind == "fused":
            fuse_lora(shared.lm)

    def epoch(groups, fused_head: bool) -> float:
        t = time.perf_counter()
        for g in groups:
            b = make_batch([prompts[i] for i in g], [responses[i] for i in g], tok.pad_token_id, "cpu")
            with shared.role("policy") as m:
                hidden = hidden_states(m, b)
                if fused_head:
                    lp = response_token_logprobs(m, hidden, b)
                else:
                    lp = gather_logprobs(response_logits(m, hidden, b), b.response_ids)
                v = head(response_hidden(hidden, b)).squeeze(-1)
                mask = b.response_mask
                loss = -(lp * mask).sum() / mask.sum() + 0.1 * ((v * mask) ** 2).sum() / mask.sum()
            loss.backward()
        for p in params:
            p.grad = None
        return time.perf_counter() - t

    if args.heads:
        variants = {"autograd head": ("fused", "balanced", 256, False), "fused head": ("fused", "balanced", 256, True)}
    else:
        variants = {"peft lora, greedy cut, 256": ("peft", "greedy", 256, False)}
        for b in (int(x) for x in args.budgets.split(",")):
            variants[f"fused lora, balanced cut, {b}"] = ("fused", "balanced", b, False)
        variants["fused lora, greedy cut, 256"] = ("fused", "greedy", 256, False)
        variants["peft lora, balanced cut, 256"] = ("peft", "balanced", 256, False)
    cuts = {}
    for name, (_, cut, b, _) in variants.items():
        cuts[name] = greedy_in_order(order, size, b) if cut == "greedy" else micro_batches(order, size, b)
    times: dict[str, list[float]] = {k: [] for k in variants}
    set_lora("fused")
    epoch(cuts[next(iter(variants))], False)  # warm-up
    for r in range(args.rounds):
        for name, (lora, _, _, fused_head) in (list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]):
            set_lora(lora)
            times[name].append(epoch(cuts[name], fused_head))
        print(f"round {r + 1}: " + ", ".join(f"{t[-1]:.2f}" for t in times.values()), flush=True)
    base = statistics.median(times[next(iter(variants))])
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        g = cuts[name]
        padded = sum(len(x) * (max(size(i)[0] for i in x) + max(max(size(i)[1], 1) for i in x)) for x in g)
        rows[name] = {"s_per_epoch_median": round(med, 3), "s_per_epoch": [round(t, 3) for t in ts],
                      "vs_first": round(med / base, 3), "micro_batches": [len(x) for x in g], "padded_tokens": padded}
        print(f"{name:34s} {med:6.2f} s/epoch  x{med / base:5.3f}  micro-batches {[len(x) for x in g]} "
              f"padded tokens {padded}")
    doc = {"benchmark": "ppo_update_ab", "command": "python benchmarks/ppo_update_ab.py " + " ".join(sys.argv[1:]),
           "threads": args.threads, "rounds": args.rounds, "allocator": active_allocator(),
           "real_tokens": sum(sum(size(i)) for i in order), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
