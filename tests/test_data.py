"""Tests for loaders, the sentiment prompt set and splits (prefopt.data.io/tasks/split/records)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefopt.data import (
    DataError,
    PreferencePair,
    PromptRecord,
    holdout_pairs,
    load_pairs,
    load_prompts,
    prompt_key,
    prompts_from_pairs,
    sentiment_prompts,
    split_prompts,
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def data_error(fn, *args, **kwargs) -> str:
    """Run ``fn`` expecting a DataError; return its message after checking it is one line."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    return message


HH_CHOSEN = (
    "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Miso?"
    "\n\nHuman: Something longer?\n\nAssistant: I think Sir Pounce-a-lot works."
)
HH_REJECTED = (
    "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Miso?"
    "\n\nHuman: Something longer?\n\nAssistant: I think Cat."
)
HH_PROMPT = (
    "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Miso?"
    "\n\nHuman: Something longer?\n\nAssistant:"
)


# --------------------------------------------------------------------------- adapters


def test_trl_standard_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi.", "chosen": " Hi!", "rejected": "No."}])
    assert load_pairs(path) == [PreferencePair(prompt="Say hi.", chosen=" Hi!", rejected="No.")]


def test_trl_conversational_row(tmp_path: Path) -> None:
    row = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    }
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    assert load_pairs(path) == [
        PreferencePair(
            prompt=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
            ],
            chosen="Paris.",
            rejected="Lyon.",
        )
    ]


def test_trl_conversational_takes_last_assistant_message(tmp_path: Path) -> None:
    row = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [
            {"role": "assistant", "content": "draft"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "final", "name": "bot"},
        ],
        "rejected": [{"role": "assistant", "content": "other"}],
    }
    [pair] = load_pairs(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert (pair.chosen, pair.rejected) == ("final", "other")


def test_hh_implicit_string_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    # The responses share "I think", yet the prompt must stop at the last shared marker.
    assert load_pairs(path) == [
        PreferencePair(prompt=HH_PROMPT, chosen="I think Sir Pounce-a-lot works.", rejected="I think Cat.")
    ]


def test_hh_conversational_implicit_row(tmp_path: Path) -> None:
    shared = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Name a color."},
    ]
    row = {
        "chosen": shared + [{"role": "assistant", "content": "Blue."}],
        "rejected": shared + [{"role": "assistant", "content": "No."}],
    }
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    assert load_pairs(path) == [PreferencePair(prompt=shared, chosen="Blue.", rejected="No.")]


def test_margin_and_extra_columns_go_to_fields_and_meta(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2, "id": 7, "source": "web"},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED, "split": "x"},
    ]
    first, second = load_pairs(write_jsonl(tmp_path / "m.jsonl", rows))
    assert first == PreferencePair("p", "a", "b", margin=2.0, meta={"id": 7, "source": "web"})
    assert isinstance(first.margin, float)
    assert second.margin is None and second.meta == {"split": "x"}


# --------------------------------------------------------------------------- formats


ROWS = [
    {"prompt": "Tell me a joke.", "chosen": "Knock knock.", "rejected": "No.", "margin": 0.5},
    {"prompt": 'Say, "hi"\nplease', "chosen": "Hi,\nthere", "rejected": "Bye", "margin": 1.0},
]
EXPECTED = [
    PreferencePair("Tell me a joke.", "Knock knock.", "No.", margin=0.5),
    PreferencePair('Say, "hi"\nplease', "Hi,\nthere", "Bye", margin=1.0),
]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    assert load_pairs(write_jsonl(tmp_path / "d.jsonl", ROWS)) == EXPECTED


def test_json_array_and_json_lines_round_trip(tmp_path: Path) -> None:
    array = tmp_path / "a.json"
    array.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert load_pairs(array) == EXPECTED
    assert load_pairs(write_jsonl(tmp_path / "l.json", ROWS)) == EXPECTED


def test_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        'prompt,chosen,rejected,margin\nTell me a joke.,Knock knock.,No.,0.5\n"Say, ""hi""\nplease","Hi,\nthere",Bye,1\n',
        encoding="utf-8",
    )
    assert load_pairs(path) == EXPECTED


