"""The config surface: files (YAML/TOML/JSON), --set overrides coerced by type, one validation pass, every field
reachable and documented, policies as data."""

import json
from pathlib import Path

import pytest

from prefopt import config as C
from prefopt.errors import ConfigError
from prefopt.pipeline.config import BenchConfig, config_dict, load_config, preset


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(("text", "tp", "expected"), [
    ("3", int, 3), ("-2", int, -2), ("0.5", float, 0.5), ("1e-3", float, 1e-3), ("true", bool, True),
    ("no", bool, False), ("none", int | None, None), ("7", int | None, 7), ("2-8", tuple[int, int], (2, 8)),
    ("[2, 8]", tuple[int, int], (2, 8)), ("2,8", tuple[int, int] | None, (2, 8)), ("all-linear", str | list[str], "all-linear"),
    ('["q_proj", "v_proj"]', str | list[str], ["q_proj", "v_proj"]), ('{"a": 1}', dict[str, int], {"a": 1}),
])
def test_coerce_text_by_type(text, tp, expected):
    assert C.coerce(text, tp, where="--set", path="x") == expected


@pytest.mark.parametrize(("value", "tp"), [("abc", float), ("1.5", int), ("maybe", bool), (True, int), ("nan", float),
                                           (3, str), ("1,2,3", tuple[int, int])])
def test_coerce_rejects_with_the_field_path(value, tp):
    msg = one_line_error(C.coerce, value, tp, where="--set a.b=..", path="a.b")
    assert "a.b" in msg and "expects" in msg


def test_set_overrides_reach_sections_and_policies():
    cfg = load_config("default", None, ("dpo.beta=0.05", "ppo.kl_estimator=k1", "data.prefix_words=2-8",
                                        "policies.ipo.backend=dpo", "ipo.loss_type=ipo", "seed=4"))
    assert cfg.dpo.beta == 0.05 and cfg.data.prefix_words == (2, 8)
    pols = cfg.resolved_policies()
    assert set(pols) == {"ppo", "dpo", "ipo"}
    assert pols["ipo"].config.loss_type == "ipo" and pols["ipo"].config.beta == 0.05  # section default + own field
    assert pols["dpo"].config.loss_type == "sigmoid"
    assert all(p.config.seed == 4 for p in pols.values())  # the master seed reaches every policy


def test_policy_selection_and_errors():
    assert set(load_config("default", None, ("policies=dpo",)).policies) == {"dpo"}
    assert load_config("default", None, ("policies=dpo,ppo",)).policies == {"dpo": {"backend": "dpo"}, "ppo": {"backend": "ppo"}}
    assert "neither a policy" in one_line_error(load_config, "default", None, ("policies=grpo",))
    assert "has no backend" in one_line_error(load_config, "default", None, ("policies.x1.beta=0.1",))
    assert "not one of" in one_line_error(load_config, "default", None, ('policies={"a1": {"backend": "rlhf"}}',))
    msg = one_line_error(load_config, "default", None, ('policies={"reference": {"backend": "dpo"}}',))
    assert "policy name" in msg


@pytest.mark.parametrize(("override", "expected"), [
    ("ppo.klcoef=1", "did you mean 'ppo.kl_coef'"),
    ("ppo.kl_coef=abc", "field 'ppo.kl_coef' expects float"),
    ("data.k=1", "data.k must be >= 2"),
    ("ppo.mini_batch_size=64", "mini_batch_size"),
    ("dpo.beta", "expected FIELD=VALUE"),
    ("nosuch.x=1", "unknown field 'nosuch'"),
    ("model.x=1", "is a single value"),
])
def test_bad_overrides_are_one_line(override, expected):
    assert expected in one_line_error(load_config, "default", None, (override,))


def test_config_files_yaml_toml_json(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("preset: smoke\nseed: 2\ndpo:\n  beta: 0.2\npolicies:\n  ipo: {backend: dpo, loss_type: ipo}\n")
    (tmp_path / "c.toml").write_text('seed = 2\n[dpo]\nbeta = 0.2\n[policies.ipo]\nbackend = "dpo"\nloss_type = "ipo"\n')
    (tmp_path / "c.json").write_text(json.dumps({"seed": 2, "dpo": {"beta": 0.2}, "policies": {"ipo": {"backend": "dpo", "loss_type": "ipo"}}}))
    for name in ("c.yaml", "c.toml", "c.json"):
        cfg = load_config("default", str(tmp_path / name))
        assert cfg.seed == 2 and cfg.dpo.beta == 0.2
        assert set(cfg.policies) == {"ipo"}  # a file's policies replace the preset's
    assert load_config("default", str(tmp_path / "c.yaml")).model == "tiny"  # `preset:` inside the file


def test_config_file_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ndpo: [unclosed\n")
    assert "bad.yaml:" in one_line_error(load_config, "default", str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"dpo": {"betta": 1}}')
    msg = one_line_error(load_config, "default", str(wrong))
    assert "wrong.json" in msg and "did you mean 'dpo.beta'" in msg
    assert "unsupported" in one_line_error(load_config, "default", str(tmp_path / "c.ini"))
    assert "not found" in one_line_error(load_config, "default", str(tmp_path / "nope.yaml"))


def test_every_field_is_reachable_and_documented(tmp_path: Path):
    """Walk every leaf field of the default config: each has help text, each can be set by --set to its value
    (and to the value of the smoke preset where it differs), and the JSON form round-trips through --config."""
    base = preset("default")
    smoke = {d.path: d.value for d in C.walk(preset("smoke"))}
    docs = list(C.walk(base))
    assert len(docs) > 80
    for doc in docs:
        assert doc.help, f"{doc.path} has no help text"
        if doc.path == "policies":
            continue
        for value in {json.dumps(doc.value), json.dumps(smoke.get(doc.path, doc.value))}:
            raw = json.loads(value)
            text = raw if isinstance(raw, str) else ("none" if raw is None else value)
            if isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, int) for x in raw):
                text = f"{raw[0]}-{raw[1]}"
            cfg = load_config("default", None, (f"{doc.path}={text}",))
            got = {d.path: d.value for d in C.walk(cfg)}[doc.path]
            assert got == raw, (doc.path, got, raw)
    path = tmp_path / "full.json"
    path.write_text(json.dumps(C.to_dict(base)))
    assert load_config("default", str(path)) == base


def test_config_dict_keeps_layers_in_order(tmp_path: Path):
    (tmp_path / "c.json").write_text(json.dumps({"dpo": {"beta": 0.3}}))
    data = config_dict("smoke", str(tmp_path / "c.json"), ("dpo.beta=0.4",))
    assert data["dpo"]["beta"] == 0.4 and data["model"] == "tiny"
    assert isinstance(C.build(BenchConfig, data), BenchConfig)


def test_annotator_pool_from_set_and_file(tmp_path):
    from prefopt.data.synthetic import AnnotatorConfig

    cfg = load_config("smoke", None, ('data.annotators=[{"flip_rate": 0.2}, {"position_bias": 0.5}]',))
    assert cfg.data.annotators == [AnnotatorConfig(flip_rate=0.2), AnnotatorConfig(position_bias=0.5)]
    f = tmp_path / "c.yaml"
    f.write_text("preset: smoke\ndata:\n  annotators:\n    - {temperature: 0.05}\n    - {length_bias: 1.0}\n")
    assert [a.temperature for a in load_config("smoke", str(f)).data.annotators] == [0.05, 0.1]
    with pytest.raises(ConfigError, match=r"data.annotators=.*flip_rate must be in \[0, 0.5\]"):
        load_config("smoke", None, ('data.annotators=[{"flip_rate": 0.9}]',))
