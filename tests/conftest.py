"""Shared fixtures: a small digits CNN in every format, built once per test session, the tiers' markers, and a CLI
driver. The helper modules beside this file (models.py, hf_models.py, ...) import the same way from every tier: pytest
puts this folder on sys.path for its conftest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from optcli.cli import app

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TIERS = ("unit", "e2e")  # tests/<tier>/...: each test gets its tier's marker (pytest -m unit, or pytest tests/unit)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.is_relative_to(TESTS) and item.path.relative_to(TESTS).parts[0] in TIERS:
            item.add_marker(item.path.relative_to(TESTS).parts[0])


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def run_cli(*args: str, cwd: Path | None = None) -> CliResult:
    """Run optcli in-process the way a user would type it (exit code, stdout, stderr kept apart)."""
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)
    return CliResult(result.exit_code, result.stdout, result.stderr)


def run_subprocess(*args: str, cwd: Path | None = None, timeout: int = 300) -> CliResult:
    """Run `python -m optcli` in a child process (true stdout/stderr, signals, start-up cost)."""
    proc = subprocess.run(
        [sys.executable, "-m", "optcli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """build/example equivalent: digits_cnn.{pt,pt2,ts.pt,onnx} + train/calib/test npz (width 16, seconds)."""
    from optcli.examples.digits import make_example

    folder = tmp_path_factory.mktemp("digits")
    info = make_example(folder, width=16, epochs=6)
    (folder / "accuracy.txt").write_text(str(info["test_accuracy"]))
    return folder


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def digits_recipe(digits: Path, passes: list[dict], **extra) -> dict:
    recipe = {
        "model": {
            "path": str(digits / "digits_cnn.pt"),
            "factory": "optcli.examples.digits:build_cnn",
            "factory_kwargs": {"width": 16},
            "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}],
        },
        "data": {
            "calibration": {"path": str(digits / "digits_calib.npz"), "samples": 128},
            "eval": {"path": str(digits / "digits_test.npz"), "labels": "y"},
        },
        "passes": passes,
        "report": {"latency": {"batch_sizes": [1, 8], "warmup": 1, "runs": 5, "threads": 1}},
    }
    for key, value in extra.items():
        recipe[key] = value
    return recipe
