"""Hostile and broken inputs: each one is refused with exit 2 and one line naming it; no code runs, nothing is written.

The corpus is generated here from the digits model so it stays tiny and readable; tests/corpus/README.md
lists every case and the bug it guards. Add a case (and a README line) with every input bug found.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXPORT, TESTS, digits_recipe, run_cli, write_recipe

CORPUS = TESTS / "corpus"
QUIET = ("-q",)


def refused(result, *names: str) -> str:
    """Exit 2, exactly one line on stderr starting 'error:', naming each of `names`, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.stderr}"
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr and "internal error" not in lines[0], (
        lines[0]
    )
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def nothing_written(out: Path) -> None:
    leftovers = [p.name for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [n for n in leftovers if n.startswith(("model.", "report."))], leftovers
    assert not [n for n in leftovers if ".tmp" in n or n == ".optcli.lock"], leftovers


# --------------------------------------------------------------------------- the corpus of bad model files


class Payload:
    """Unpickling this creates the marker file: the test proves the code never ran by its absence."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


def _external_onnx(folder: Path, location: str, name: str, batch: int | str = 1) -> Path:
    """A one-Add ONNX model whose weight lives in an external file at `location` (relative or absolute)."""
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="session")
def bad(digits, tmp_path_factory) -> Path:
    """Every bad model file of the corpus, in one folder (see tests/corpus/README.md)."""
    folder = tmp_path_factory.mktemp("corpus")
    onnx_bytes = (digits / "digits_cnn.onnx").read_bytes()
    pt_bytes = (digits / "digits_cnn.pt").read_bytes()
    pt2_bytes = (digits / "digits_cnn.pt2").read_bytes()
    files = {
        "empty.onnx": b"",
        "empty.pt": b"",
        "empty.pt2": b"",
        "truncated.onnx": onnx_bytes[: len(onnx_bytes) // 2],
        "truncated_header.onnx": onnx_bytes[:40],
        "truncated.pt": pt_bytes[: len(pt_bytes) // 2],
        "truncated.pt2": pt2_bytes[: len(pt2_bytes) // 2],
        "zip_directory_flipped.pt": _flip(pt_bytes, len(pt_bytes) - 30),
        "onnx_named.pt": onnx_bytes,
        "onnx_named.pt2": onnx_bytes,
        "state_dict_named.onnx": pt_bytes,
        "state_dict_named.pt2": pt_bytes,
        "text_named.onnx": b"hello, I am not a model\n" * 10,
        "npz_named.onnx": (digits / "digits_test.npz").read_bytes(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    marker = folder / "PAYLOAD_RAN"
    torch.save({"w": Payload(marker)}, folder / "payload.pt")
    (folder / "payload_named.onnx").write_bytes((folder / "payload.pt").read_bytes())
    (folder / "payload_named.pt2").write_bytes((folder / "payload.pt").read_bytes())
    (folder / "payload_named.safetensors").write_bytes((folder / "payload.pt").read_bytes())
    (folder / "payload_raw.pt").write_bytes(pickle.dumps({"w": Payload(marker)}))
    np.save(folder / "payload_array.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(folder / "payload_data.npz", "w") as z:
        z.write(folder / "payload_array.npy", "x.npy")
    torch.save({"x": Payload(marker)}, folder / "payload_data.pt")
    os.makedirs(folder / "ext", exist_ok=True)
    _external_onnx(folder / "ext", "weights.bin", "missing_data.onnx")
    _external_onnx(folder / "ext", "../../../../../../etc/passwd", "escapes_folder.onnx")
    _external_onnx(folder / "ext", "/etc/passwd", "absolute_location.onnx")
    os.symlink("/etc/passwd", folder / "ext" / "link.bin")
    _external_onnx(folder / "ext", "link.bin", "symlink_out.onnx")
    assert not marker.exists()
    return folder


MODEL_CASES = {
    # file: words the one-line refusal must contain besides the file name
    "empty.onnx": "empty",
    "empty.pt": "empty",
    "empty.pt2": "empty",
    "truncated.onnx": "not a valid ONNX",
    "truncated_header.onnx": "not a valid ONNX",
    "truncated.pt": "truncated",
    "truncated.pt2": "truncated",
    "zip_directory_flipped.pt": "truncated",
    "onnx_named.pt": "not a PyTorch checkpoint",
    "onnx_named.pt2": ".pt2",
    "state_dict_named.onnx": "not a valid ONNX",
    "state_dict_named.pt2": "torch.export",
    "text_named.onnx": "not a valid ONNX",
    "npz_named.onnx": "not a valid ONNX",
    "payload_named.onnx": "not a valid ONNX",
    "payload_named.pt2": "torch.export",
    "payload_named.safetensors": "safetensors",
    "ext/missing_data.onnx": "missing",
    "ext/escapes_folder.onnx": "outside the model folder",
    "ext/absolute_location.onnx": "outside the model folder",
    "ext/symlink_out.onnx": "outside the model folder",
}


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_broken_model_file_is_refused_by_inspect_in_one_line(bad, name):
    line = refused(run_cli("inspect", bad / name, "--trust-pickle"), Path(name).name, MODEL_CASES[name])
    assert not (bad / "PAYLOAD_RAN").exists(), line


@pytest.mark.parametrize(
    "name", ["empty.onnx", "truncated.pt", "onnx_named.pt", "ext/escapes_folder.onnx", "state_dict_named.pt2"]
)
def test_broken_model_file_is_refused_by_run_init_and_bench_before_any_work(bad, digits, tmp_path, name):
    before = tree_hashes(bad)
    recipe = digits_recipe(digits, [{"type": "quantize", "mode": "dynamic"}])
    recipe["model"]["path"] = str(bad / name)
    out = tmp_path / "out"
    refused(run_cli("run", write_recipe(tmp_path, recipe), "-o", out, *QUIET), Path(name).name)
    nothing_written(out)
    refused(
        run_cli("init", bad / name, "--factory", "optcli.examples.digits:build_cnn", "--shape", "x=1x1x8x8"),
        Path(name).name,
    )
    refused(run_cli("bench", bad / name, "--shape", "x=1x1x8x8", "--runs", "1", "--warmup", "0"), Path(name).name)
    assert tree_hashes(bad) == before


@pytest.mark.parametrize("fmt", ["onnx", "pt", "pt2"])
def test_bit_flips_anywhere_load_cleanly_or_are_refused_in_one_line(digits, tmp_path, fmt):
    # A flipped bit in a weight is a valid (different) model; elsewhere it must be a clean refusal, never a crash.
    data = (digits / f"digits_cnn.{fmt}").read_bytes()
    for at in np.linspace(0, len(data) - 1, 12).astype(int):
        path = tmp_path / f"flip_{at}.{fmt}"
        path.write_bytes(_flip(data, int(at)))
        args = ("--factory", "optcli.examples.digits:build_cnn") if fmt == "pt" else ()
        result = run_cli("init", path, *args, "--shape", "x=1x1x8x8") if fmt == "pt" else run_cli("inspect", path)
        if result.exit_code != 0:
            refused(result, path.name)


# --------------------------------------------------------------------------- code execution


def test_pickle_payload_never_runs_without_trust(bad, digits, tmp_path):
    marker = bad / "PAYLOAD_RAN"
    for name in ("payload.pt", "payload_raw.pt"):
        refused(run_cli("inspect", bad / name), name, "--trust-pickle")
        recipe = digits_recipe(digits, [EXPORT])
        recipe["model"]["path"] = str(bad / name)
        refused(run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / name, *QUIET), name, "trust")
        refused(
            run_cli("init", bad / name, "--factory", "optcli.examples.digits:build_cnn", "--shape", "x=1x1x8x8"), name
        )
    assert not marker.exists()


@pytest.mark.parametrize("name", ["payload_data.npz", "payload_data.pt"])
def test_pickle_payload_in_a_data_file_never_runs_even_with_trust_pickle(bad, digits, tmp_path, name):
    # --trust-pickle is about the model file; data files are read as plain arrays only.
    recipe = digits_recipe(digits, [EXPORT])
    recipe["data"] = {"eval": {"path": str(bad / name)}}
    refused(run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--trust-pickle", *QUIET), name)
    assert not (bad / "PAYLOAD_RAN").exists()


def test_trust_pickle_on_the_right_file_is_the_only_way_the_payload_runs(bad, tmp_path):
    # Proves the marker works, so the tests above that find no marker mean something.
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "RAN"
    torch.save({"w": Payload(marker)}, evil)
    run_cli("inspect", evil, "--trust-pickle")
    assert marker.exists()


@pytest.mark.parametrize("recipe_file", ["python_tag_model.yaml", "python_tag_apply.yaml"])
def test_yaml_python_tags_are_refused_and_never_constructed(tmp_path, recipe_file):
    marker = tmp_path / "YAML_RAN"
    text = (CORPUS / recipe_file).read_text().replace("MARKER", str(marker))
    path = tmp_path / recipe_file
    path.write_text(text)
    refused(run_cli("validate", path), recipe_file, "python")
    refused(run_cli("run", path, "-o", tmp_path / "out", *QUIET), recipe_file)
    assert not marker.exists()


def test_yaml_python_tag_in_a_set_override_is_refused(digits, tmp_path):
    marker = tmp_path / "SET_RAN"
    path = write_recipe(tmp_path, digits_recipe(digits, [EXPORT]))
    refused(
        run_cli("validate", path, "--set", f"seed=!!python/object/apply:builtins.open [{marker}, w]"), "--set", "seed"
    )
    assert not marker.exists()


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text((CORPUS / "alias_bomb.yaml").read_text())
    refused(run_cli("validate", path), "bomb.yaml", "alias")


# --------------------------------------------------------------------------- recipes


BAD_RECIPES = [
    # (--set override, words the refusal must contain)
    ("passes.0.opset=eighteen", "passes[0].opset"),
    ("passes.0.opset=1e400", "passes[0].opset"),
    ("passes.0.atol=.nan", "passes[0].atol"),
    ("passes.0.atol=-1", "passes[0].atol"),
    ("passes.0.colour=red", "passes[0].colour"),
    ("passes.0.type=shrink", "unknown pass type"),
    ("report.latency.batch_sizes=[-1]", "report.latency.batch_sizes[0]"),
    ("report.latency.batch_sizes=[]", "report.latency.batch_sizes"),
    ("report.latency.runs=99999999999999999999999", "report.latency.runs"),
    ("report.latency.threads=0", "report.latency.threads"),
    ("data.eval.samples=-5", "data.eval.samples"),
    ("data.eval.batch_size=0", "data.eval.batch_size"),
    ("data.eval.path=missing.npz", "data.eval.path"),
    ("model.inputs.0.shape=[1, -3, 8, 8]", "model.inputs[0].shape[1]"),
    ("model.inputs.0.shape=[100000, 100000, 100000]", "model.inputs[0]"),
    ("model.inputs.0.dtype=complex128", "model.inputs[0].dtype"),
    ("model.factory=not a ref", "model.factory"),
    ("gates.max_accuracy_drop=.inf", "gates.max_accuracy_drop"),
    ("gates.min_fidelity_cosine=2", "gates.min_fidelity_cosine"),
    ("seed=-1", "seed"),
    ("seed=1e30", "seed"),
    ("model=[1, 2]", "model"),
    ("passes=export", "passes"),
]


@pytest.mark.parametrize("override,words", BAD_RECIPES)
def test_bad_recipe_value_is_refused_with_its_key_and_line(digits, tmp_path, override, words):
    path = write_recipe(tmp_path, digits_recipe(digits, [EXPORT]))
    refused(run_cli("validate", path, "--set", override), words)


def test_recipe_that_is_not_a_mapping_or_not_yaml_is_refused(tmp_path):
    for text in ("- just\n- a list\n", "model: [unclosed\n", "\x00\x01binary", ""):
        path = tmp_path / "r.yaml"
        path.write_text(text)
        refused(run_cli("validate", path), "r.yaml")


# --------------------------------------------------------------------------- data files


def _data_cases(digits: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Bad data files (written to folder) and the words each refusal must contain."""
    with np.load(digits / "digits_test.npz") as z:
        x, y = z["x"], z["y"]
    cases = {
        "wrong_key.npz": ({"image": x, "y": y}, "input(s) x"),
        "wrong_shape.npz": ({"x": x[:, :, :4, :4], "y": y}, "shape"),
        "wrong_rank.npz": ({"x": x.reshape(len(x), -1), "y": y}, "shape"),
        "wrong_dtype.npz": ({"x": x.astype(np.int64), "y": y}, "int64"),
        "strings.npz": ({"x": np.array(["a"] * len(x)), "y": y}, "'x'"),
        "nan.npz": ({"x": np.where(x > 0.5, np.nan, x).astype(np.float64), "y": y}, "NaN"),
        "labels_short.npz": ({"x": x, "y": y[:10]}, "labels"),
        "no_samples.npz": ({"x": x[:0], "y": y[:0]}, "no samples"),
        "scalar.npz": ({"x": np.float32(1.0), "y": y}, "shape"),
    }
    out = {}
    for name, (arrays, words) in cases.items():
        np.savez(folder / name, **arrays)
        out[name] = (folder / name, words)
    for name, rows in (("header_claims_233TB.npz", 10**12), ("header_claims_10GB.npz", 40_000_000)):
        # A tiny file whose .npy header promises a huge array: refused without the memory ever being touched.
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (rows, 1, 8, 8)})
        with zipfile.ZipFile(folder / name, "w") as z:
            z.writestr("x.npy", header.getvalue() + b"\0" * 1024)
        out[name] = (folder / name, "cannot read")
    (folder / "not_data.npz").write_bytes(b"PK\x03\x04 broken zip")
    out["not_data.npz"] = (folder / "not_data.npz", "cannot read")
    torch.save(torch.zeros(3), folder / "tensor.pt")
    out["tensor.pt"] = (folder / "tensor.pt", "dict of tensors")
    (folder / "data.csv").write_text("x,y\n1,2\n")
    out["data.csv"] = (folder / "data.csv", "unknown data format")
    return out