def test_csv_empty_margin_cell_means_none(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected,margin,id\np,a,b,,x1\n", encoding="utf-8")
    assert load_pairs(path) == [PreferencePair("p", "a", "b", margin=None, meta={"id": "x1"})]


def test_parquet_round_trip(tmp_path: Path) -> None:
    assert load_pairs(write_parquet(tmp_path / "d.parquet", ROWS)) == EXPECTED


def test_parquet_conversational_round_trip(tmp_path: Path) -> None:
    rows = [
        {
            "prompt": [{"role": "user", "content": "Q1"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
    ]
    assert load_pairs(write_parquet(tmp_path / "c.parquet", rows)) == [
        PreferencePair([{"role": "user", "content": "Q1"}], "good", "bad")
    ]


def test_hub_source_uses_datasets_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name: str, split: str):
        calls.append((name, split))
        return [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    pairs = load_pairs("Anthropic/hh-rlhf", split="test")
    assert calls == [("Anthropic/hh-rlhf", "test")]
    assert pairs == [PreferencePair(HH_PROMPT, "I think Sir Pounce-a-lot works.", "I think Cat.")]


def test_hub_failure_is_a_one_line_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_load_dataset(name: str, split: str):
        raise ConnectionError("Couldn't reach the Hub\nretry later")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    message = data_error(load_pairs, "someone/prefs")
    assert "could not load dataset 'someone/prefs' from the hub" in message
    assert "Couldn't reach the Hub" in message and "local .jsonl" in message


def test_hub_bad_row_names_the_row(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda name, split: rows))
    message = data_error(load_pairs, "someone/prefs")
    assert "row 2" in message and "field 'rejected' is missing" in message


# --------------------------------------------------------------------------- errors


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ({"prompt": "p", "chosen": "a"}, ["field 'rejected' is missing", "prompt/chosen/rejected"]),
        ({"chosen": "a"}, ["field 'rejected' is missing"]),
        ({"text": "a"}, ["field 'chosen' is missing"]),
        (
            {"prompt": "p", "chosen": 5, "rejected": "b"},
            ["field 'chosen' must be a string or a list of messages"],
        ),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, ["field 'prompt' must be a string"]),
        ({"prompt": "p", "chosen": "a", "rejected": "   "}, ["field 'rejected' is empty"]),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, ["field 'prompt' is empty"]),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, ["'chosen' and 'rejected' are identical"]),
        (
            {"chosen": "Human: hi A: x", "rejected": "Human: hi A: y"},
            ["'chosen' and 'rejected' share no prompt prefix"],
        ),
        ({"chosen": HH_PROMPT + " ", "rejected": HH_PROMPT + " Sure."}, ["field 'chosen' is empty"]),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"},
            ["field 'margin' must be a finite number"],
        ),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": True}, ["field 'margin'"]),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            ["field 'chosen' has no assistant message"],
        ),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, ["field 'prompt' message 1"]),
        (
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}],
            },
            ["'chosen' and 'rejected' must be the same", "final assistant message"],
        ),
        (
            {"chosen": "text", "rejected": [{"role": "assistant", "content": "x"}]},
            ["'chosen' and 'rejected' must both be"],
        ),
        ([1, 2, 3], ["expected a JSON object"]),
    ],
)
def test_jsonl_row_errors_name_line_and_field(tmp_path: Path, bad_row, expected: list[str]) -> None:
    # Line 1 good, line 2 blank (still counted), line 3 good, line 4 bad.
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + json.dumps(bad_row) + "\n",
        encoding="utf-8",
    )
    message = data_error(load_pairs, path)
    assert message.startswith(f"{path}:4: "), message
    for part in expected:
        assert part in message


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(GOOD)] * 6 + ['{"prompt": "p" "chosen": "a"}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = data_error(load_pairs, path)
    assert message.startswith(f"{path}:7: invalid JSON (Expecting ',' delimiter"), message
    assert message.endswith("fix or remove the line")


def test_invalid_json_array_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n {"prompt": "p",\n  "chosen": "a"\n  "rejected": "b"}\n]', encoding="utf-8")
    assert data_error(load_pairs, path).startswith(f"{path}:4: invalid JSON")


def test_json_array_bad_item_names_row(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, {"prompt": "p", "chosen": "", "rejected": "b"}]), encoding="utf-8")
    message = data_error(load_pairs, path)
    assert message.startswith(f"{path} row 2: field 'chosen' is empty"), message


def test_csv_errors_report_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    # Header line 1, row 1 spans lines 2-3, row 2 on line 4 is bad.
    path.write_text('prompt,chosen,rejected\np,"multi\nline",b\nq,a,\n', encoding="utf-8")
    message = data_error(load_pairs, path)
    assert message.startswith(f"{path}:4: field 'rejected' is empty"), message


