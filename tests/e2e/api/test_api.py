"""The Python API: `from optcli import run, validate, sweep` does what the CLI does and returns typed reports;
errors carry the CLI's exit codes; `import optcli` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import EXPORT, digits_recipe, run_cli, write_recipe

FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 3, "threads": 1}}
PASSES = [EXPORT, {"type": "quantize", "mode": "dynamic"}]

# Measured afresh by each run: everything else in two runs of the same recipe is the same.
MEASURED = {
    "seconds",
    "latency",
    "environment",
    "vs_previous",
    "vs_baseline",
    "summary",
    "speed",  # the side-by-side time ratios: timings too
    "exporters_ms",
    "exporter_choice",
}  # timing-derived


def same_but_timings(a, b, path="report"):
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in MEASURED:
                same_but_timings(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_but_timings(x, y, f"{path}[{i}]")
    elif isinstance(a, str) and isinstance(b, str) and ("/api/" in a or "/cli/" in a):
        assert a.replace("/api/", "/x/") == b.replace("/cli/", "/x/"), path
    else:
        assert a == b, path


def test_api_run_returns_the_report_the_cli_prints(digits, tmp_path):
    from optcli import run

    recipe = write_recipe(tmp_path, digits_recipe(digits, PASSES, report=FAST, gates={"max_accuracy_drop": 0.05}))
    report = run(recipe, out=tmp_path / "api", overrides={"passes.1.per_channel": True})
    assert report.data == json.loads((tmp_path / "api" / "report.json").read_text())
    assert [s.name for s in report.steps] == ["original", "1-export", "2-quantize"]
    assert report.steps[-1].size_bytes == (tmp_path / "api" / "model.onnx").stat().st_size
    assert report.paths.model == tmp_path / "api" / "model.onnx" and report.paths.report_html.is_file()
    assert [g.name for g in report.gates] == ["max_accuracy_drop"] and report.passed and report.exit_code == 0
    assert report.data["recipe"]["passes"][1]["per_channel"] is True
    cli = run_cli("run", recipe, "-o", tmp_path / "cli", "--set", "passes.1.per_channel=true", "--json", "--quiet")
    assert cli.exit_code == 0, cli.stderr
    same_but_timings(report.data, cli.json())  # export + dynamic int8 are deterministic: same bytes, same figures


def test_api_errors_carry_the_cli_exit_code(digits, tmp_path):
    from optcli import run, validate
    from optcli.errors import BadInput

    recipe = write_recipe(tmp_path, digits_recipe(digits, PASSES, report=FAST))
    with pytest.raises(BadInput) as e:
        validate(recipe, overrides={"passes.1.mode": "sideways"})
    assert e.value.exit_code == 2 and "mode" in str(e.value)
    assert validate(recipe)["passes"][1]["mode"] == "dynamic"
    with pytest.raises(BadInput) as e:
        run(tmp_path / "missing.yaml", out=tmp_path / "out")
    assert e.value.exit_code == 2 and not (tmp_path / "out").exists()


def test_import_optcli_stays_light():
    heavy = "sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'numpy', 'optcli.api') if m in sys.modules)"
    code = f"import sys, optcli\nprint({heavy})\nf = optcli.run\nprint({heavy})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "['optcli.api']"]  # the API itself imports torch only when it runs
