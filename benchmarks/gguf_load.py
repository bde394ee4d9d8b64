"""Converting the GGUF base: transformers' own load (it parses the file three times: config, tokenizer, weights)
against prefopt's (``_gguf_parsed_once``: one parse serves all three), alternated in one process, the converted-base
cache off; checks the two give the same weights and tokenizer. Usage:

    python benchmarks/gguf_load.py --rounds 2 --out results/gguf_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ["PREFOPT_BASE_CACHE"] = "off"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from prefopt.models.base import _gguf_parsed_once, resolve_model

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    src = resolve_model(args.model)
    if not src.gguf_file:
        raise SystemExit(f"{args.model} is not a GGUF base")

    def load():
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
        lm = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
        return lm.state_dict(), tok

    times: dict[str, list[float]] = {"transformers": [], "parsed_once": []}
    last = {}
    for _ in range(args.rounds):
        for mode in times:
            t = time.perf_counter()
            if mode == "parsed_once":
                with _gguf_parsed_once():
                    last[mode] = load()
            else:
                last[mode] = load()
            times[mode].append(round(time.perf_counter() - t, 2))
            print(mode, times[mode][-1], "s", flush=True)
    (a, ta), (b, tb) = last["transformers"], last["parsed_once"]
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and ta.get_vocab() == tb.get_vocab() \
        and ta.chat_template == tb.chat_template
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    doc = {
        "what": "tokenizer + model from the GGUF, converted-base cache off, the two modes alternated in one process",
        "command": f"python benchmarks/gguf_load.py --rounds {args.rounds} --threads {args.threads}",
        "model": args.model, "threads": args.threads, "seconds": times,
        "ratio_parsed_once_vs_transformers": round(mean["parsed_once"] / mean["transformers"], 3),
        "identical_weights_and_tokenizer": same,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(doc, indent=1))
    if not same:
        raise SystemExit("the two loads differ")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
