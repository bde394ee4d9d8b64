import json, glob, os, sys
rows = {}
for d in sorted(glob.glob("/work/probe/search2/runs/*-s*")):
    if d.endswith(".resume") or not os.path.exists(f"{d}/summary.json"):
        continue
    name, seed = os.path.basename(d).rsplit("-s", 1)
    doc = json.load(open(f"{d}/summary.json"))
    pol = doc["policies"] if "policies" in doc else doc
    rows.setdefault(name, {})[int(seed)] = d
for name, seeds in rows.items():
    cells = []
    for s in sorted(seeds):
        lines = [l for l in open(f"{seeds[s]}/comparison.md") if l.startswith("| ppo ")]
        c = [x.strip() for x in lines[0].split("|")]
        cells.append(f"s{s}: gold {c[2]} win {c[6]} KL {c[5].split()[0]}")
    print(name); [print("   ", x) for x in cells]