def test_csv_row_index_plus_two(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a,b\np,same,same\n", encoding="utf-8")
    # Row index 2 (0-based) is physical line 4.
    assert data_error(load_pairs, path).startswith(f"{path}:4: fields 'chosen' and 'rejected' are identical")


def test_csv_cell_count_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\np,a,b,extra\n", encoding="utf-8")
    message = data_error(load_pairs, path)
    assert message.startswith(f"{path}:2: row has 4 cells but the header has 3"), message


def test_csv_bad_margin(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected,margin\np,a,b,1\np,a,b,lots\n", encoding="utf-8")
    message = data_error(load_pairs, path)
    assert message.startswith(f"{path}:3: field 'margin' must be a finite number, got 'lots'"), message


def test_parquet_errors_name_row(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "data.parquet", [GOOD, GOOD, {"prompt": "p", "chosen": "a", "rejected": None}]
    )
    message = data_error(load_pairs, path)
    assert message.startswith(f"{path} row 3: field 'rejected' is missing"), message


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.csv", "prompt,chosen,rejected\n"), ("e.json", "[]")],
)
def test_empty_sources(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert data_error(load_pairs, path) == f"{path}: no rows: the source is empty, add at least one row"


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    assert "no rows" in data_error(load_pairs, path)


@pytest.mark.parametrize("source", ["missing.jsonl", "./prefs", "data/sub/prefs", "C:\\data\\x"])
def test_missing_path_like_source_is_file_not_found(
    source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    # A hub lookup here would be a bug: make it fail loudly.
    monkeypatch.setitem(sys.modules, "datasets", None)
    message = data_error(load_pairs, source)
    assert message.startswith(f"{source}: file not found"), message


def test_missing_pathlib_path_is_file_not_found(tmp_path: Path) -> None:
    assert "file not found" in data_error(load_pairs, tmp_path / "nothing")


def test_unsupported_suffix_and_directory(tmp_path: Path) -> None:
    text = tmp_path / "d.txt"
    text.write_text("hello", encoding="utf-8")
    assert "unsupported file type '.txt'" in data_error(load_pairs, text)
    assert "is a directory" in data_error(load_pairs, tmp_path)


# --------------------------------------------------------------------------- prompts


def test_load_prompts_default_and_named_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Hello", "question": "Why?", "id": 1},
            {"prompt": [{"role": "user", "content": "Hi"}], "question": "How?", "id": 2},
        ],
    )
    assert load_prompts(path) == [
        PromptRecord("Hello", meta={"question": "Why?", "id": 1}),
        PromptRecord([{"role": "user", "content": "Hi"}], meta={"question": "How?", "id": 2}),
    ]
    assert [r.prompt for r in load_prompts(path, field="question")] == ["Why?", "How?"]


def test_load_prompts_missing_field_names_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"body": "a", "label": 1}])
    message = data_error(load_prompts, path)
    assert message.startswith(f"{path}:1: field 'prompt' is missing (columns: body, label)"), message
    assert "field 'title'" in data_error(load_prompts, path, field="title")


def test_a_text_corpus_is_detected_by_its_columns(tmp_path: Path) -> None:
    from prefopt.data.io import read_prompts

    words = " ".join(f"w{i}" for i in range(20))
    path = write_jsonl(tmp_path / "reviews.jsonl", [{"review": f"<br />{words}", "label": i} for i in range(5)])
    prompts, report = read_prompts(path)
    assert report.formats == {"text prefixes of 'review' (2-8 words)": 5}
    assert prompts == load_prompts(path, field="review", prefix_words=(2, 8))  # the explicit form, same seed
    assert all(2 <= len(p.prompt.split()) <= 8 for p in prompts)


REVIEW_WORDS = [f"w{i}" for i in range(40)]


