"""--overwrite deletes only what optcli wrote: a user's folder is refused untouched, a user's notes inside an
optcli output survive, the recipe is an input, and an interrupted run never blocks the same command."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
from conftest import EXPORT, digits_recipe, run_cli, write_recipe
from test_interrupts import interrupt_when

FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 3, "threads": 1}}
PASSES = [EXPORT]
MARKER = ".optcli-output.json"


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_refusal(result, *words: str) -> None:
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def recipe(digits, tmp_path) -> Path:
    return write_recipe(tmp_path, digits_recipe(digits, PASSES, report=FAST))


@pytest.fixture
def earlier(recipe, tmp_path) -> Path:
    """A finished export run's output folder."""
    out = tmp_path / "out"
    result = run_cli("run", recipe, "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    return out


def test_overwrite_refuses_a_folder_optcli_did_not_write_and_leaves_it_untouched(recipe, tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "mine.txt").write_text("my own work")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = tree(out)
    for flags in (("--overwrite",), (), ("--resume",)):
        result = run_cli("run", recipe, "-o", out, "-q", *flags)
        one_line_refusal(result, str(out), "mine.txt", "did not write", "choose another -o", "remove it yourself")
        assert tree(out) == before and sorted(p.name for p in out.iterdir()) == ["mine.txt", "sub"]


def test_overwrite_replaces_the_earlier_run_but_keeps_the_users_notes(earlier, recipe):
    out = earlier
    (out / "notes.md").write_text("what I learned")
    (out / "report.md").write_text("stale report")
    stale = out / "steps" / "2-quantize"  # a step the new recipe no longer has: optcli's, so it goes
    stale.mkdir()
    (stale / "step.json").write_text("{}")
    refused = run_cli("run", recipe, "-o", out, "-q")
    one_line_refusal(refused, "holds an earlier optcli run", "--overwrite")
    result = run_cli("run", recipe, "-o", out, "-q", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert (out / "notes.md").read_text() == "what I learned"
    assert (out / "report.md").read_text() != "stale report"
    assert not stale.exists() and (out / "steps" / "1-export" / "step.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["output"]["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    wrote = json.loads((out / MARKER).read_text())["wrote"]
    assert "notes.md" not in wrote and {"steps", "model.onnx", "report.json"} <= set(wrote)


def test_output_from_before_the_marker_is_replaced_by_its_known_names_only(earlier, recipe):
    out = earlier
    (out / MARKER).unlink()  # what an optcli from before the marker left: report.json, steps/, the model
    (out / "notes.md").write_text("mine")
    (out / "model.onnx").write_bytes(b"stale")
    one_line_refusal(run_cli("run", recipe, "-o", out, "-q"), "holds an earlier optcli run")
    result = run_cli("run", recipe, "-o", out, "-q", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "model.onnx").read_bytes() != b"stale" and (out / MARKER).is_file()


def test_recipe_inside_the_output_folder_is_never_deleted(digits, tmp_path):
    rdir = tmp_path / "rdir"
    rdir.mkdir()
    path = write_recipe(rdir, digits_recipe(digits, PASSES, report=FAST), name="r.yaml")
    (rdir / "notes.md").write_text("mine")
    before = tree(rdir)
    for flags in (("--overwrite",), ("--resume",), ()):
        result = run_cli("run", path, "-o", rdir, "-q", *flags)
        one_line_refusal(result, str(path), "choose an output folder of its own")
        assert tree(rdir) == before
    # the same once rdir is an optcli output the user later put the recipe in
    out = tmp_path / "out"
    assert run_cli("run", path, "-o", out, "-q").exit_code == 0
    moved = write_recipe(out, digits_recipe(digits, PASSES, report=FAST), name="r.yaml")
    one_line_refusal(run_cli("run", moved, "-o", out, "-q", "--overwrite"), str(moved))
    assert moved.is_file()


@pytest.mark.system
def test_interrupted_run_does_not_block_the_same_command(digits, tmp_path):
    # exporter: auto, as a user's recipe has it: the signal lands during the export, which a 0.1 s one would race
    recipe = write_recipe(tmp_path, digits_recipe(digits, [{"type": "export"}], report=FAST))
    out = tmp_path / "out"
    code, stderr, _ = interrupt_when(["run", recipe, "-o", out], r"1-export: running", signal.SIGINT)
    assert code == 130, stderr
    assert not out.exists() or not any(out.rglob("*")), sorted(map(str, out.rglob("*")))
    again = run_cli("run", recipe, "-o", out, "-q")
    assert again.exit_code == 0, again.stderr
    assert (out / "model.onnx").is_file()


@pytest.mark.parametrize("marked", [True, False], ids=["killed-run", "from-before-the-marker"])
def test_leftovers_of_a_killed_run_count_as_empty(recipe, tmp_path, marked):
    # SIGKILL gives no chance to clean up: the marker, an empty steps/, a step's temp folder stay.
    out = tmp_path / "out"
    (out / "steps" / ".1-export.tmp-999999").mkdir(parents=True)
    if marked:
        (out / MARKER).write_text(json.dumps({"optcli_version": "0", "kind": "run", "wrote": ["steps"]}))
    result = run_cli("run", recipe, "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["1-export"]


def test_junit_written_inside_the_output_folder_goes_with_the_run_it_describes(earlier, recipe):
    out = earlier
    result = run_cli("run", recipe, "-o", out, "-q", "--overwrite", "--junit", out / "junit.xml")
    assert result.exit_code == 0, result.stderr
    assert (out / "junit.xml").is_file()
    again = run_cli("run", recipe, "-o", out, "-q", "--overwrite")  # a stale junit.xml would tell CI of the old run
    assert again.exit_code == 0, again.stderr
    assert not (out / "junit.xml").exists()


SWEEP = ["--grid", "passes.0.opset=17,18"]


def test_sweep_overwrite_keeps_user_files_and_refuses_a_folder_optcli_did_not_write(recipe, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mine.txt").write_text("mine")
    refused = run_cli("sweep", recipe, "-o", mine, *SWEEP, "-q", "--overwrite")
    one_line_refusal(refused, "mine.txt", "did not write", "choose another -o")
    assert [p.name for p in mine.iterdir()] == ["mine.txt"]
    out = tmp_path / "sweep"
    first = run_cli("sweep", recipe, "-o", out, *SWEEP, "-q")
    assert first.exit_code == 0, first.stderr
    variants = [r["folder"] for r in json.loads((out / "sweep.json").read_text())["variants"]]
    (out / "notes.md").write_text("sweep notes")
    (out / variants[0] / "notes.md").write_text("variant notes")
    (out / "sweep.md").write_text("stale")
    one_line_refusal(run_cli("sweep", recipe, "-o", out, *SWEEP, "-q"), "--overwrite")
    again = run_cli("sweep", recipe, "-o", out, *SWEEP, "-q", "--overwrite")
    assert again.exit_code == 0, again.stderr
    assert (out / "notes.md").read_text() == "sweep notes"
    assert (out / variants[0] / "notes.md").read_text() == "variant notes"
    assert (out / "sweep.md").read_text() != "stale"
    assert all((out / v / "report.json").is_file() for v in variants)


# --------------------------------------------------------------------------- the decision, on made-up folders


def make(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_overwrite_removes_the_listed_names_and_optcli_step_folders_only(tmp_path):
    from optcli import owned

    make(
        tmp_path,
        {
            MARKER: json.dumps({"optcli_version": "0", "kind": "run", "wrote": ["steps", "model.onnx", "report.json"]}),
            "steps/1-export/step.json": "{}",
            "steps/.2-quantize.tmp-123/model.onnx": "",
            "steps/README.txt": "mine, in optcli's steps/",
            "model.onnx": "",
            ".report.json.abc123.tmp": "",  # an atomic write a killed run left
            "notes.md": "mine",
            "report.md": "not listed: kept",
        },
    )
    assert owned.foreign(tmp_path) == ["notes.md", "report.md"] and owned.holds_results(tmp_path)
    owned.remove_owned(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [MARKER, "notes.md", "report.md", "steps", "steps/README.txt"]
    assert not owned.holds_results(tmp_path)


def test_output_from_before_the_marker_owns_the_artifact_its_report_names(tmp_path):
    from optcli import owned

    report = {"optcli_version": "0.1", "output": {"path": "/elsewhere/out/model.pt2"}}
    make(tmp_path, {"report.json": json.dumps(report), "report.md": "", "model.pt2": "", "model.onnx": "", "a.txt": ""})
    assert owned.is_output(tmp_path) and owned.foreign(tmp_path) == ["a.txt", "model.onnx"]
    owned.remove_owned(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "model.onnx"]
    not_optcli = tmp_path / "other"
    make(not_optcli, {"report.json": json.dumps({"title": "my report"})})
    assert not owned.is_output(not_optcli) and owned.foreign(not_optcli) == ["report.json"]
