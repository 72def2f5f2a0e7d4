"""The stage runner: a user's error is one line and exit 2; a bug keeps its traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coordexp.core.checkpoint import CheckpointError
from coordexp.core.contract import ContractError
from coordexp.core.errors import MissingInputError, UserError
from coordexp.pipeline.runner import stage_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("COORDEXP_ROOT", str(tmp_path))
    monkeypatch.delenv("COORDEXP_DEBUG", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "error",
    [
        UserError("bad thing at x.jsonl:3"),
        ContractError("x.jsonl:3: objects.0: no geometry"),
        CheckpointError("no config.json"),
        MissingInputError("run dvc repro preprocess"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(project, capsys, error):
    def fail(params, root):
        raise error

    with pytest.raises(SystemExit) as exit_:
        stage_main("demo")(fail)()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: [demo] {error}\n"


@pytest.mark.parametrize(
    "error", [ValueError("a bug in numpy land"), FileNotFoundError("/tmp/x"), RuntimeError("shape mismatch")]
)
def test_anything_else_keeps_its_traceback(project, error):
    def fail(params, root):
        raise error

    with pytest.raises(type(error)) as raised:
        stage_main("demo")(fail)()
    assert raised.value is error


def test_the_params_are_validated_before_the_stage_runs(project, capsys):
    (project / "params.yaml").write_text("train:\n  max_stepz: 3\n")
    ran = []
    with pytest.raises(SystemExit):
        stage_main("demo")(lambda params, root: ran.append(1))()
    assert not ran and "max_stepz" in capsys.readouterr().err