def write_reviews(path: Path, n: int = 30) -> Path:
    lines = ["text,label"]
    for i in range(n):
        words = [f"r{i}{w}" for w in REVIEW_WORDS]
        # HTML line breaks and odd spacing, as in IMDb reviews.
        lines.append(f'"{" ".join(words[:5])}<br /><br />{"   ".join(words[5:])}",{i % 2}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_prefix_word_prompts(tmp_path: Path) -> None:
    path = write_reviews(tmp_path / "imdb.csv")
    records = load_prompts(path, field="text", prefix_words=(2, 8), seed=3)
    assert len(records) == 30
    counts = set()
    for i, record in enumerate(records):
        words = record.prompt.split(" ")
        assert 2 <= len(words) <= 8
        assert words == [f"r{i}{w}" for w in REVIEW_WORDS[: len(words)]]  # tag gone, words split
        assert record.meta == {"label": str(i % 2)}
        counts.add(len(words))
    assert len(counts) > 3  # n is drawn per row, not once
    assert load_prompts(path, field="text", prefix_words=(2, 8), seed=3) == records
    other = load_prompts(path, field="text", prefix_words=(2, 8), seed=4)
    assert [r.prompt for r in other] != [r.prompt for r in records]


def test_prefix_words_empty_text_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "imdb.csv"
    path.write_text("text\nsome words here\n<br /><br />\n", encoding="utf-8")
    message = data_error(load_prompts, path, field="text", prefix_words=(1, 2))
    assert message.startswith(f"{path}:3: field 'text' is empty"), message


def test_prefix_words_validation(tmp_path: Path) -> None:
    path = write_reviews(tmp_path / "imdb.csv", n=1)
    with pytest.raises(ValueError, match="prefix_words"):
        load_prompts(path, field="text", prefix_words=(5, 2))


# --------------------------------------------------------------------------- records, task, split


def test_prompt_key_is_stable_for_message_lists() -> None:
    a = [{"role": "user", "content": "x"}]
    b = [{"content": "x", "role": "user"}]
    assert prompt_key(a) == prompt_key(b) != prompt_key([{"role": "user", "content": "y"}])
    assert prompt_key("plain") == "plain"


def test_sentiment_prompts() -> None:
    prompts = sentiment_prompts()
    keys = [prompt_key(p.prompt) for p in prompts]
    assert len(prompts) >= 400 and len(set(keys)) == len(keys)
    assert sentiment_prompts() == prompts
    assert all(isinstance(p.prompt, str) and p.meta["task"] == "sentiment" for p in prompts)
    assert all(p.meta["title"] in p.prompt for p in prompts)
    assert len({p.meta["template"] for p in prompts}) >= 10 and len({p.meta["title"] for p in prompts}) >= 35
    loaded = set("great awful terrible amazing love loved hate bad good best worst boring".split())
    for p in prompts:
        words = {w.strip(".,:;!?'").lower() for w in p.prompt.split()}
        assert not words & loaded, p.prompt


def records(n: int) -> list[PromptRecord]:
    return [PromptRecord(f"prompt {i}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_sized() -> None:
    prompts = records(50) + records(10)  # 10 duplicates
    split = split_prompts(prompts, n_eval=8, n_train=20, seed=1)
    assert len(split.eval) == 8 and len(split.train) == 20
    eval_keys = {prompt_key(r.prompt) for r in split.eval}
    train_keys = {prompt_key(r.prompt) for r in split.train}
    assert not eval_keys & train_keys and len(train_keys) == 20
    assert split_prompts(prompts, n_eval=8, n_train=20, seed=1) == split
    assert split_prompts(prompts, n_eval=8, n_train=20, seed=2).eval != split.eval
    rest = split_prompts(prompts, n_eval=8, seed=1)
    assert rest.eval == split.eval and len(rest.train) == 42
    assert rest.train[:20] == split.train  # growing n_train keeps the same prefix
    assert split.eval != records(8)  # actually shuffled


def test_split_dedup_keeps_first_occurrence() -> None:
    prompts = [PromptRecord("a", {"n": 1}), PromptRecord("a", {"n": 2}), PromptRecord("b")]
    split = split_prompts(prompts, n_eval=1, seed=0)
    everything = split.eval + split.train
    assert len(everything) == 2
    assert next(r for r in everything if r.prompt == "a").meta == {"n": 1}


def test_split_too_few_prompts() -> None:
    message = data_error(split_prompts, records(10) + records(10), n_eval=8, n_train=5)
    assert "need at least 13 unique prompts" in message and "got 10" in message
    assert "got 3" in data_error(split_prompts, records(3), n_eval=3)


def test_holdout_pairs_and_prompts_from_pairs() -> None:
    pairs = [
        PreferencePair("p1", "a", "b"),
        PreferencePair("p2", "a", "b"),
        PreferencePair("p1", "c", "d"),
        PreferencePair([{"role": "user", "content": "q"}], "a", "b"),
    ]
    kept, removed = holdout_pairs(
        pairs, [PromptRecord("p1"), PromptRecord([{"content": "q", "role": "user"}])]
    )
    assert removed == 3 and kept == [pairs[1]]
    assert holdout_pairs(pairs, ["p2"]) == ([pairs[0], pairs[2], pairs[3]], 1)
    assert prompts_from_pairs(pairs) == [
        PromptRecord("p1"),
        PromptRecord("p2"),
        PromptRecord([{"role": "user", "content": "q"}]),
    ]


def test_data_layer_does_not_import_torch() -> None:
    code = "import sys, prefopt.data; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pairs_written_by_a_run_load_back_unchanged(tmp_path: Path) -> None:
    """write_pairs -> load_pairs is the identity: meta (chosen_eos, scores) and margin survive, nothing nests."""
    from prefopt.data import write_pairs

    pairs = [
        PreferencePair("p", "a b", "", margin=None,
                       meta={"chosen_eos": False, "rejected_eos": True, "score_chosen": 0.1 + 0.2, "source": "synthetic"}),
        PreferencePair([{"role": "user", "content": "hi"}], "good", "bad", margin=1.5, meta={"id": 3, "tags": ["x"]}),
    ]
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    assert load_pairs(path) == pairs
    assert load_pairs(write_pairs(tmp_path / "again.jsonl", load_pairs(path))) == pairs


def test_blank_response_needs_an_eos_flag(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "  "}]
    assert "field 'rejected' is empty" in data_error(load_pairs, write_jsonl(tmp_path / "d.jsonl", rows))
    sampled = [{"prompt": "p", "chosen": "a", "rejected": " ", "rejected_eos": False}]  # what a sampler produced
    assert load_pairs(write_jsonl(tmp_path / "s.jsonl", sampled))[0].rejected == " "


def test_invalid_utf8_names_the_line_or_is_replaced_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "reviews.csv"
    path.write_bytes(b"review,sentiment\nfine movie,positive\nI\xe2\x80?m surprised,negative\nok,positive\n")
    msg = data_error(load_prompts, path, field="review")
    assert "reviews.csv:3" in msg and "not valid UTF-8" in msg and "encoding_errors=replace" in msg
    with caplog.at_level("WARNING", logger="prefopt.data"):
        prompts = load_prompts(path, field="review", encoding_errors="replace")
    assert [p.prompt for p in prompts] == ["fine movie", "I\ufffd?m surprised", "ok"]
    assert "1 invalid UTF-8 byte sequence(s)" in caplog.text and "line(s): 3" in caplog.text


# --------------------------------------------------------------------------- compressed files, strict and lenient

PACKED_ROWS = [
    {"prompt": "p1", "chosen": "good", "rejected": "bad", "margin": None},
    {"prompt": "p2", "chosen": "yes", "rejected": "no", "margin": 1.5},
]


def _plain_files(tmp_path: Path) -> dict[str, Path]:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,chosen,rejected\np1,good,bad\np3,fine,poor\n", encoding="utf-8")
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps(PACKED_ROWS), encoding="utf-8")
    return {"jsonl": write_jsonl(tmp_path / "d.jsonl", PACKED_ROWS), "json": json_path, "csv": csv_path,
            "parquet": write_parquet(tmp_path / "d.parquet", PACKED_ROWS)}


@pytest.mark.parametrize("ext", ["gz", "bz2", "xz"])
def test_compressed_files_load_like_the_plain_ones(tmp_path: Path, ext: str) -> None:
    import bz2
    import gzip
    import lzma

    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[ext]
    for kind, plain in _plain_files(tmp_path).items():
        packed = plain.with_name(plain.name + "." + ext)
        packed.write_bytes(compress(plain.read_bytes()))
        assert load_pairs(packed) == load_pairs(plain), kind


def test_truncated_or_corrupt_archives_are_one_line_errors(tmp_path: Path) -> None:
    import gzip

    whole = gzip.compress(("".join(json.dumps(r) + "\n" for r in PACKED_ROWS * 50)).encode())
    cut = tmp_path / "pairs.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    message = data_error(load_pairs, cut)
    assert message.startswith(f"{cut}: not a complete gz archive") and "truncated or corrupt" in message
    junk = tmp_path / "junk.csv.gz"
    junk.write_bytes(b"this is not gzip at all")
    assert "not a complete gz archive" in data_error(load_pairs, junk)
    other = tmp_path / "d.txt.gz"
    other.write_bytes(gzip.compress(b"x"))
    assert "unsupported file type '.txt.gz'" in data_error(load_pairs, other)


def _mixed_file(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
        '{"prompt": "d", "chosen": "", "rejected": "f"}\n'         # 2: empty response
        '{"prompt": "g", "chosen": "h"}\n'                         # 3: missing field
        '{"prompt": "i", "chosen": "j", "rejected": "k"\n'         # 4: invalid JSON
        '{"prompt": "l", "chosen": "", "rejected": "n"}\n'         # 5: empty response
        '[1, 2]\n'                                                 # 6: not an object
        '{"prompt": "o", "chosen": "p", "rejected": "q", "margin": "x"}\n'  # 7: bad margin
        '{"prompt": "r", "chosen": "s", "rejected": "t"}\n',
        encoding="utf-8",
    )
    return path


def test_strict_loading_stops_at_the_first_bad_row_in_file_order(tmp_path: Path) -> None:
    # line 2 is reported, not line 4's parse error, although parsing comes before the row checks
    assert data_error(load_pairs, _mixed_file(tmp_path)).startswith(f"{tmp_path / 'mixed.jsonl'}:2: field 'chosen' is empty")


def test_skip_invalid_drops_and_reports_every_kind(tmp_path: Path) -> None:
    from prefopt.data.io import read_pairs

    pairs, report = read_pairs(_mixed_file(tmp_path), skip_invalid=True)
    assert [p.prompt for p in pairs] == ["a", "r"]
    assert (report.rows, report.kept, report.n_dropped) == (8, 2, 6)
    d = report.to_dict()
    assert [(k["kind"], k["count"], k["first"]) for k in d["kinds"]] == [
        ("field 'chosen' is empty", 2, ["line 2", "line 5"]),
        ("expected a JSON object with named fields", 1, ["line 6"]),
        ("field 'margin' must be a finite number", 1, ["line 7"]),
        ("field 'rejected' is missing", 1, ["line 3"]),
        ("invalid JSON", 1, ["line 4"]),
    ]
    line = report.line()
    assert "\n" not in line and line.startswith(f"{tmp_path / 'mixed.jsonl'}: kept 2 of 8 rows, dropped 6: ")
    assert "2 × field 'chosen' is empty (line 2, line 5)" in line


def test_skip_invalid_with_nothing_left_is_an_error_and_prompts_are_lenient_too(tmp_path: Path) -> None:
    from prefopt.data.io import read_prompts

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}, {"text": "x"}])
    message = data_error(load_pairs, bad, skip_invalid=True)
    assert "kept 0 of 2 rows" in message and "no usable row is left" in message
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("prompt,other\nfirst,1\nsecond\n,3\nthird,4\n", encoding="utf-8")
    prompts, report = read_prompts(csv_path, skip_invalid=True)
    assert [p.prompt for p in prompts] == ["first", "third"]
    assert [(k["kind"], k["first"]) for k in report.to_dict()["kinds"]] == [
        ("field 'prompt' is empty", ["line 4"]), ("row has 1 cells but the header has 2", ["line 3"])]