@pytest.mark.parametrize("section", ["eval", "calibration"])
def test_bad_data_file_is_refused_before_any_pass_runs(digits, tmp_path, section):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, (path, words) in _data_cases(digits, folder).items():
        recipe = digits_recipe(digits, [EXPORT, {"type": "quantize", "mode": "static"}])
        recipe["data"][section] = (
            {"path": str(path), "labels": "y"} if section == "eval" and "labels" in name else {"path": str(path)}
        )
        out = tmp_path / f"out_{name}"
        line = refused(
            run_cli("run", write_recipe(tmp_path, recipe), "-o", out, *QUIET), name, f"data.{section}", words
        )
        assert not (out / "steps" / "1-export").exists(), f"{name}: export ran before the data was checked ({line})"
        nothing_written(out)


def test_labels_key_missing_is_refused(digits, tmp_path):
    recipe = digits_recipe(digits, [EXPORT])
    recipe["data"]["eval"]["labels"] = "label"
    refused(run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", *QUIET), "data.eval", "'label'")


# --------------------------------------------------------------------------- shapes too big for the machine


def test_shape_larger_than_memory_is_refused_before_allocating(digits, tmp_path):
    # 46340^2 floats is 8.6 GB per sample; batch 4096 asks for 35 TB: refused, never attempted.
    recipe = digits_recipe(digits, [EXPORT])
    recipe["model"]["inputs"] = [{"name": "x", "shape": [1, 1, 46340, 46340], "dtype": "float32"}]
    recipe["data"] = {}
    recipe["report"]["latency"]["batch_sizes"] = [1, 4096]
    line = refused(
        run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", *QUIET), "'x'", "4096", "memory"
    )
    assert "batch_sizes" in line
    nothing_written(tmp_path / "out")


def test_bench_batch_larger_than_memory_is_refused(tmp_path):
    path = _external_onnx(tmp_path, "w.bin", "dyn.onnx", batch="N")
    (tmp_path / "w.bin").write_bytes(np.ones(4, np.float32).tobytes())
    refused(run_cli("bench", path, "--batch", "100000000000", "--runs", "1"), "'x'", "memory")


# --------------------------------------------------------------------------- inputs are never modified


def test_no_verb_modifies_its_input_files(digits, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for f in digits.iterdir():
        (inputs / f.name).write_bytes(f.read_bytes())
    recipe_path = write_recipe(
        # allow_slower: what is checked is the input files, not the int8 model's speed (the default speed gate's)
        inputs,
        digits_recipe(inputs, [EXPORT, {"type": "quantize", "mode": "static", "allow_slower": True}]),
    )
    before = tree_hashes(inputs)
    mtimes = {p: p.stat().st_mtime_ns for p in inputs.iterdir()}
    out = tmp_path / "out"
    verbs = [
        ("validate", recipe_path),
        ("run", recipe_path, "-o", out, *QUIET),
        ("run", recipe_path, "-o", out, "--resume", *QUIET),
        ("run", recipe_path, "-o", tmp_path / "out2", *QUIET),
        *[("inspect", inputs / f) for f in ("digits_cnn.onnx", "digits_cnn.pt", "digits_cnn.pt2", "digits_cnn.ts.pt")],
        ("bench", inputs / "digits_cnn.onnx", "--runs", "2", "--warmup", "0"),
        ("bench", inputs / "digits_cnn.pt2", "--runs", "2", "--warmup", "0"),
        ("init", inputs / "digits_cnn.pt2"),
        ("init", inputs / "digits_cnn.onnx"),
        ("compare", out / "report.json", tmp_path / "out2" / "report.json"),
    ]
    for args in verbs:
        result = run_cli(*args)
        assert result.exit_code == 0, f"{args[0]}: {result.stderr}"
        assert tree_hashes(inputs) == before, f"optcli {args[0]} changed an input file"
    assert {p: p.stat().st_mtime_ns for p in inputs.iterdir()} == mtimes


def test_output_folder_holding_the_inputs_is_refused(digits, tmp_path):
    # --overwrite would delete the model and data; --resume would write model.onnx over an input named so.
    inputs = tmp_path / "work"
    inputs.mkdir()
    for f in ("digits_cnn.pt", "digits_test.npz", "digits_calib.npz"):
        (inputs / f).write_bytes((digits / f).read_bytes())
    path = write_recipe(inputs, digits_recipe(inputs, [EXPORT]))
    before = tree_hashes(inputs)
    for flag in ("--overwrite", "--resume"):
        refused(run_cli("run", path, "-o", inputs, flag, *QUIET), str(inputs), "digits_cnn.pt")
    assert tree_hashes(inputs) == before


# --------------------------------------------------------------------------- --debug and the report's warnings


def test_debug_adds_the_traceback_to_a_refusal(bad):
    plain = run_cli("inspect", bad / "truncated.onnx")
    debug = run_cli("inspect", bad / "truncated.onnx", "--debug")
    assert plain.exit_code == debug.exit_code == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_what_the_run_went_past_is_listed_in_report_warnings(digits, tmp_path):
    # An exclusion that matches nothing and a gate passed by a hair: both noticed, neither stops the run.
    out = tmp_path / "first"
    # allow_slower: this checks warnings, not speed (dynamic int8 on the digits CNN is slower than fp32, and the
    # default speed gate would rightly fail it).
    quantize = {"type": "quantize", "mode": "dynamic", "exclude": ["NoSuchNode"], "allow_slower": True}
    passes = [EXPORT, quantize]
    recipe = digits_recipe(
        digits, passes, report={"latency": {"batch_sizes": [1], "warmup": 0, "runs": 3, "threads": 1}}
    )
    assert run_cli("run", write_recipe(tmp_path, recipe), "-o", out, *QUIET).exit_code == 0
    size = json.loads((out / "report.json").read_text())["steps"][-1]["size_bytes"]
    recipe["gates"] = {"max_size_bytes": int(size * 1.02)}
    out = tmp_path / "second"
    assert run_cli("run", write_recipe(tmp_path, recipe), "-o", out, *QUIET).exit_code == 0
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert any("2-quantize" in w and "NoSuchNode" in w for w in warnings), warnings
    assert any("max_size_bytes" in w and "within 5%" in w for w in warnings), warnings
