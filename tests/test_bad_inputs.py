"""A corpus of bad data files (tests/data/bad/): each gives one line naming the file, the line and the field,
exit 1 and nothing written; with --skip-invalid the same files give the drop report, or still one line when
nothing usable is left or the file as a whole cannot be read."""

import json
from pathlib import Path

import pytest
from conftest import MICRO
from typer.testing import CliRunner

from prefopt.cli import app

BAD = Path(__file__).parent / "data" / "bad"
runner = CliRunner()

# file -> (what the strict error says after '<file>', what --skip-invalid reports: 'dropped: <kind>' or 'error: ...')
CORPUS = {
    "answers_without_votes.jsonl": (":1: field 'answers' item 1 needs numeric 'upvotes'", "error: no usable row is left"),
    "bad_margin.jsonl": (":2: field 'margin' must be a finite number", "dropped: field 'margin' must be a finite number"),
    "bad_message.jsonl": (":2: field 'prompt' message 1 must be an object", "dropped: field 'prompt' message 1"),
    "bad_quoting.csv": (":3: row has 1 cells but the header has 3", "dropped: row has 1 cells"),
    "blank_rejected.jsonl": (":2: field 'rejected' is empty", "dropped: field 'rejected' is empty"),
    "cell_count_mismatch.csv": (":3: row has 2 cells but the header has 3", "dropped: row has 2 cells"),
    "chosen_is_a_number.jsonl": (":2: field 'chosen' must be a string", "dropped: field 'chosen' must be a string"),
    "corrupt.parquet": (": could not read parquet", "error: could not read parquet"),
    "empty_chosen.jsonl": (":2: field 'chosen' is empty", "dropped: field 'chosen' is empty"),
    "empty_file.csv": (": no rows: the source is empty", "error: no rows"),
    "empty_file.jsonl": (": no rows: the source is empty", "error: no rows"),
    "empty_prompt.jsonl": (":2: field 'prompt' is empty", "dropped: field 'prompt' is empty"),
    "header_only.csv": (": no rows: the source is empty", "error: no rows"),
    "hh_no_shared_prefix.jsonl": (":2: fields 'chosen' and 'rejected' share no prompt prefix", "dropped: fields 'chosen' and 'rejected' share no prompt prefix"),
    "identical_responses.jsonl": (":2: fields 'chosen' and 'rejected' are identical", "dropped: fields 'chosen' and 'rejected' are identical"),
    "invalid_json_line.jsonl": (":2: invalid JSON", "dropped: invalid JSON"),
    "json_array_bad_item.json": (" row 2: field 'chosen' is missing", "dropped: field 'chosen' is missing"),
    "json_not_array.json": (":1: invalid JSON", "error: no usable row is left"),
    "latin1_encoding.csv": (":3: not valid UTF-8", "error: not valid UTF-8"),
    "missing_chosen.jsonl": (":2: field 'chosen' is missing", "dropped: field 'chosen' is missing"),
    "missing_rejected.jsonl": (":2: field 'rejected' is missing", "dropped: field 'rejected' is missing"),
    "mixed_kinds_implicit.jsonl": (":2: fields 'chosen' and 'rejected' must both be strings", "dropped: fields 'chosen' and 'rejected' must both be strings"),
    "nan_margin.jsonl": (":2: field 'margin' must be a finite number, got nan", "dropped: field 'margin' must be a finite number"),
    "no_assistant_message.jsonl": (":2: field 'chosen' has no assistant message", "dropped: field 'chosen' has no assistant message"),
    "not_an_object.jsonl": (":2: expected a JSON object", "dropped: expected a JSON object"),
    "not_gzip.jsonl.gz": (": not a complete gz archive", "error: not a complete gz archive"),
    "only_blank_lines.jsonl": (": no rows: the source is empty", "error: no rows"),
    "ranked_length_mismatch.jsonl": (":1: field 'scores' must be 3 finite numbers", "error: no usable row is left"),
    "truncated.csv.bz2": (": not a complete bz2 archive", "error: not a complete bz2 archive"),
    "truncated.jsonl.gz": (": not a complete gz archive", "error: not a complete gz archive"),
    "utf16_encoding.jsonl": (": the file is UTF-16", "error: the file is UTF-16"),
    "wrong_delimiter.csv": (":1: the header is one column 'prompt;chosen;rejected': the file looks ';'-separated", "error: ';'-separated"),
    "wrong_type.txt": (": unsupported file type '.txt'", "error: unsupported file type"),
}


def _lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_the_corpus_is_all_there():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(CORPUS) and len(CORPUS) >= 25


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_file_is_one_line_and_writes_nothing(name, tmp_path):
    path = BAD / name
    strict, lenient = CORPUS[name]
    res = runner.invoke(app, ["data", "inspect", str(path), "--model", "tiny", "--encoding-errors", "strict"],
                        env={"COLUMNS": "400"})
    assert res.exit_code == 1, res.output
    assert _lines(res.output) == [_lines(res.output)[0]] and _lines(res.output)[0].startswith(f"error: {path}{strict}")
    sets = [a for s in (*MICRO, f"data.pairs={path}") for a in ("--set", s)]
    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--preset", "smoke", *sets, "--out", str(out)], env={"COLUMNS": "400"})
    assert res.exit_code == 1 and len(_lines(res.output)) == 1 and f"{path}{strict}" in res.output, res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []

    res = runner.invoke(app, ["data", "convert", str(path), str(tmp_path / "out.jsonl"), "--skip-invalid"],
                        env={"COLUMNS": "400"})
    if lenient.startswith("error: "):
        assert res.exit_code == 1 and len(_lines(res.output)) == 1 and lenient[7:] in res.output, res.output
        assert list(tmp_path.iterdir()) == []
    else:
        assert res.exit_code == 0, res.output
        assert f"kept 1 of 2 rows, dropped 1: 1 × {lenient[9:]}" in " ".join(res.output.split())
        kept = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in kept] == ["p"]