# --------------------------------------------------------------------------- scored and ranked answers -> pairs


def test_stack_exchange_score_rule_hand_worked() -> None:
    from prefopt.data.io import stack_exchange_score

    # round(log2(1 + upvotes)) (+1 if accepted); negative votes -> -1
    assert [stack_exchange_score(v, False) for v in (0, 1, 2, 3, 6, 7, 100)] == [0, 1, 2, 2, 3, 3, 7]
    assert stack_exchange_score(3, True) == 3 and stack_exchange_score(0, True) == 1
    assert stack_exchange_score(-2, True) == -1 and stack_exchange_score(-1, False) == -1


def test_stack_exchange_answers_become_pairs_by_the_rule(tmp_path: Path) -> None:
    from prefopt.data.io import read_pairs

    row = {"question": "How do I sort a dict?", "qid": 7, "answers": [
        {"text": "A: sorted(d.items())", "upvotes": 6, "accepted": True},   # 3 + 1 = 4
        {"text": "B: use a loop", "upvotes": 3},                          # 2
        {"text": "C: d.sort()", "upvotes": -2},                           # -1
        {"text": "D: collections.OrderedDict", "upvotes": 2},             # 2 (ties with B)
    ]}
    pairs, report = read_pairs(write_jsonl(tmp_path / "se.jsonl", [row]))
    got = [(p.chosen[0], p.rejected[0], p.meta["chosen_score"], p.meta["rejected_score"]) for p in pairs]
    # largest score gap first; B and D tie (2 = 2) and give no pair
    # gaps A-C 5, B-C 3, D-C 3, A-B 2, A-D 2 (equal gaps in answer order)
    assert got == [("A", "C", 4, -1), ("B", "C", 2, -1), ("D", "C", 2, -1), ("A", "B", 4, 2), ("A", "D", 4, 2)]
    assert all(p.prompt == "How do I sort a dict?" and p.meta["qid"] == 7 and p.margin is None for p in pairs)
    assert report.formats == {"stack-exchange answers": 1} and report.notes == {"tied pairs dropped": 1}
    assert "stack-exchange answers (1 rows) -> 5 records; 1 tied pairs dropped" in report.format_line()


