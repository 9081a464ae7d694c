"""Issue 15, the rest of the first contact: run-time errors in user terms, readable dims, torch `inspect`, help
metavars, eval labels that do not fit, sweep's --junit/--json and Ctrl-C — each on what a user sees."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import EXPORT, digits_recipe, run_cli, write_recipe
from onnx import TensorProto, helper

# --------------------------------------------------------------------------- 1. run-time errors in user terms


def _fail_naming_intermediates(src, dst, *args, **kwargs):
    # What ONNX Runtime's quantizer says when it breaks: the file it read, its augmented model in the cwd it was
    # given (a scratch folder of the step) and a temp folder of its own.
    own = tempfile.mkdtemp(prefix="ort.quant.")
    raise RuntimeError(
        f"[ONNXRuntimeError] : 1 : FAIL : Load model from {os.getcwd()}/augmented_model.onnx failed: "
        f"Node (Conv_0) has input size 4 not in range; source {src}; see {own}/model-inferred.onnx"
    )


def _write_unrunnable(src, dst, *args, **kwargs):
    # A quantizer that writes a graph ONNX Runtime then refuses (an op no kernel implements).
    graph = helper.make_graph(
        [helper.make_node("NoSuchKernel", ["x"], ["y"], domain="com.nowhere")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), dst)


@pytest.mark.parametrize("quantizer", [_fail_naming_intermediates, _write_unrunnable])
def test_a_pass_failing_on_an_intermediate_names_the_user_model_and_step(digits, tmp_path, monkeypatch, quantizer):
    import onnxruntime.quantization as ort_quantization

    monkeypatch.setattr(ort_quantization, "quantize_static", quantizer)
    recipe = digits_recipe(digits, [{"type": "quantize", "mode": "static", "preprocess": False}])
    out = tmp_path / "out"
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", out, "-q")
    assert result.exit_code == 3, result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: pass 2-quantize failed on "), line
    if quantizer is _write_unrunnable:
        assert "ONNX Runtime cannot load the model this step wrote" in line
    assert str(digits / "digits_cnn.pt") in line  # the user's model, as model.path names it
    assert str(out) not in line and tempfile.gettempdir() + "/ort" not in line
    assert ".tmp-" not in line and "steps/" not in line and "model-inferred" not in line
    if quantizer is _fail_naming_intermediates:
        assert "source the model 1-export wrote" in line and "a temp file of 2-quantize" in line
    assert not list((out / "steps").glob(".*"))  # no work in progress left behind


# --------------------------------------------------------------------------- 2. readable dims in every message

MACHINE_DIMS = ("DynamicDimension", "unk__", "''", "None")


def _machine_named_model(path):
    # What converters write for free sizes: generated names and an empty dim_param.
    dims = ["unk__12", 3, "DynamicDimension.1", ""]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["images"], ["y"])],
        "free",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _no_machine_dims(text):
    assert not [name for name in MACHINE_DIMS if name in text], text


def test_shapes_in_init_validate_and_data_messages_never_show_raw_dim_names(tmp_path):
    model = _machine_named_model(tmp_path / "m.onnx")
    init = run_cli("init", model)
    assert init.exit_code == 2 and "--shape images=1x3x224x224" in init.stderr
    _no_machine_dims(init.stderr)
    # model.inputs of the wrong rank: the file's shape said with ? for what it leaves free
    recipe = {"model": {"path": str(model), "inputs": [{"name": "images", "shape": [1, 3, 16], "dtype": "float32"}]}}
    recipe["passes"] = [{"type": "quantize", "mode": "dynamic"}]
    wrong_rank = run_cli("validate", write_recipe(tmp_path, recipe))
    assert wrong_rank.exit_code == 2
    assert "has shape 1 x 3 x 16 but the file says ? x 3 x ? x ?" in wrong_rank.stderr, wrong_rank.stderr
    _no_machine_dims(wrong_rank.stderr)
    # data of the wrong shape for the sizes the recipe gave
    np.savez(tmp_path / "calib.npz", images=np.zeros((4, 3, 8), np.float32))
    recipe["model"]["inputs"][0]["shape"] = [1, 3, 16, 16]
    recipe["data"] = {"calibration": {"path": str(tmp_path / "calib.npz")}}
    recipe["passes"] = [{"type": "quantize", "mode": "static"}]
    bad_data = run_cli("validate", write_recipe(tmp_path, recipe, "data.yaml"))
    assert bad_data.exit_code == 2
    assert "'images' has shape 4 x 3 x 8, the model takes N x 3 x 16 x 16" in bad_data.stderr, bad_data.stderr
    _no_machine_dims(bad_data.stderr)
    shown = run_cli("inspect", model).stdout
    assert "[?, 3, ?, ?]" in shown
    _no_machine_dims(shown)


# --------------------------------------------------------------------------- 3. inspect on torch files


def _said(result):
    return " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("digits_cnn.ts.pt", "TorchScript"),
        ("digits_cnn.pt2", "torch.export program"),
        ("digits_cnn.pt", "state_dict weights"),
    ],
)
def test_inspect_says_what_a_torch_file_is_in_one_line(digits, name, what):
    info = run_cli("inspect", digits / name, "--json").json()
    line = f"fp32 torch module ({what}): {info['parameters']:,} parameters, {info['sparsity'] * 100:.0f} % zero weights"
    assert info["parameters"] > 0 and info["summary"] == line
    assert f"model {line}" in _said(run_cli("inspect", digits / name))


def test_inspect_says_a_pruned_and_an_int8_torch_model_are_so(tmp_path):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight[:, ::2] = 0  # half of every weight matrix pruned
    torch.save(net.state_dict(), tmp_path / "pruned.pt")
    info = run_cli("inspect", tmp_path / "pruned.pt", "--json").json()
    zero = info["sparsity"] * 100
    assert zero > 40 and info["summary"].endswith(f"parameters, {zero:.0f} % zero weights")
    with pytest.warns(Warning):  # torch.ao's eager int8 is deprecated, and still what many checkpoints hold
        int8 = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(int8.state_dict(), tmp_path / "int8.pt")
    torch.jit.script(int8).save(str(tmp_path / "int8.ts.pt"))
    weights = run_cli("inspect", tmp_path / "int8.pt", "--json").json()
    assert weights["summary"].startswith(
        f"int8 torch module (state_dict weights): {weights['parameters']:,} parameters"
    )
    assert weights["parameters"] >= 16 * 32 + 32 * 4
    script = _said(run_cli("inspect", tmp_path / "int8.ts.pt"))
    assert "model int8 torch module (TorchScript)" in script and "quantized::linear_dynamic" in script


# --------------------------------------------------------------------------- 4. help pages that read like a CLI

COMMANDS = ("", "run", "validate", "init", "inspect", "compare", "sweep", "bench", "passes", "schema")
PYTHONISH = re.compile(r"<(?:path|bool|str|int|float|list\[[^\]]*\]|[a-z]+ range)>|\{[A-Z_]+\}")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_pages_use_cli_metavars_and_fit_100_columns(command):
    args = [command, "--help"] if command else ["--help"]
    env = {**os.environ, "COLUMNS": "100"}
    optcli = Path(sys.executable).with_name("optcli")  # the console script a user types
    proc = subprocess.run([optcli, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = proc.stdout
    assert f"Usage: optcli {command}".rstrip() in page
    assert not PYTHONISH.findall(page), PYTHONISH.findall(page)
    assert max(len(line) for line in page.splitlines()) <= 100


def test_every_option_of_every_command_has_help_text():
    import typer

    from optcli.cli import app

    group = typer.main.get_command(app)
    missing = [
        f"{name} {param.opts[0]}"
        for name, command in group.commands.items()
        for param in command.params
        if param.param_type_name == "option" and not param.hidden and not (param.help or "").strip()
    ]
    assert not missing
    assert all((command.help or "").strip() for command in group.commands.values())


# --------------------------------------------------------------------------- 5. eval labels that do not fit the model


def _eval_with(digits, tmp_path, name, make_labels):
    z = np.load(digits / "digits_test.npz")
    path = tmp_path / name
    np.savez(path, x=z["x"], y=make_labels(z["y"]))
    return path


@pytest.mark.parametrize(
    ("labels", "fix"),
    [
        (
            lambda y: np.eye(10, dtype=np.int64)[y],
            "look one-hot; accuracy needs one class index per sample: store labels.argmax(-1)",
        ),
        (lambda y: y[:, None], "accuracy needs one class index per sample: store labels.reshape(-1)"),
        (lambda y: y + 5, "but the model's first output has 10 classes (0..9)"),
        (lambda y: np.eye(10, dtype=np.float32)[y] * 0.9, "not class indices"),
    ],
)
def test_eval_labels_that_do_not_fit_the_outputs_are_bad_input_at_validate_and_run(digits, tmp_path, labels, fix):
    data = _eval_with(digits, tmp_path, "eval.npz", labels)
    onnx_recipe = {
        "model": {"path": str(digits / "digits_cnn.onnx")},
        "data": {"eval": {"path": str(data), "labels": "y"}},
        "passes": [{"type": "quantize", "mode": "dynamic"}],
    }
    checked = run_cli("validate", write_recipe(tmp_path, onnx_recipe, "onnx.yaml"))  # the file records 10 classes
    assert checked.exit_code == 2 and checked.stderr.count("\n") == 1, checked.stderr
    assert checked.stderr.startswith(f"error: data.eval ({data}): labels") and fix in checked.stderr
    torch_recipe = digits_recipe(digits, [EXPORT])  # a state_dict: outputs known once it runs
    torch_recipe["data"] = {"eval": {"path": str(data), "labels": "y"}}
    out = tmp_path / "out"
    ran = run_cli("run", write_recipe(tmp_path, torch_recipe, "torch.yaml"), "-o", out, "-q")
    assert ran.exit_code == 2, ran.stderr
    line = ran.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: data.eval ({data}): labels") and fix in line
    assert "internal error" not in line
    assert not (out / "report.json").exists() and not (out / "model.onnx").exists()


# --------------------------------------------------------------------------- 6. sweep: --junit, --json, Ctrl-C

SWEEP_PASSES = [EXPORT, {"type": "quantize", "mode": "dynamic"}]
SWEEP_REPORT = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 3, "threads": 1}}
SWEEP_GRID = ["--grid", "passes.1.per_channel=false,true"]


@pytest.fixture
def small_sweep(digits, tmp_path):
    recipe = digits_recipe(digits, SWEEP_PASSES, report=SWEEP_REPORT, gates={"max_accuracy_drop": 0.05})
    return write_recipe(tmp_path, recipe)


def test_sweep_json_on_stdout_and_junit_file_say_what_sweep_json_and_the_variant_reports_say(small_sweep, tmp_path):
    import xml.etree.ElementTree as ET

    out, junit = tmp_path / "sweep", tmp_path / "ci" / "gates.xml"
    (tmp_path / "ci").mkdir()
    result = run_cli("sweep", small_sweep, "-o", out, *SWEEP_GRID, "--json", "--junit", junit)
    assert result.exit_code in (0, 1), result.stderr
    printed = result.json()  # stdout is the JSON alone; the table went to stderr
    assert printed == json.loads((out / "sweep.json").read_text())
    assert "per_channel" in result.stderr  # the human table, on stderr
    names = [v["name"] for v in printed["variants"]]
    assert sorted(names) == ["per_channel-off", "per_channel-on"]
    assert result.exit_code == (0 if printed["best"] else 1)
    root = ET.parse(junit).getroot()
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert sorted(suites) == sorted(names)
    total = failed = 0
    for name in names:
        gates = json.loads((out / name / "report.json").read_text())["gates"]
        cases = suites[name].findall("testcase")
        assert [c.get("name") for c in cases] == [g["name"] for g in gates]
        for case, gate in zip(cases, gates, strict=True):
            assert (case.find("failure") is None) == gate["passed"]
            assert {p.get("name"): p.get("value") for p in case.iter("property")}["value"] == str(gate["value"])
        assert suites[name].get("failures") == str(sum(not g["passed"] for g in gates))
        total, failed = total + len(gates), failed + sum(not g["passed"] for g in gates)
    assert (root.get("tests"), root.get("failures")) == (str(total), str(failed))
    code = (
        "import json\nfrom optcli.report.terminal import render_sweep, show\n"
        f"show(render_sweep(json.load(open({str(out / 'sweep.json')!r}))))\n"
    )
    for columns in (80, 100):  # the sweep table as `optcli sweep` prints it on a terminal of that width
        env = {**os.environ, "COLUMNS": str(columns)}
        shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        lines = shown.stdout.splitlines()
        assert max(len(line) for line in lines) <= columns and "…" not in shown.stdout, shown.stdout
        assert all(any(line.startswith(name + " ") for line in lines) for name in names)
    quiet = run_cli("sweep", small_sweep, "-o", out, *SWEEP_GRID, "--json", "--quiet", "--resume")
    assert quiet.stderr == "" and quiet.json()["best"] == printed["best"]  # --quiet: JSON only, nothing on stderr


def _descendants(pid):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.system
def test_ctrl_c_on_a_parallel_sweep_exits_130_with_no_orphan_workers_and_nothing_half_written(small_sweep, tmp_path):
    import signal
    import time

    import psutil

    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "optcli", "sweep", str(small_sweep), "-o", str(out), *SWEEP_GRID, "--jobs", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        # Interrupt once both workers are inside a variant's run (its folder exists), before either finishes.
        while time.monotonic() < deadline and proc.poll() is None:
            started = [p for p in out.glob("per_channel-*") if p.is_dir()] if out.exists() else []
            workers = _descendants(proc.pid)
            if len(started) == 2 and len(workers) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to optcli (its workers ignore SIGINT themselves)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert stderr.strip().endswith("interrupted: nothing half-written was left at the output paths"), stderr
    assert stdout == ""
    assert workers, "no worker process was seen"
    gone, alive = psutil.wait_procs(workers, timeout=10)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]
    assert not (out / "sweep.json").exists() and not (out / ".optcli.lock").exists()
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name or p.name == ".optcli.lock"]
    assert not leftovers, leftovers
    for report in out.rglob("report.json"):  # a variant that finished wrote its report whole
        json.loads(report.read_text())


# --------------------------------------------------------------------------- 7. report.html as a user reads it


def test_report_html_tables_read_as_text_not_python_and_align_figures(digits, tmp_path):
    recipe = digits_recipe(digits, [EXPORT])
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.stderr
    html = (tmp_path / "out" / "report.html").read_text()
    env = json.loads((tmp_path / "out" / "report.json").read_text())["environment"]
    listed = next(k for k, v in env.items() if isinstance(v, list) and v)  # e.g. the providers available
    assert f'<td class="text">{", ".join(env[listed])}</td>' in html  # a list as words, not ['a', 'b']
    assert "['" not in html and "{'" not in html
    assert '<table class="wide">' in html  # the many-column steps table in the compact type
    assert "1\u2011export" in html.split("<h2>Steps</h2>")[1].split("</thead>")[0]  # headers never break at "1-"
    files = html.split("<h2>Files</h2>")[1].split("</table>")[0]
    sha = json.loads((tmp_path / "out" / "report.json").read_text())["input"]["sha256"]
    assert '<th class="text">path</th>' in files and f'<td class="text">{sha}</td>' in files  # text left-aligned


def test_compare_says_recipe_changes_as_the_recipe_spells_them(digits, tmp_path):
    recipe = {
        "model": {"path": str(digits / "digits_cnn.onnx")},
        "passes": [{"type": "quantize", "mode": "dynamic", "per_channel": False}],
        "report": {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 3, "threads": 1}},
    }
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "old", "-q")
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads((tmp_path / "old" / "report.json").read_text())
    report["recipe"]["passes"][0]["per_channel"] = False  # as written (the resolved recipe leaves defaults out)
    (tmp_path / "old" / "report.json").write_text(json.dumps(report))
    report["recipe"]["passes"][0]["per_channel"] = True
    report["recipe"]["report"]["latency"]["batch_sizes"] = [1, 32]
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "report.json").write_text(json.dumps(report))
    shown = run_cli("compare", tmp_path / "new" / "report.json", tmp_path / "old" / "report.json").stdout
    assert "passes[0].per_channel: false → true" in shown
    assert "report.latency.batch_sizes: [1] → [1, 32]" in shown
    assert "True" not in shown and "False" not in shown