def test_inspect_and_convert_a_good_file(tmp_path):
    from prefopt.data.io import load_pairs

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"say {c}", "chosen": c * 4, "rejected": c, "src": i}) + "\n"
                           for i, c in enumerate("abcdef")), encoding="utf-8")
    res = runner.invoke(app, ["data", "inspect", str(src), "--model", "tiny", "--examples", "2"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    text = res.output
    assert f"format: {src}: trl standard (6 rows) -> 6 records" in text and "kept all 6 rows" in text
    # char tokenizer: 'say a' is 5 tokens, chosen 'aaaa' 4, rejected 'a' 1
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("│")[1:-1]]
                                              for line in text.splitlines() if line.count("│") == 9)}
    # columns: n, min, p50, p90, p99, max, mean
    assert rows["prompt"] == ["6", "5", "5", "5", "5", "5", "5.0"]
    assert rows["chosen"][:2] == ["6", "4"] and rows["rejected"][-1] == "1.0"
    assert "--- example 2: prompt as the model sees it ---\nsay b\n--- example 2: chosen ---\nbbbb" in text
    assert "example 3" not in text
    out = tmp_path / "canonical.jsonl"
    res = runner.invoke(app, ["data", "convert", str(src), str(out)])
    assert res.exit_code == 0 and load_pairs(out) == load_pairs(src)
    res = runner.invoke(app, ["data", "convert", str(src), str(out)])
    assert res.exit_code == 1 and "exists: pass --overwrite" in res.output
    res = runner.invoke(app, ["data", "convert", str(src), str(tmp_path / "canonical.csv")])
    assert res.exit_code == 1 and "name a .jsonl or .parquet file" in res.output


def test_convert_to_parquet_reads_back_unchanged(tmp_path):
    """Canonical parquet: meta with different keys per row and conversational prompts come back exactly (they
    travel as JSON text named in the schema metadata); a parquet file from elsewhere is read as plain columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefopt.data.io import load_pairs, load_prompts

    src = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "say a", "chosen": "aa", "rejected": "a", "src": 1},
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "", "rejected_eos": True,
             "margin": 0.5, "annotator": {"name": "x", "flip": 0.1}},
            {"prompt": "say c", "chosen": "cc", "rejected": "c", "nested": [1, {"k": None}]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "canonical.parquet"
    res = runner.invoke(app, ["data", "convert", str(src), str(out)])
    assert res.exit_code == 0, res.output
    assert load_pairs(out) == load_pairs(src) and len(load_pairs(out)) == 3
    assert pq.read_table(out).column_names == ["prompt", "chosen", "rejected", "margin", "meta"]
    prompts = tmp_path / "prompts.parquet"
    res = runner.invoke(app, ["data", "convert", str(src), str(prompts), "--as", "prompts"])
    assert res.exit_code == 0, res.output
    assert load_prompts(prompts) == load_prompts(src)
    foreign = tmp_path / "foreign.parquet"  # no prefopt metadata: 'meta' is just another column
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"], "meta": ['{"a": 1}']}), foreign)
    assert load_pairs(foreign)[0].meta == {"meta": '{"a": 1}'}
    broken = tmp_path / "broken.parquet"
    table = pq.read_table(out)
    pq.write_table(table.set_column(4, "meta", pa.array(["{", "{}", "{}"])), broken)
    res = runner.invoke(app, ["train", "--set", f"data.pairs={broken}"])
    assert res.exit_code == 1 and f"{broken} row 1, field 'meta': not the JSON text prefopt wrote" in res.output


def test_data_synth_writes_the_pairs_a_run_trains_on(tmp_path):
    from prefopt.data.io import load_pairs

    sets = [a for s in MICRO for a in ("--set", s)]
    out = tmp_path / "synth.jsonl"
    res = runner.invoke(app, ["data", "synth", str(out), "--preset", "smoke", *sets])
    assert res.exit_code == 0, res.output
    pairs = load_pairs(out)
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--preset", "smoke", *sets, "--set", "policies=dpo", "--out", str(run)]).exit_code == 0
    assert pairs == load_pairs(run / "pairs.jsonl")  # the same pairs, same seed
    res = runner.invoke(app, ["data", "synth", str(out), "--preset", "smoke", *sets])
    assert res.exit_code == 1 and "exists: pass --overwrite" in res.output
    ro = tmp_path / "missing" / "x.jsonl"
    res = runner.invoke(app, ["data", "synth", str(ro), "--preset", "smoke", *sets])
    assert res.exit_code == 1 and "cannot write" in res.output


def test_inspect_reads_invalid_utf8_as_replacement_and_says_what_a_run_needs():
    path = BAD / "latin1_encoding.csv"
    res = runner.invoke(app, ["data", "inspect", str(path), "--model", "tiny"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert f"note: {path}:3: invalid UTF-8" in res.output and "a run needs --set data.encoding_errors=replace" in res.output
    assert "kept all 2 rows" in res.output and "caf\ufffd" in res.output


def test_inspect_reads_the_embedded_prompt_source():
    """`data.prompts`' default is a name, not a file: inspect shows those prompts instead of asking the hub."""
    res = runner.invoke(app, ["data", "inspect", "embedded:sentiment", "--as", "prompts", "--model", "tiny",
                              "--examples", "1"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    assert "embedded:sentiment: embedded sentiment task (480 rows) -> 480 records" in res.output
    assert "I watched The Glass Orchard last night and" in res.output
    res = runner.invoke(app, ["data", "inspect", "embedded:sentiment"])
    assert res.exit_code == 1 and "read it with --as prompts alone" in res.output