def test_stack_exchange_at_most_ten_pairs_and_precomputed_scores(tmp_path: Path) -> None:
    from prefopt.data.io import read_pairs

    answers = [{"text": f"answer {i}", "pm_score": i} for i in range(6)]  # 15 pairs, all different scores
    pairs, report = read_pairs(write_jsonl(tmp_path / "se.jsonl", [{"question": "q", "answers": answers}]))
    assert len(pairs) == 10 and report.notes == {"pairs over the limit of 10 per prompt dropped": 5}
    gaps = [p.meta["chosen_score"] - p.meta["rejected_score"] for p in pairs]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] == 5 and min(gaps) == 2  # the 5 gap-1 pairs are dropped
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answers": [{"text": "a", "upvotes": "many"}]}])
    assert "bad.jsonl:1: field 'answers' item 1 needs numeric 'upvotes'" in data_error(load_pairs, bad)


def test_ranked_responses_become_every_pair_that_differs(tmp_path: Path) -> None:
    from prefopt.data.io import read_pairs

    rows = [{"prompt": "p", "responses": ["x", "y", "z"], "ranks": [2, 1, 3]},
            {"prompt": "q", "responses": ["u", "v", "w"], "scores": [0.5, 0.5, 0.9]}]
    pairs, report = read_pairs(write_jsonl(tmp_path / "ranked.jsonl", rows))
    by_prompt = {}
    for p in pairs:
        by_prompt.setdefault(p.prompt, []).append((p.chosen, p.rejected))
    assert by_prompt["p"] == [("y", "z"), ("y", "x"), ("x", "z")]  # rank gaps 2, 1, 1 (equal gaps: file order)
    assert by_prompt["q"] == [("w", "u"), ("w", "v")]              # u and v tie: no pair
    assert report.notes == {"tied pairs dropped": 1} and report.formats == {"ranked responses": 2}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": [1]}])
    assert "field 'scores' must be 2 finite numbers" in data_error(load_pairs, bad)


