import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coordexp.core.config import ConfigError, Params, load_params, validate_params

ROOT = Path(__file__).resolve().parents[1]


def _raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_are_valid_and_spec_defaults():
    p = load_params(ROOT / "params.yaml")
    spec = Params().train.coord_soft_ce_w1  # the schema's defaults are the spec's
    assert (spec.enabled, spec.soft_ce_weight, spec.w1_weight, spec.gate_weight) == (True, 1.0, 1.0, 1.0)
    assert (spec.temperature, spec.target_sigma, spec.target_truncate) == (1.0, 2.0, 16)
    assert (spec.text_gate_weight, spec.coord_ce_weight) == (0.0, 0.0)  # the optional terms are off: the spec's loss
    # the embedded default departs from the spec's weights on purpose (params.yaml says why)
    c = p.train.coord_soft_ce_w1
    assert (c.enabled, c.soft_ce_weight, c.w1_weight, c.gate_weight) == (True, 0.2, 2.0, 0.5)
    # and trains on two CPU processes of batch 4 (a global batch of 8), where the schema's default is one
    # process of 8, which runs anywhere
    assert (p.train.nproc_per_node, p.train.per_device_train_batch_size) == (2, 4)
    assert Params().train.nproc_per_node * Params().train.per_device_train_batch_size == 8
    # and moves the warmed-up vision tower 10x slower, where the schema's default (for real checkpoints
    # too) is one learning rate for the whole model
    assert (p.train.vit_lr, Params().train.vit_lr) == (1e-4, None)
    # otherwise the file spells out every default the schema has: nothing hidden
    p.train.coord_soft_ce_w1 = spec
    p.train.nproc_per_node, p.train.per_device_train_batch_size = 1, 8
    p.train.vit_lr = None
    assert p == Params()


def test_every_field_is_documented():
    def walk(model):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)
            assert f.description, f"{model.__name__}.{name} has no docstring"

    walk(Params)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["train"].__setitem__("coord_loss", {"l1": 1.0}), "train.coord_loss: the legacy"),
        (lambda r: r.__setitem__("coord_loss", {}), "coord_loss: the legacy"),
        (lambda r: r["train"]["coord_soft_ce_w1"].__setitem__("w1_weigth", 1), "did you mean 'w1_weight'"),
        (
            lambda r: r["train"]["coord_soft_ce_w1"].__setitem__("temperature", 0),
            "temperature: Input should be greater than 0",
        ),
        (
            lambda r: r["train"]["coord_soft_ce_w1"].__setitem__("target_sigma", -1),
            "target_sigma: Input should be greater than 0",
        ),
        (
            lambda r: r["train"]["coord_soft_ce_w1"].__setitem__("gate_weight", -0.5),
            "gate_weight: Input should be greater than or equal to 0",
        ),
        (
            lambda r: r["train"]["coord_soft_ce_w1"].__setitem__("text_gate_weight", -0.1),
            "text_gate_weight: Input should be greater than or equal to 0",
        ),
        (
            lambda r: r["train"]["coord_soft_ce_w1"].__setitem__("coord_ce_weight", -1),
            "coord_ce_weight: Input should be greater than or equal to 0",
        ),
        (
            lambda r: r["train"]["coord_soft_ce_w1"].__setitem__("text_gate_weigth", 0.5),
            "did you mean 'text_gate_weight'",
        ),
        (
            lambda r: r["train"]["coord_soft_ce_w1"].__setitem__("hard_ce_weight", 0.5),
            "hard_ce_weight: unknown key",
        ),
        (
            lambda r: r["train"]["coord_soft_ce_w1"].__setitem__("target_truncate", 1000),
            "target_truncate: Input should be less than or equal to 999",
        ),
        (lambda r: r["train"].__setitem__("max_steps", "many"), "train.max_steps: Input should be a valid integer"),
        (
            lambda r: r["preprocess"].__setitem__("object_ordering", "area"),
            "preprocess.object_ordering: Input should be 'sorted' or 'random'",
        ),
        (lambda r: r.__setitem__("trian", {}), "trian: unknown key; did you mean 'train'?"),
        (lambda r: r["preprocess"]["splits"].pop("val"), "splits must define ['val']"),
        (lambda r: r["build_base"].__setitem__("mode", "expand"), "expand.source is not set"),
    ],
)
def test_errors_name_the_key(mutate, expected):
    raw = _raw()
    mutate(raw)
    with pytest.raises(ConfigError) as exc:
        validate_params(raw)
    assert expected in str(exc.value)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        validate_params([1, 2])
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:\d+:\d+: not valid YAML"):
        load_params(f)
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")


def test_check_config_command(tmp_path):
    exe = Path(sys.executable).parent / "coordexp"
    ok = subprocess.run([exe, "check-config", str(ROOT / "params.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok"
    raw = _raw()
    raw["train"]["coord_loss"] = {"enabled": True}
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    res = subprocess.run([exe, "check-config", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "train.coord_loss" in res.stderr and "train.coord_soft_ce_w1" in res.stderr


def _departures_block() -> dict[str, object]:
    """``key: value`` of the commented "Departures" block at the top of params.yaml."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Departures of the embedded default"))
    found = {}
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            if found:
                break
            continue
        key, _, rest = line[4:].partition(":")
        found[key.strip()] = yaml.safe_load(rest.split()[0])
    return found


def test_departures_block_lists_exactly_what_differs_from_the_schema():
    from coordexp.pipeline.tracking import flatten

    schema = flatten(Params().model_dump(mode="json"))
    repo = flatten(load_params(ROOT / "params.yaml").model_dump(mode="json"))
    differs = {k: repo[k] for k in schema if repo[k] != schema[k]}
    assert differs == _departures_block()
    # every knob of the schema is spelled out in the file, so a user sees each one where they edit
    assert set(flatten(_raw())) >= set(schema) - {k for k in schema if k.startswith("preprocess.splits.")}
