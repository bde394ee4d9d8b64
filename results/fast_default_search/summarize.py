"""Print one markdown row per trial-NN.json in this folder: overrides (relative to the default preset, threads=1
left out), 1-thread wall, stage times, PPO/DPO gold and win rate with CIs, and the conclusive check."""
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
SHORT = {"load base": "load", "synthetic pairs": "pairs", "reward model": "rm", "ppo": "ppo", "dpo": "dpo", "eval": "eval"}


def ci(v):
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def md_cell(md, policy, metric):
    """The mean of ``metric`` for ``policy`` in a comparison.md table."""
    lines = [l.strip().strip("|").split("|") for l in md.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0]]
    col = next(i for i, c in enumerate(head) if c.startswith(metric))
    row = next(r for r in lines[2:] if r[0].strip() == policy)
    return float(row[col].split()[0])


def verdict(t):
    ref, ppo, dpo = t["reference"], t["ppo"], t["dpo"]
    fails = []
    for name, p in (("PPO", ppo), ("DPO", dpo)):
        if not p["win_rate_vs_ref"][1] > 0.5:
            fails.append(f"1 ({name} win lo {p['win_rate_vs_ref'][1]:.3f})")
        if not (p["gold_reward"][0] > ref["gold_reward"][0] and p["gold_reward"][1] > ref["gold_reward"][0]):
            fails.append(f"2 ({name} gold lo {p['gold_reward'][1]:.3f} vs ref {ref['gold_reward'][0]:.3f})")
    if not dpo["gold_reward"][0] > ppo["gold_reward"][0]:
        fails.append("3 (gold: DPO <= PPO)")
    if not dpo["win_rate_vs_ref"][0] > ppo["win_rate_vs_ref"][0]:
        fails.append("3 (win: DPO <= PPO)")
    return "yes" if not fails else "no: " + "; ".join(fails)


def ratios():
    """Per-stage 2-thread/1-thread time ratios: the 905 s candidate at 2 threads (results/bench_speed_candidate.json)
    against the same workload at 1 thread (trial 01)."""
    two = json.loads((HERE.parent / "bench_speed_candidate.json").read_text())["rows"][0]
    one = json.loads((HERE / "trial-01.json").read_text())["rows"][0]
    return two, one, {k: two["stage_s"][k] / one["stage_s"][k] for k in SHORT if k != "load base"}


def estimate_2t(row):
    """2-thread wall estimate: load base and the wall-minus-stages overhead as measured at 2 threads (32.3 s,
    7.3 s), every other stage its 1-thread time x that stage's ratio."""
    two, _, r = ratios()
    overhead = two["wall_s"] - two["stage_s"]["total"]
    return two["stage_s"]["load base"] + overhead + sum(r[k] * row["stage_s"].get(k, 0.0) for k in r)


def main():
    print("| trial | overrides | wall s (1 thr) | est. wall s (2 thr) | stages s (load/pairs/rm/ppo/dpo/eval) | ref gold | PPO gold | PPO win | PPO KL | DPO gold | DPO win | DPO KL | PPO length / EOS rate (ref) | conclusive |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for f in sorted(HERE.glob("trial-*.json")):
        r = json.loads(f.read_text())["rows"][0]
        sets = " ".join(f"`{s}`" for s in r["sets"] if s != "threads=1")
        st = r["stage_s"]
        stages = "/".join(f"{st.get(k, 0):.0f}" for k in SHORT)
        t, md = r["table"], r["comparison_md"]
        print(f"| {f.stem.split('-')[1]} | {sets} | {r['wall_s']:.0f} | {estimate_2t(r):.0f} | {stages} | {t['reference']['gold_reward'][0]:.3f} | "
              f"{ci(t['ppo']['gold_reward'])} | {ci(t['ppo']['win_rate_vs_ref'])} | {t['ppo']['kl_to_ref'][0]:.1f} | "
              f"{ci(t['dpo']['gold_reward'])} | {ci(t['dpo']['win_rate_vs_ref'])} | {t['dpo']['kl_to_ref'][0]:.1f} | "
              f"{md_cell(md, 'ppo', 'eval/length'):.1f} / {md_cell(md, 'ppo', 'eval/eos_rate'):.2f} "
              f"({md_cell(md, 'reference', 'eval/length'):.1f} / {md_cell(md, 'reference', 'eval/eos_rate'):.2f}) | {verdict(t)} |")


if __name__ == "__main__":
    if sys.argv[1:] == ["--ratios"]:
        print({k: round(v, 3) for k, v in ratios()[2].items()})
    else:
        main()