def test_hh_multi_turn_prompts_are_recovered_exactly() -> None:
    from prefopt.data.io import hh_text, hh_turns, plain_template

    turns = hh_turns(HH_PROMPT)
    assert turns == [
        {"role": "user", "content": "What is a good name for a cat?"},
        {"role": "assistant", "content": "How about Miso?"},
        {"role": "user", "content": "Something longer?"},
    ]
    assert hh_text(turns) == HH_PROMPT
    assert hh_turns("Plain prompt.") is None and hh_turns("\n\nHuman: a\n\nHuman: b\n\nAssistant:") is None
    assert plain_template(turns) == ("Question: What is a good name for a cat?\n\nAnswer: How about Miso?\n\n"
                                     "Question: Something longer?\n\nAnswer:")


# --------------------------------------------------------------------------- every shape, one canonical form

SHAPES = Path(__file__).parent / "data" / "shapes"
TEXT_SHAPES = {"trl_standard.jsonl": "trl standard", "trl_standard.json": "trl standard", "trl_standard.csv": "trl standard",
               "trl_standard.parquet": "trl standard", "trl_standard.jsonl.gz": "trl standard",
               "ranked_scores.jsonl": "ranked responses", "ranked_ranks.jsonl": "ranked responses",
               "stack_exchange.jsonl": "stack-exchange answers"}
CHAT_SHAPES = {"trl_conversational.jsonl": "trl conversational", "conversational_implicit.jsonl":
               "conversational, implicit prompt", "hh_transcripts.jsonl": "hh transcripts"}


