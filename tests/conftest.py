"""Shared fixtures: a small digits CNN in every format, built once per test run, the tiers' markers, and a CLI
driver. The helper modules beside this file (models.py, hf_models.py, ...) import the same way from every tier: pytest
puts this folder on sys.path for its conftest."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from optcli.cli import app

# One torch (OpenMP) thread per test process: the tests' models are tiny, and with `-n 2` on two cores each worker's
# second thread only spins against the other worker (a fine-tune ran 4x slower in wall time, 5x in CPU time). Set
# before any test module imports torch; the CLI children the tests start inherit it. A value set outside wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def fingerprint(folder: Path) -> str:
    """Names and bytes of every file under the folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def shared_folder(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built once for the whole test run and read by every test.

    Under pytest-xdist each worker's temp folder sits in one parent (pytest-N/popen-gwK): the first worker to take
    the lock builds the folder there, the others wait on the lock and reuse it. Without xdist it is built in this
    session's temp folder. A test that must write there copies the folder first (see `kept_read_only`)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the build raises
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a build that raised left behind
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@contextmanager
def kept_read_only(folder: Path, name: str):
    """Fail the run's last user of a shared folder if a test wrote into it (other tests read the same bytes)."""
    before = fingerprint(folder)
    yield folder
    assert fingerprint(folder) == before, (
        f"a test wrote into the shared {name} folder {folder}: copy it first (shutil.copytree) and write in the copy"
    )


def build_digits(folder: Path) -> None:
    """build/example equivalent: digits_cnn.{pt,pt2,ts.pt,onnx} + train/calib/test npz (width 16, seconds)."""
    from optcli.examples.digits import make_example

    info = make_example(folder, width=16, epochs=6)
    (folder / "accuracy.txt").write_text(str(info["test_accuracy"]))


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Iterator[Path]:
    """The digits CNN in every format with its data, built once per run (shared by the xdist workers); read-only."""
    with kept_read_only(shared_folder(tmp_path_factory, "digits", build_digits), "digits") as folder:
        yield folder


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# The runner's own tests (resume, interrupts, sweeps, progress, CI output) export with TorchScript alone: ~0.1 s
# against ~2 s for exporter: auto, which also traces with torch.export and compares the graphs. What they check does
# not depend on the exporter; both exporters and the choice between them are tested in tests/e2e/passes/export.
EXPORT = {"type": "export", "exporter": "torchscript"}


def allow_slower(passes: list[dict]) -> list[dict]:
    """allow_slower: true on the int8 quantize passes of a test that is not about speed: on the suite's tiny models
    int8 kernels can be slower than fp32, which the default speed gate rightly fails. Weight-only passes have no
    speed gate and refuse the key."""
    return [
        {**p, "allow_slower": True}
        if p.get("type") == "quantize" and "weights" not in p and "allow_slower" not in p
        else p
        for p in passes
    ]


def digits_recipe(digits: Path, passes: list[dict], speed_gate: bool = False, **extra) -> dict:
    """A recipe on the suite's digits CNN. Its width-16 net is so small that static int8 runs ~1.15x slower than fp32
    at batch 1 and dynamic int8 ~2x: the default speed gate rightly fails those runs. A test about something else
    gets allow_slower: true on its int8 quantize passes; speed_gate=True keeps the gate (the speed tests)."""
    if not speed_gate:
        passes = allow_slower(passes)
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
