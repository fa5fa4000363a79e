"""The typed config loader: unknown keys, choices, env vars, overrides, and every shipped config file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from configlib import (
    ConfigError,
    apply_overrides,
    from_mapping,
    require_resolved,
    save_resolved,
)
from dreamteacher.schema import PipelineConfig, load_pipeline
from sources.datasets import DatasetConfig, ensure_available

REPO = Path(__file__).resolve().parents[1]


@dataclass(kw_only=True)
class Inner:
    size: int
    kind: Literal["a", "b"] = "a"


@dataclass(kw_only=True)
class Outer:
    name: str
    inner: Inner
    items: dict[str, Inner] = field(default_factory=dict)
    ratio: float = 1.0
    pair: tuple[float, float] = (0.0, 1.0)


def test_builds_nested_dataclasses_and_coerces_ints_to_float() -> None:
    cfg = from_mapping(
        Outer, {"name": "x", "inner": {"size": 3}, "items": {"k": {"size": 1, "kind": "b"}}, "ratio": 2}
    )
    assert cfg == Outer(name="x", inner=Inner(size=3), items={"k": Inner(size=1, kind="b")}, ratio=2.0)
    assert isinstance(cfg.ratio, float)
    assert from_mapping(Outer, {"name": "x", "inner": {"size": 1}, "pair": [0.5, 2]}).pair == (0.5, 2.0)


def test_reports_every_problem_with_key_paths_and_choices() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(Outer, {"name": 3, "inner": {"size": "big", "kind": "c", "colour": 1}, "extra": True})
    message = str(info.value)
    assert "5 problem(s)" in message
    assert "name: expected a string" in message
    assert "inner.size: expected an integer" in message
    assert "inner.kind: 'c' is not one of 'a', 'b'" in message
    assert "unknown key 'inner.colour'; valid keys here: kind, size" in message
    assert "unknown key 'extra'" in message


def test_missing_required_key_is_named() -> None:
    with pytest.raises(ConfigError, match="missing required key 'inner.size'"):
        from_mapping(Outer, {"name": "x", "inner": {}})


def test_booleans_are_not_integers() -> None:
    with pytest.raises(ConfigError, match="expected an integer"):
        from_mapping(Inner, {"size": True})


def test_overrides_parse_yaml_values_and_create_paths() -> None:
    data = {"a": {"b": 1}}
    apply_overrides(data, ["a.b=2", "a.c=[1, 2]", "d.e=hello", "f=true"])
    assert data == {"a": {"b": 2, "c": [1, 2]}, "d": {"e": "hello"}, "f": True}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(data, ["novalue"])
    with pytest.raises(ConfigError, match="'a.b' is not a mapping"):
        apply_overrides(data, ["a.b.c=1"])


def test_env_vars_expand_and_unset_ones_fail_only_when_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DT_TEST_ROOT", "/data/x")
    monkeypatch.delenv("DT_TEST_UNSET", raising=False)
    cfg = from_mapping(DatasetConfig, {"root": "${DT_TEST_ROOT}/train", "layout": "folder"})
    assert cfg.root == "/data/x/train"
    lazy = from_mapping(DatasetConfig, {"root": "${DT_TEST_UNSET}", "layout": "folder"})
    assert lazy.root == "${DT_TEST_UNSET}"
    with pytest.raises(ConfigError, match=r"DT_TEST_UNSET is not set.*export DT_TEST_UNSET="):
        require_resolved(lazy.root, "datasets.x.root")
    with pytest.raises(ConfigError, match="DT_TEST_UNSET is not set"):
        ensure_available("x", lazy)
    defaulted = from_mapping(DatasetConfig, {"root": "${DT_TEST_UNSET:-fallback}", "layout": "folder"})
    assert defaulted.root == "fallback"


def test_missing_dataset_root_names_the_key(tmp_path: Path) -> None:
    cfg = DatasetConfig(root=str(tmp_path / "nope"), layout="imagefolder")
    with pytest.raises(ConfigError, match=r"datasets\.mine\.root"):
        ensure_available("mine", cfg)


def test_shipped_pipeline_yaml_loads_and_every_section_is_typed() -> None:
    cfg = load_pipeline(REPO / "pipeline.yaml")
    assert isinstance(cfg, PipelineConfig)
    for name, dataset in cfg.datasets.items():
        if dataset.teacher:
            assert dataset.teacher in cfg.teachers, f"datasets.{name}.teacher names an unknown teacher"
    assert cfg.dataset(cfg.encode.data) is not None
    with pytest.raises(ConfigError, match="unknown dataset 'nope'; datasets in the config: .*imagenet"):
        cfg.dataset("nope")


SHIPPED_CONFIGS = [
    "pipeline.yaml"
]  # the recipe files in configs/ have their own schema: tests/test_recipes.py


@pytest.mark.parametrize("path", SHIPPED_CONFIGS)
def test_every_shipped_config_file_loads(path: str) -> None:
    load_pipeline(REPO / path)


def test_unknown_key_in_pipeline_yaml_is_rejected_with_its_path() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'encode\.tt'"):
        load_pipeline(REPO / "pipeline.yaml", ["encode.tt=150"])


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_pipeline(REPO / "pipeline.yaml", ["encode.t=150"])
    written = save_resolved(cfg, tmp_path)
    reloaded = from_mapping(PipelineConfig, yaml.safe_load(written.read_text()))
    assert reloaded == cfg
    assert not list(tmp_path.glob("*.tmp"))


# ---- values the types admit but the stages cannot use -------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("encode.draws=0", "encode.draws must be >= 1, got 0"),
        ("encode.batch_size=0", "encode.batch_size must be >= 1, got 0"),
        ("encode.t=-1", "encode.t must be >= 0 (0 = the dataset's t), got -1"),
        ("encode.ddim_steps=0", "encode.ddim_steps must be >= 1, got 0"),
        ("encode.num_workers=-2", "encode.num_workers must be >= 0, got -2"),
    ],
)
def test_encode_ranges_are_config_errors_naming_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline(REPO / "pipeline.yaml", [override])
    assert expected in str(info.value)


def test_every_range_problem_is_reported_once_with_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline(REPO / "pipeline.yaml", ["encode.draws=0", "encode.retries=-1"])
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "  - encode.draws must be >= 1" in message and "  - encode.retries must be >= 0" in message


def test_a_type_error_is_not_followed_by_a_range_check_crash() -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline(REPO / "pipeline.yaml", ["encode.draws=two"])
    message = str(info.value)
    assert "encode.draws: expected an integer, got 'two'" in message
    assert "not supported between" not in message and "problem(s)" not in message  # exactly one problem


@pytest.mark.parametrize(("raw", "shown"), [("yes", "true"), ("off", "false"), ("true", "true")])
def test_yaml_booleans_for_string_choices_get_a_clear_message(raw: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline(REPO / "pipeline.yaml", [f"encode.flips={raw}"])
    message = str(info.value)
    assert f"encode.flips: got the YAML boolean {shown}" in message
    assert "booleans in YAML" in message and "'none', 'both'" in message and "quotes" in message
    assert "True is not one of" not in message


def test_yaml_booleans_elsewhere() -> None:
    @dataclass(kw_only=True)
    class Switch:
        state: Literal["on", "off"] = "on"
        level: Literal[1, 2] = 1
        name: str = ""

    # quoted, the words are strings and valid choices
    assert from_mapping(Switch, yaml.safe_load("state: 'off'")).state == "off"
    with pytest.raises(ConfigError) as info:
        from_mapping(Switch, yaml.safe_load("state: off\nlevel: true\nname: no"))
    message = str(info.value)
    assert "state: got the YAML boolean false" in message and "'on', 'off', in quotes" in message
    assert "level: got the YAML boolean true" in message  # True == 1 must not pass as the choice 1
    assert "name: got the YAML boolean false" in message and "write a string" in message
