"""The first five minutes of a new user (issue 15): start, messages, reports, compare, inspect — each checked on
the text or file the user sees, by running the CLI as they would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import EXPORT, REPO, digits_recipe, run_cli, write_recipe
from onnx import TensorProto, helper

from optcli import __version__


def _static(digits, **extra):
    return digits_recipe(digits, [{"type": "quantize", "mode": "static", "per_channel": True}], **extra)


@pytest.fixture(scope="module")
def static_run(digits, tmp_path_factory):
    """One static int8 run of the digits CNN, timed while the machine pretends to be very busy."""
    folder = tmp_path_factory.mktemp("static")
    recipe = write_recipe(folder, _static(digits, gates={"max_accuracy_drop": 0.05}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))  # a simulated load: 64 on any core count
        mp.delenv("COLUMNS", raising=False)  # the test that first asks for this run may have set a width
        result = run_cli("run", recipe, "-o", folder / "out")
    assert result.exit_code == 0, result.stderr
    return folder, result


# --------------------------------------------------------------------------- 1. start


def test_readme_quick_start_command_can_be_run_twice(digits, tmp_path):
    readme = (REPO / "README.md").read_text()
    quick = readme[readme.index("## Quick start") : readme.index("## Commands")]
    assert "make quickstart" in quick
    command = next(line for line in quick.splitlines() if line.startswith("optcli run configs/digits_static_int8"))
    assert "--overwrite" in command  # the README's own command, re-runnable as written
    assert "--overwrite" in (REPO / "Makefile").read_text().split("quickstart:")[1].split("\n\n")[0]
    recipe = write_recipe(tmp_path, digits_recipe(digits, [EXPORT]))
    for _ in range(2):
        result = run_cli("run", recipe, "-o", tmp_path / "out", "--overwrite", "-q")
        assert result.exit_code == 0, result.stderr
    refused = run_cli("run", recipe, "-o", tmp_path / "out", "-q")
    assert refused.exit_code == 2
    assert "holds an earlier optcli run" in refused.stderr and "--overwrite" in refused.stderr


def test_version_flag_prints_the_version_in_the_report():
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"optcli {__version__}"


# --------------------------------------------------------------------------- 2. the report


def test_report_says_one_verdict_sentence_against_the_first_onnx_step_in_every_view(static_run):
    folder, result = static_run
    out = folder / "out"
    report = json.loads((out / "report.json").read_text())
    sentence = report["summary"]["verdict"]
    assert report["summary"]["baseline"] == "1-export"
    assert re.match(r"2-quantize: \d+\.\d\d× smaller, .* than 1-export, accuracy [+−]\d+\.\d pt$", sentence), sentence
    final, export = report["steps"][2], report["steps"][1]
    assert final["vs_baseline"]["step"] == "1-export" and final["vs_previous"]["step"] == "1-export"
    assert final["vs_baseline"]["size"] == round(final["size_bytes"] / export["size_bytes"], 4)
    assert f"{export['size_bytes'] / final['size_bytes']:.2f}× smaller" in sentence
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert sentence in " ".join(result.stdout.split())
    assert sentence in md and sentence in html
    assert "× 1-export" in md and "speed-up" not in md and "speed-up" not in html  # one reading of ×


def test_report_says_what_each_pass_did_with_the_samples_used(static_run):
    out = static_run[0] / "out"
    md = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    used = report["steps"][2]["details"]["calibration_samples"]
    assert "## What each step did" in md
    assert f"static QDQ int8, int8 weights per-channel, calibration minmax on {used} samples" in md
    assert "torch → ONNX opset 18" in md


def test_terminal_shows_step_seconds_plain_throughput_and_paths_alike(static_run):
    folder, result = static_run
    out = folder / "out"
    assert "secs" in result.stdout
    md = (out / "report.md").read_text()
    latency = md[md.index("## Latency") : md.index("## Files")]
    assert "e+" not in latency
    files = md[md.index("## Files") :].split("\n")
    paths = [line.split("|")[2].strip() for line in files if line.startswith("| input") or line.startswith("| output")]
    assert len(paths) == 2 and len({os.path.isabs(p) for p in paths}) == 1  # both absolute or both relative


def test_busy_machine_note_with_a_simulated_load(static_run):
    folder, result = static_run
    note = "timings not trustworthy: the machine was busy while measuring (load average 64.0 on"
    assert note in " ".join(result.stdout.split())
    assert note in (folder / "out" / "report.md").read_text()
    assert note in json.loads((folder / "out" / "report.json").read_text())["summary"]["busy"]


def test_int8_sparsity_is_not_shown_as_rounding_noise(static_run):
    out = static_run[0] / "out"
    report = json.loads((out / "report.json").read_text())
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| 2-quantize"))
    shown = row.split("|")[8].strip()
    assert shown == f"{report['steps'][1]['sparsity'] * 100:.1f}%"  # the sparsity of the weights it quantized


def _run_piped(args, cwd, columns=None):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "optcli", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("columns", [None, 80, 100])
def test_terminal_table_fits_the_terminal_and_piped_output_has_no_trailing_spaces(static_run, columns):
    folder, _ = static_run
    # The table re-rendered from the run's report.json the way `optcli run` prints it, in a child process.
    code = (
        "import json,sys\nfrom optcli.report.terminal import render_table, show\n"
        f"show(render_table(json.load(open({str(folder / 'out' / 'report.json')!r}))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = str(columns)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= (columns or 100)
    assert not [line for line in lines if line != line.rstrip()]
    assert any(line.startswith("2-quantize ") for line in lines)
    assert "…" not in proc.stdout  # no figure cut to fit: columns are left out (and said so) instead


# --------------------------------------------------------------------------- 2b. no silent regressions


def _tiny_matmul(path, n=4):
    # A graph too small for int8 to pay: quantizing adds scales and zero points to a 16-weight matrix.
    w = helper.make_tensor("w", TensorProto.FLOAT, [n, n], np.random.default_rng(0).normal(size=n * n).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _tiny_recipe(model, **extra):
    recipe = {
        "model": {"path": str(model)},
        "passes": [{"type": "quantize", "mode": "dynamic"}],
        "report": {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 3, "threads": 1}, "fidelity_samples": 8},
    }
    recipe.update(extra)
    return recipe


def test_default_gates_fail_a_bigger_artifact_and_gates_empty_turns_them_off(tmp_path):
    model = _tiny_matmul(tmp_path / "tiny.onnx")
    result = run_cli("run", write_recipe(tmp_path, _tiny_recipe(model)), "-o", tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    names = {g["name"]: g for g in report["gates"]}
    assert "max_size_ratio (default)" in names and "min_fidelity_cosine (default)" in names
    bigger = report["steps"][-1]["size_bytes"] > report["steps"][0]["size_bytes"]
    assert names["max_size_ratio (default)"]["passed"] is not bigger
    assert result.exit_code == (1 if bigger else 0)
    assert "max_size_ratio (default)" in (tmp_path / "out" / "report.md").read_text()
    # The quantize pass now keeps a weightless graph as it is; the gate itself, on an int8 step that grew:
    from optcli.gates import default_gates

    grown = [{"name": "original", "size_bytes": 100}, {"name": "1-quantize", "type": "quantize", "size_bytes": 130}]
    (size_gate,) = [g for g in default_gates(grown, 0) if g["name"] == "max_size_ratio (default)"]
    assert size_gate["passed"] is False and size_gate["value"] == 1.3
    off = run_cli("run", write_recipe(tmp_path, _tiny_recipe(model, gates={}), "off.yaml"), "-o", tmp_path / "off")
    assert off.exit_code == 0, off.stderr
    assert json.loads((tmp_path / "off" / "report.json").read_text())["gates"] == []


def test_slower_final_artifact_is_a_loud_warning_in_every_view():
    from rich.console import Console

    from optcli.report import render_html, render_markdown
    from optcli.report.terminal import render_table

    def step(name, fmt, size, ms):
        return {"name": name, "format": fmt, "size_bytes": size, "latency": {"batch_1": {"p50_ms": ms, "p99_ms": ms}}}

    report = {"steps": [step("original", "torch", 1000, 2.0), step("1-export", "onnx", 1000, 1.0)], "gates": []}
    report["steps"].append({**step("2-quantize", "onnx", 400, 1.5), "type": "quantize"})
    console = Console(record=True, width=100)
    console.print(render_table(report))
    expected = "2-quantize is SLOWER than 1-export (1.50× the time at b1)"
    for text in (console.export_text(), render_markdown(report), render_html(report)):
        assert expected in " ".join(text.split())
    assert "1.50×" in render_markdown(report)  # time ratio, as size: > 1× is worse


# --------------------------------------------------------------------------- 3. one knob


def test_calibration_samples_asked_for_and_used_are_reported(digits, tmp_path):
    recipe = digits_recipe(digits, [{"type": "quantize", "mode": "static", "calibration": {"samples": 32}}])
    recipe["data"]["calibration"]["samples"] = 96
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["steps"][2]["details"]["calibration_samples"] == 32
    assert any(
        "96 samples requested (data.calibration.samples), 32 used (calibration.samples of 2-quantize)" in w
        for w in report["warnings"]
    )
    # Without the pass's own value, data.calibration.samples governs.
    recipe["passes"][0].pop("calibration")
    result = run_cli("run", write_recipe(tmp_path, recipe, "r2.yaml"), "-o", tmp_path / "out2", "--json", "-q")
    assert result.json()["steps"][2]["details"]["calibration_samples"] == 96


# --------------------------------------------------------------------------- 4. mistakes caught where made


def test_set_mistake_names_the_set_flag_with_a_did_you_mean(digits, tmp_path):
    recipe = write_recipe(tmp_path, _static(digits))
    result = run_cli("validate", recipe, "--set", "passes.0.per_chanel=false")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --set passes.0.per_chanel=false: passes[0].per_chanel: unknown key")
    assert "did you mean `per_channel`?" in result.stderr and "`optcli passes`" in result.stderr
    assert "recipe.yaml:" not in result.stderr
    typo = _static(digits)
    typo["passes"][0]["per_chanel"] = typo["passes"][0].pop("per_channel")
    in_file = run_cli("validate", write_recipe(tmp_path, typo, "typo.yaml"))
    assert re.search(
        r"typo\.yaml:\d+: passes\[0\]\.per_chanel: unknown key: did you mean `per_channel`", in_file.stderr
    )


def test_impossible_pass_chains_are_refused_at_validate_with_the_fix(digits, tmp_path):
    onnx_model = str(digits / "digits_cnn.onnx")
    data = {"calibration": {"path": str(digits / "digits_calib.npz")}}
    cases = [
        ([{"type": "quantize"}, {"type": "prune", "sparsity": 0.5}, {"type": "quantize"}], "put prune before quantize"),
        ([{"type": "quantize"}, {"type": "quantize"}], "keep one quantize step"),
    ]
    for passes, fix in cases:
        recipe = write_recipe(tmp_path, {"model": {"path": onnx_model}, "data": data, "passes": passes})
        result = run_cli("validate", recipe)
        assert result.exit_code == 2 and fix in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
    torch_chain = digits_recipe(digits, [{"type": "quantize"}, {"type": "finetune", "epochs": 1}])
    torch_chain["data"]["train"] = {"path": str(digits / "digits_train.npz"), "labels": "y"}
    result = run_cli("validate", write_recipe(tmp_path, torch_chain, "t.yaml"))
    assert result.exit_code == 2 and "put finetune (and prune) before quantize" in result.stderr


def test_quantizing_an_int8_model_again_is_refused(static_run, tmp_path):
    recipe = write_recipe(
        tmp_path, {"model": {"path": str(static_run[0] / "out" / "model.onnx")}, "passes": [{"type": "quantize"}]}
    )
    result = run_cli("validate", recipe)
    assert result.exit_code == 2
    assert "the int8 graph model.path holds" in result.stderr and "give the fp32 model" in result.stderr


def test_usage_errors_are_one_error_line_like_optcli_own():
    for args, expected in (
        (["run", "x.yaml", "-o", "o", "--overwrit"], "did you mean --overwrite?"),
        (["valdate", "x.yaml"], "did you mean 'validate'?"),
        (["bench", "m.onnx", "--threads", "0"], "invalid value for '--threads'"),
    ):
        proc = subprocess.run([sys.executable, "-m", "optcli", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert expected in proc.stderr and "╭" not in proc.stderr


def test_help_reads_like_a_cli_with_multi_node_options_apart():
    bench = run_cli("bench", "--help").stdout
    for option, words in (("--threads", "threads"), ("--warmup", "untimed"), ("--runs", "timed runs")):
        line = next(line for line in bench.splitlines() if option in line)
        assert words in line
    run_help = run_cli("run", "--help").stdout
    assert "<list[str]>" not in run_help + bench and "<bool>" not in run_help + bench
    assert "Multi-node" in run_help
    assert run_help.index("--overwrite") < run_help.index("Multi-node") < run_help.index("--nnodes")


def test_nhwc_calibration_array_gets_the_transpose(digits, tmp_path):
    np.savez(tmp_path / "nhwc.npz", x=np.load(digits / "digits_calib.npz")["x"].transpose(0, 2, 3, 1))
    recipe = _static(digits)
    recipe["data"]["calibration"]["path"] = str(tmp_path / "nhwc.npz")
    result = run_cli("validate", write_recipe(tmp_path, recipe))
    assert (
        result.exit_code == 2
        and "looks like NHWC (channels last): convert with arr.transpose(0, 3, 1, 2)" in result.stderr
    )


def _free_image_model(path, dims, metadata=None):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["images"], ["y"])],
        "free",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def test_init_on_free_height_width_suggests_a_concrete_shape(tmp_path):
    yolo = _free_image_model(tmp_path / "y.onnx", ["batch", 3, "height", "width"], {"imgsz": "[320, 320]"})
    result = run_cli("init", yolo)
    assert result.exit_code == 2 and "--shape images=1x3x320x320" in result.stderr
    plain = _free_image_model(
        tmp_path / "p.onnx", ["DynamicDimension.0", 3, "DynamicDimension.1", "DynamicDimension.2"]
    )
    result = run_cli("init", plain)
    assert "--shape images=1x3x224x224" in result.stderr and "DynamicDimension" not in result.stderr
    shown = run_cli("inspect", plain).stdout
    assert "[?, 3, ?, ?]" in shown and "DynamicDimension" not in shown


# --------------------------------------------------------------------------- 5. library noise


def test_onnx_runtime_advice_is_said_once_in_optcli_words_without_logger_names(digits, tmp_path):
    recipe = digits_recipe(digits, [{"type": "quantize", "mode": "static", "preprocess": False}])
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    shown = result.stdout + result.stderr
    assert "root:" not in shown and "Please consider to run pre-processing" not in shown
    assert shown.count("quantized without ONNX Runtime's pre-processing") == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    originals = report["steps"][2]["details"]["library_messages"]
    assert any("Please consider to run pre-processing" in m for m in originals)


# --------------------------------------------------------------------------- 6. compare and inspect


def test_compare_in_human_units_with_markers_recipe_difference_and_caveats(static_run, digits, tmp_path):
    new = static_run[0] / "out" / "report.json"
    dynamic = digits_recipe(digits, [{"type": "quantize", "mode": "dynamic", "per_channel": True}])
    dynamic["data"].pop("eval")  # fidelity on generated inputs: not the same inputs as the static run
    result = run_cli("run", write_recipe(tmp_path, dynamic), "-o", tmp_path / "dyn", "-q")
    assert result.exit_code in (0, 1), result.stderr
    shown = run_cli("compare", new, tmp_path / "dyn" / "report.json").stdout
    assert "kB" in shown and "None" not in shown and "size_bytes" not in shown
    assert "better" in shown or "worse" in shown
    assert "passes[1].mode: dynamic → static" in shown
    assert "measured on different inputs" in shown
    assert "busy while measuring" in shown  # the static run was timed under the simulated load
    as_json = run_cli("compare", new, tmp_path / "dyn" / "report.json", "--json").json()
    assert set(as_json) == {"new", "baseline", "rows"}


def test_inspect_says_what_the_model_is_and_lists_outputs(static_run):
    model = static_run[0] / "out" / "model.onnx"
    ops = {}
    for node in onnx.load(str(model)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    shown = run_cli("inspect", model).stdout
    assert (
        f"static QDQ int8: {ops['DequantizeLinear']} DequantizeLinear / {ops['QuantizeLinear']} QuantizeLinear" in shown
    )
    assert "opset" in shown and "ai.onnx 18" in shown and "{" not in shown
    assert "outputs" in shown and "[batch, 10]" in shown


def test_parameters_built_by_constant_nodes_are_counted_in_inspect_and_report(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w, "w")),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "c.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    info = run_cli("inspect", path, "--json").json()
    assert info["parameters"] == w.size
    recipe = {"model": {"path": str(path)}, "passes": [], "report": {"latency": {"batch_sizes": [1], "runs": 2}}}
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.json()["steps"][0]["parameters"] == w.size


def test_the_wrote_line_prints_both_paths_the_way_the_user_gave_the_folder(digits, tmp_path):
    recipe = write_recipe(tmp_path, _static(digits))
    result = run_cli("run", recipe, "-o", "out", cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    wrote = next(line for line in result.stdout.splitlines() if line.startswith("wrote "))
    assert wrote == "wrote out/model.onnx and out/report.{json,md,html}"