def test_every_shape_converts_to_the_same_canonical_pairs() -> None:
    """Our fixtures hold the same three judgements in every supported shape. Text shapes give identical
    (prompt, chosen, rejected); chat shapes give identical pairs as the model sees them (chat template applied;
    HH transcripts become their turns)."""
    from prefopt.data.io import read_pairs
    from prefopt.models.base import char_tokenizer
    from prefopt.models.ops import render_prompt

    assert sorted(p.name for p in SHAPES.iterdir()) == sorted({**TEXT_SHAPES, **CHAT_SHAPES})
    want = [("What is 2+2?", "It is 4.", "It is 5."), ("Name a colour, please.", "Blue, like the sky.", "I won't."),
            ("Say hello", "Hello! How can I help?", "Go away.")]
    for name, fmt in TEXT_SHAPES.items():
        pairs, report = read_pairs(SHAPES / name)
        assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == want, name
        assert report.formats == {fmt: 3}, name
    chat = char_tokenizer()
    chat.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant]{% endif %}")
    seen = {}
    for name, fmt in CHAT_SHAPES.items():
        pairs, report = read_pairs(SHAPES / name)
        assert report.formats == {fmt: 3}, name
        seen[name] = [(render_prompt(p.prompt, chat), p.chosen, p.rejected) for p in pairs]
    first = seen["trl_conversational.jsonl"]
    assert all(v == first for v in seen.values()), seen
    assert first[0] == ("[user] Hi\n[assistant] Hello.\n[user] What is 2+2?\n[assistant]", "It is 4.", "It is 5.")


def test_hub_names_with_subset_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefopt.data.io import parse_hub_name

    calls = []

    def fake_load_dataset(name, *args, split, **kwargs):
        calls.append((name, args, kwargs, split))
        return [{"prompt": "p", "chosen": "a", "rejected": "b"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    load_pairs("Anthropic/hh-rlhf:data_dir=harmless-base@test")
    load_pairs("nyu-mll/glue:mrpc")
    load_pairs("HuggingFaceH4/ultrafeedback_binarized@train_prefs", split="ignored")
    assert calls == [("Anthropic/hh-rlhf", (), {"data_dir": "harmless-base"}, "test"),
                     ("nyu-mll/glue", ("mrpc",), {}, "train"),
                     ("HuggingFaceH4/ultrafeedback_binarized", (), {}, "train_prefs")]
    assert parse_hub_name("a/b:c@d") == ("a/b", "c", "d") and parse_hub_name("a/b", "test") == ("a/b", None, "test")
    assert "file not found" in data_error(load_pairs, "a/b/c:d")  # more than one '/' is a path, not a hub name


def test_demonstrations_in_every_shape(tmp_path: Path) -> None:
    from prefopt.data.io import read_demos, read_prompts

    rows = [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
        {"prompt": "q2", "completion": "a2"},
        {"prompt": "q3", "response": "a3"},
        {"prompt": "q4", "chosen": "a4", "rejected": "no"},
        {"question": "q5", "answers": [{"text": "meh", "upvotes": 0}, {"text": "a5", "upvotes": 9, "accepted": True}]},
    ]
    demos, report = read_demos(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(d.prompt, d.response) for d in demos] == [([{"role": "user", "content": "q1"}], "a1"), ("q2", "a2"),
                                                       ("q3", "a3"), ("q4", "a4"), ("q5", "a5")]
    assert set(report.formats) == {"conversational messages", "prompt-completion", "prompt-response",
                                   "pairs (their chosen responses)", "stack-exchange answers (the best one)"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": " "}])
    assert "bad.jsonl:1: the response is empty" in data_error(read_demos, bad)
    # a text corpus: the prompt is cut exactly as the prompts of the same file and seed, the rest is the response
    words = " ".join(f"w{i}" for i in range(80))
    corpus = write_jsonl(tmp_path / "reviews.jsonl", [{"review": f"{words} r{j}"} for j in range(6)])
    demos, report = read_demos(corpus, seed=3, max_words=10)
    prompts, _ = read_prompts(corpus, seed=3)
    assert [d.prompt for d in demos] == [p.prompt for p in prompts]
    for d in demos:
        n = len(d.prompt.split())
        assert d.response == " " + " ".join(f"w{i}" for i in range(n, n + 10)) and d.meta["response_eos"] is False
