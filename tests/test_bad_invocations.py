"""Bad input across every command (with tests/data/bad's files: well over 40 cases): each gives exactly one
error line -- the last line, after any progress lines of a run that had started -- exit 1 (130 for Ctrl-C, 2 for
a usage error), no traceback, and nothing written. Hub names fail offline (the tests run with HF_HUB_OFFLINE=1,
as a machine without network would)."""

from pathlib import Path

import pytest
from conftest import MICRO
from typer.testing import CliRunner

from prefopt.cli import app

runner = CliRunner()
SHAPE = str(Path(__file__).parent / "data" / "shapes" / "trl_standard.jsonl")
M = [a for s in MICRO for a in ("--set", s)]

FILES = {
    "bad.yaml": "preset: smoke\nppo: {kl_coef: [unclosed\n",
    "unknown.yaml": "preset: smoke\nnope: 1\n",
    "wrong_type.yaml": "preset: smoke\nppo: {steps: many}\n",
    "bad.toml": "preset = smoke\n",
    "sweep_bad_backend.yaml": "name: s\narms:\n  aa: {backend: nope}\n",
    "sweep_bad_grid.yaml": "name: s\npreset: smoke\narms:\n  aa: {backend: dpo, grid: {nope: [1, 2]}}\n",
    "sweep_no_seeds.yaml": "name: s\npreset: smoke\nseeds: []\narms:\n  aa: {backend: dpo}\n",
    "sweep_no_arms.yaml": "name: s\npreset: smoke\narms: {}\n",
    "judges.py": ("import torch\n"
                  "def nan(prompt_ids, response_ids):\n    return torch.full((len(response_ids),), float('nan'))\n"
                  "def interrupt(prompt_ids, response_ids):\n    raise KeyboardInterrupt\n"),
    "exists.jsonl": "{}\n",
    "a_file": "not a folder\n",
    "mine/notes.txt": "my own files\n",
}

