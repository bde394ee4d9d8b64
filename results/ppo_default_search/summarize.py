"""Print the table of results/ppo_default_search/README.md from the runs/ folders next to this file.

Each runs/<config>-s<seed>/ holds one trial's summary.json, comparison.md and metrics.jsonl (copied from the run
folder; adapters left out). Conclusive (for PPO) = its win-rate-vs-reference CI lower bound > 0.5 and its gold
CI lower bound above the reference's gold mean."""

import json
import re
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["base", "vrm", "kl02", "b16", "b16k02", "b16k02rb4", "b16k02p3", "b16k02vrm", "b16k02lin"]


def main() -> None:
    rows = defaultdict(dict)
    for d in sorted((HERE / "runs").iterdir()):
        name, seed = re.fullmatch(r"(.+)-s(\d+)", d.name).groups()
        g = {(r["policy"], r["metric"]): r for r in json.loads((d / "summary.json").read_text())["summary"]}
        ref = g[("reference", "eval/gold_reward")]["mean"]
        gold, win, kl = (g[("ppo", f"eval/{m}")] for m in ("gold_reward", "win_rate_vs_ref", "kl_to_ref"))
        eos = g[("ppo", "eval/eos_rate")]["mean"]
        ok = win["lo"] > 0.5 and gold["lo"] > ref
        rows[name][int(seed)] = (ok, f"{gold['mean']:.2f} / {win['mean']:.3f} [{win['lo']:.3f}] / {kl['mean']:.1f} / {eos:.2f}"
                                     f" {'**yes**' if ok else 'no'}")
    print("| config | " + " | ".join(f"seed {s}: gold / win [lo] / KL / EOS rate" for s in range(4)) + " | conclusive |")
    print("|---|" + "---|" * 5)
    for name in sorted(rows, key=lambda n: ORDER.index(n) if n in ORDER else 99):
        cells = [rows[name][s][1] if s in rows[name] else "" for s in range(4)]
        n_ok = sum(ok for ok, _ in rows[name].values())
        print(f"| {name} | " + " | ".join(cells) + f" | {n_ok}/{len(rows[name])} |")


if __name__ == "__main__":
    main()
