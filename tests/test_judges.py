"""Tests for gold judges (prefopt.data.judges); the hub pipeline is faked, never downloaded."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest

from prefopt.data import JUDGES, CharFrequencyJudge, FunctionJudge, Judge, PipelineJudge, VaderJudge, load_judge


def test_vader_scores_sentiment_of_the_response() -> None:
    judge = VaderJudge()
    assert isinstance(judge, Judge) and judge.name == "vader"
    positive, neutral, negative = judge.score(
        ["Review:"] * 3,
        [
            "A wonderful, moving film. I loved every minute of it!",
            "The film is ninety minutes long.",
            "A dull, awful mess. I hated it and want my money back.",
        ],
    )
    assert positive > 0.5 and negative < -0.5 and abs(neutral) < 0.1
    assert all(-1.0 <= s <= 1.0 for s in (positive, neutral, negative))


def test_vader_ignores_the_prompt() -> None:
    judge = VaderJudge()
    response = "It was a delightful surprise."
    [with_bad_prompt, with_good_prompt] = judge.score(
        ["This terrible, horrible, disgusting movie", "This brilliant, joyful masterpiece"], [response] * 2
    )
    assert with_bad_prompt == with_good_prompt > 0


def test_judge_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        VaderJudge().score(["a", "b"], ["x"])


def test_function_judge_passes_through_and_validates() -> None:
    seen = []

    def length_score(prompts: list[str], responses: list[str]) -> list[int]:
        seen.append((prompts, responses))
        return [len(r) for r in responses]

    judge = FunctionJudge(length_score)
    assert judge.score(("p1", "p2"), ("abc", "de")) == [3.0, 2.0]
    assert seen == [(["p1", "p2"], ["abc", "de"])]
    assert judge.name.endswith("length_score") and judge.name.startswith("py:")

    too_few = FunctionJudge(lambda p, r: [1.0], name="short")
    with pytest.raises(ValueError, match="judge 'short' returned 1 scores for 2 responses"):
        too_few.score(["a", "b"], ["x", "y"])
    for bad in (math.nan, math.inf, "0.5", None):
        with pytest.raises(ValueError, match="judge 'bad'"):
            FunctionJudge(lambda p, r, v=bad: [0.0, v], name="bad").score(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="must return a list"):
        FunctionJudge(lambda p, r: 1.0, name="scalar").score(["a"], ["x"])


def test_load_judge_vader_and_python_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(load_judge("vader"), VaderJudge) and "vader" in JUDGES
    (tmp_path / "prefopt_test_judge_mod.py").write_text(
        "def exclaim(prompts, responses):\n    return [r.count('!') for r in responses]\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = load_judge("py:prefopt_test_judge_mod:exclaim")
    assert judge.name == "py:prefopt_test_judge_mod:exclaim"
    assert judge.score(["p", "p"], ["hi!!", "hi"]) == [2.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nope", "unknown judge 'nope': use 'vader', 'chars', 'chars:<set>', 'hf:<model id or path>' or 'py:module.path:function'"),
        ("chars:", "needs at least one character"),
        ("hf:", "unknown judge"),
        ("py:justamodule", "must look like 'py:module.path:function'"),
        ("py:prefopt_no_such_module_xyz:f", "could not import judge module 'prefopt_no_such_module_xyz'"),
        ("py:math:no_such_function", "module 'math' has no function 'no_such_function'"),
        ("py:math:pi", "has no function 'pi'"),
    ],
)
def test_load_judge_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError) as info:
        load_judge(spec)
    assert match in str(info.value) and "\n" not in str(info.value)


class FakePipeline:
    """Stands in for a transformers text-classification pipeline."""

    def __init__(self, labels: tuple[str, str] = ("NEGATIVE", "POSITIVE")) -> None:
        self.labels = labels
        self.calls: list[tuple[list[str], dict]] = []

    def __call__(self, texts: list[str], **kwargs) -> list[list[dict]]:
        self.calls.append((texts, kwargs))
        out = []
        for text in texts:
            p = 0.9 if "good" in text else 0.25
            out.append([{"label": self.labels[1], "score": p}, {"label": self.labels[0], "score": 1 - p}])
        return out


def fake_transformers(monkeypatch: pytest.MonkeyPatch, make_pipeline) -> list:
    created = []

    def pipeline(task: str, **kwargs):
        created.append((task, kwargs))
        return make_pipeline()

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(pipeline=pipeline))
    return created


def test_pipeline_judge_maps_positive_probability(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePipeline()
    created = fake_transformers(monkeypatch, lambda: fake)
    judge = load_judge("hf:some/sentiment-model")
    assert isinstance(judge, PipelineJudge) and judge.name == "hf:some/sentiment-model"
    assert created[0][0] == "text-classification" and created[0][1]["model"] == "some/sentiment-model"
    scores = judge.score(["prompt is ignored", "x"], ["good film", "meh"])
    assert scores == pytest.approx([0.8, -0.5])
    texts, kwargs = fake.calls[0]
    assert texts == ["good film", "meh"]
    assert "top_k" in kwargs and kwargs["top_k"] is None and kwargs["truncation"] is True
    assert judge.score([], []) == []


def test_pipeline_judge_custom_and_missing_positive_label(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_transformers(monkeypatch, lambda: FakePipeline(labels=("LABEL_0", "LABEL_1")))
    judge = PipelineJudge("m", positive_label="LABEL_1")
    assert judge.score(["p"], ["good"]) == pytest.approx([0.8])
    with pytest.raises(ValueError, match="no label 'POSITIVE' \\(labels: LABEL_1, LABEL_0\\)"):
        PipelineJudge("m").score(["p"], ["good"])


def test_pipeline_judge_load_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail():
        raise OSError("We couldn't connect to 'https://huggingface.co'\nto load this file")

    fake_transformers(monkeypatch, fail)
    with pytest.raises(ValueError) as info:
        load_judge("hf:org/model")
    message = str(info.value)
    assert message.startswith("could not load judge model 'org/model' (OSError: We couldn't connect")
    assert message.endswith("needs internet or a local path") and "\n" not in message


def test_char_frequency_judge_hand_computed() -> None:
    judge = load_judge("chars")
    assert isinstance(judge, CharFrequencyJudge) and judge.name == "chars"
    assert judge.score(["p", "p", "p"], ["aeb", "", "xyz"]) == [pytest.approx(2 / 3), 0.0, 0.0]
    letters = load_judge("chars:xyz")
    assert letters.name == "chars:xyz" and letters.score(["p"], ["xxa"]) == [pytest.approx(2 / 3)]