# (arguments with {d} = the fixtures' folder, what the error line says, exit code)
CASES = [
    (["bench", "--preset", "nope"], "unknown preset 'nope'; choose from default, full, smoke", 1),
    (["bench", "--preset", "smoke", "--set", "nope.field=1"], "--set: unknown field 'nope' (known:", 1),
    (["bench", "--preset", "smoke", "--set", "ppo.kl_coef=abc"], "field 'ppo.kl_coef' expects float, got 'abc'", 1),
    (["bench", "--preset", "smoke", "--set", "data.k=1"], "data.k must be >= 2", 1),
    (["bench", "--preset", "smoke", "--set", "lora.r=0"], "lora.r must be positive, got 0", 1),
    (["bench", "--preset", "smoke", "--set", "rm.micro_batch_tokens=0"], "micro_batch_tokens must be a positive number", 1),
    (["bench", "--preset", "smoke", "--set", "ppo.kl_estimator=k2"], "PPOConfig.kl_estimator='k2' is refused", 1),
    (["bench", "--preset", "smoke", "--set", "dpo.loss_type=ipo", "--set", "dpo.label_smoothing=0.1"],
     "label_smoothing applies to loss_type='sigmoid' only", 1),
    (["bench", "--preset", "smoke", "--set", "policies.x.backend=nope"], "backend must be one of ppo, dpo, sft, rloo, bon", 1),
    (["bench", "--preset", "smoke", "--config", "{d}/missing.yaml"], "{d}/missing.yaml: config file not found", 1),
    (["bench", "--preset", "smoke", "--config", "{d}/bad.yaml"], "{d}/bad.yaml:3: invalid YAML", 1),
    (["bench", "--preset", "smoke", "--config", "{d}/unknown.yaml"], "{d}/unknown.yaml: unknown field 'nope'", 1),
    (["bench", "--preset", "smoke", "--config", "{d}/wrong_type.yaml"], "field 'ppo.steps' expects int, got 'many'", 1),
    (["bench", "--preset", "smoke", "--config", "{d}/bad.toml"], "{d}/bad.toml: invalid TOML", 1),
    (["bench", "--preset", "smoke", "--set", "model=/nowhere/x.gguf"], "GGUF file not found", 1),
    (["bench", "--preset", "smoke", "--set", "model=nobody/missing-model"], "could not load model 'nobody/missing-model'", 1),
    (["bench", "--preset", "smoke", "--set", "judge=nope"], "unknown judge", 1),
    (["bench", "--preset", "smoke", "--set", "ppo.reward=hf:nobody/missing-model"],
     "could not load reward model 'nobody/missing-model'", 1),
    (["bench", "--preset", "smoke", "--set", "ppo.reward=py:nomodule:fn"], "No module named 'nomodule'", 1),
    (["bench", "--preset", "smoke", "--set", "data.prompts=nobody/missing-dataset"],
     "could not load dataset 'nobody/missing-dataset' from the hub", 1),
    (["bench", "--preset", "smoke", "--set", "data.pairs=/nowhere/p.jsonl"], "/nowhere/p.jsonl: file not found", 1),
    (["bench", "--preset", "smoke", "--out", "{d}/a_file"], "{d}/a_file: exists and is not a folder", 1),
    (["bench", "--preset", "smoke", "--out", "{d}/mine", "--overwrite"], "{d}/mine: exists and is not a prefopt run folder", 1),
    (["bench", "--preset", "smoke", *M, "--set", "ppo.reward=py:judges:nan"], "returned a non-finite or non-numeric score", 1),
    (["bench", "--preset", "smoke", *M, "--set", "ppo.reward=py:judges:interrupt"],
     "interrupted: the same command continues from {t}/out.resume", 130),
    (["train", "--preset", "smoke", "--set", "policies=nope"], "'nope' is neither a policy of this config", 1),
    (["train", "--preset", "smoke", "--set", "policies.rm.backend=dpo"], "policy name 'rm'", 1),
    (["eval", "{d}/nowhere"], "{d}/nowhere: not a prefopt run folder", 1),
    (["eval", "{d}/mine"], "{d}/mine: not a prefopt run folder", 1),
    (["sweep", "{d}/missing.yaml", "--out", "{d}/s"], "{d}/missing.yaml: config file not found", 1),
    (["sweep", "{d}/sweep_bad_backend.yaml", "--out", "{d}/s"], "policies.aa.backend 'nope' is not one of", 1),
    (["sweep", "{d}/sweep_bad_grid.yaml", "--out", "{d}/s"], "unknown field 'policies.aa.nope'", 1),
    (["sweep", "{d}/sweep_no_seeds.yaml", "--out", "{d}/s"], "'seeds' must be a non-empty list of integers", 1),
    (["sweep", "{d}/sweep_no_arms.yaml", "--out", "{d}/s"], "'arms' must map arm names to policies", 1),
    (["report", "{d}/nowhere"], "{d}/nowhere: no such folder", 1),
    (["report", "{d}/mine"], "no complete prefopt runs under {d}/mine", 1),
    (["report", "{d}/mine", "--kl", "abc"], "expected numbers like 2,5,10, got 'abc'", 2),
    (["config", "--set", "ppo.nope=1"], "unknown field 'ppo.nope' in section 'ppo'", 1),
    (["config", "--preset", "nope"], "unknown preset 'nope'", 1),
    (["data", "inspect", SHAPE, "--as", "nope"], "--as must be one of pairs, prompts, got 'nope'", 1),
    (["data", "inspect", SHAPE, "--model", "nope"], "could not load model 'nope'", 1),
    (["data", "inspect", "nobody/missing-dataset"], "could not load dataset 'nobody/missing-dataset'", 1),
    (["data", "convert", SHAPE, "{d}/o.csv"], "{d}/o.csv: name a .jsonl or .parquet file", 1),
    (["data", "convert", SHAPE, "{d}/exists.jsonl"], "{d}/exists.jsonl: exists: pass --overwrite", 1),
    (["data", "convert", SHAPE, "{d}/no/such/dir/o.jsonl"], "cannot write (No such file or directory)", 1),
    (["data", "synth", "{d}/o.jsonl", "--preset", "smoke", "--set", f"data.pairs={SHAPE}"], "data.pairs is set", 1),
    (["data", "synth", "{d}/o.txt", "--preset", "smoke"], "{d}/o.txt: name a .jsonl file", 1),
]


def _fixtures(d: Path) -> None:
    for name, text in FILES.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text, encoding="utf-8")


def _tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if "__pycache__" not in p.parts)


def test_the_corpus_covers_every_command():
    bad_files = len(list((Path(__file__).parent / "data" / "bad").iterdir()))
    assert len(CASES) + bad_files >= 40
    commands = {" ".join(c[:2]) if c[0] == "data" else c[0] for c, _, _ in CASES}
    assert commands == {"bench", "train", "eval", "sweep", "report", "config", "data inspect", "data convert", "data synth"}


@pytest.mark.parametrize("args,says,code", CASES, ids=[" ".join(c[:4])[:60] for c, _, _ in CASES])
def test_bad_invocation_is_one_line_and_writes_nothing(args, says, code, tmp_path, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    _fixtures(d)
    monkeypatch.syspath_prepend(str(d))  # py:judges:...
    monkeypatch.chdir(tmp_path)  # a default --out would land here
    before = _tree(tmp_path)
    argv = [a.replace("{d}", str(d)) for a in args]
    says = says.replace("{t}", str(tmp_path))
    if argv[0] in ("bench", "train") and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    res = runner.invoke(app, argv, env={"COLUMNS": "400"})
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    if code == 2:  # typer's usage box
        assert says.replace("{d}", str(d)) in " ".join(res.output.split())
    else:
        errors = [line for line in lines if line.startswith("error:")]
        assert errors == [lines[-1]], res.output
        assert says.replace("{d}", str(d)) in lines[-1], lines[-1]
    after = _tree(tmp_path)
    if code == 130 and "continues from" in says:  # Ctrl-C mid-run: only the progress the same command continues
        kept = [p for p in after if p not in before]
        assert kept and all(p.startswith("out.resume") for p in kept), kept
        after = [p for p in after if not p.startswith("out.resume")]
    assert after == before  # no partial output anywhere, no staging folder left
