"""report.json as a typed contract, on a real run: its JSON Schema for CI users, compare refusing files it cannot
read, the API returning the contract, the three renderers showing the same sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EXPORT, digits_recipe, run_cli, write_recipe

from optcli.report import model


@pytest.fixture(scope="module")
def finished(digits: Path, tmp_path_factory) -> Path:
    """The digits quick recipe (export, dynamic int8) run once: its report.json."""
    folder = tmp_path_factory.mktemp("contract")
    passes = [EXPORT, {"type": "quantize", "mode": "dynamic", "allow_slower": True}]
    recipe = write_recipe(folder, digits_recipe(digits, passes))
    result = run_cli("run", recipe, "-o", folder / "out", "--quiet")
    assert result.exit_code == 0, result.stderr
    return folder / "out" / "report.json"


# --------------------------------------------------------------------------- a JSON Schema validator
# jsonschema is not a dependency of optcli; where it is installed it judges, else this checks the subset of draft
# 2020-12 pydantic emits (type, properties, required, items, additionalProperties, anyOf, allOf/if/then, const, $ref).


def schema_errors(schema: dict, instance) -> list[str]:
    try:
        import jsonschema
    except ImportError:
        return list(_errors(schema, instance, schema, "$"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return [
        f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(instance)
    ]


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
    "integer": int,
    "number": (int, float),
}


def _is(instance, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(instance, bool):
        return False
    if kind == "integer" and isinstance(instance, float):
        return instance.is_integer()
    return isinstance(instance, _TYPES[kind])


def _errors(node: dict, instance, root: dict, where: str):
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        yield from _errors(root["$defs"][name], instance, root, where)
        return
    if "const" in node and instance != node["const"]:
        yield f"{where}: {instance!r} is not {node['const']!r}"
    if "type" in node and not _is(instance, node["type"]):
        yield f"{where}: {instance!r} is not of type {node['type']}"
        return
    if "anyOf" in node and all(list(_errors(n, instance, root, where)) for n in node["anyOf"]):
        yield f"{where}: {instance!r} matches none of {len(node['anyOf'])} choices"
    for rule in node.get("allOf", []):
        if "if" in rule:
            if not list(_errors(rule["if"], instance, root, where)):
                yield from _errors(rule["then"], instance, root, where)
        else:
            yield from _errors(rule, instance, root, where)
    if isinstance(instance, dict):
        for key in node.get("required", []):
            if key not in instance:
                yield f"{where}: {key} is missing"
        props = node.get("properties", {})
        extra = node.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                yield from _errors(props[key], value, root, f"{where}.{key}")
            elif isinstance(extra, dict):
                yield from _errors(extra, value, root, f"{where}.{key}")
    if isinstance(instance, list) and isinstance(node.get("items"), dict):
        for i, value in enumerate(instance):
            yield from _errors(node["items"], value, root, f"{where}[{i}]")


# --------------------------------------------------------------------------- optcli schema --report


def test_schema_report_prints_a_json_schema_that_a_real_report_json_meets(finished):
    result = run_cli("schema", "--report")
    assert result.exit_code == 0, result.stderr
    schema = result.json()
    assert schema["$schema"].startswith("https://json-schema.org/") and "steps" in schema["properties"]
    report = json.loads(finished.read_text())
    assert report["schema_version"] == model.SCHEMA_VERSION
    assert schema_errors(schema, report) == []
    # Each step's details are checked by its pass type's model: a quantize step with ops counted as text fails.
    report["steps"][-1]["details"]["quantized_ops"] = "many"
    assert any("quantized_ops" in e for e in schema_errors(schema, report))
    # ... and the envelope's types hold: a size in words is not a size.
    report = json.loads(finished.read_text())
    report["steps"][0]["size_bytes"] = "big"
    assert schema_errors(schema, report)


def test_schema_without_report_still_prints_the_recipe_schema():
    schema = run_cli("schema").json()
    assert "passes" in schema["properties"] and "steps" not in schema["properties"]


# --------------------------------------------------------------------------- compare reads only what it can


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_compare_refuses_a_foreign_json_file_with_one_line(finished, tmp_path):
    foreign = tmp_path / "package.json"
    foreign.write_text(json.dumps({"name": "left-pad", "version": "1.3.0"}))
    line = _one_line_exit_2(run_cli("compare", foreign, finished))
    assert "package.json is not an optcli report.json" in line and "report.json of an optcli run" in line
    wrong = tmp_path / "wrong" / "report.json"
    wrong.parent.mkdir()
    data = json.loads(finished.read_text())
    data["steps"][-1]["size_bytes"] = "big"
    wrong.write_text(json.dumps(data))
    line = _one_line_exit_2(run_cli("compare", wrong, finished))
    assert "steps.2.size_bytes" in line


@pytest.mark.parametrize(("version", "says"), [(0, "older than this optcli reads"), (99, "newer than this optcli")])
def test_compare_refuses_a_report_of_another_schema_version_with_one_line(finished, tmp_path, version, says):
    other = tmp_path / "report.json"
    other.write_text(json.dumps({**json.loads(finished.read_text()), "schema_version": version}))
    line = _one_line_exit_2(run_cli("compare", other, finished))
    assert f"schema_version {version}" in line and says in line


def test_compare_reads_an_older_report_whose_change_was_a_rename(finished, tmp_path, monkeypatch):
    # As if this optcli wrote schema 2, where "evaluation" was called "evaluated_on" in schema 1.
    def rename(data: dict) -> dict:
        data["evaluation"] = data.pop("evaluated_on")
        return data

    monkeypatch.setattr(model, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(model, "MIGRATIONS", {1: rename})
    new = {**json.loads(finished.read_text()), "schema_version": 2}
    (tmp_path / "new.json").write_text(json.dumps(new))
    old = json.loads(finished.read_text())
    old["evaluated_on"] = old.pop("evaluation")
    (tmp_path / "report.json").write_text(json.dumps(old))
    result = run_cli("compare", tmp_path / "new.json", tmp_path / "report.json")
    assert result.exit_code == 0, result.stderr
    assert "accuracy/fidelity were measured on different inputs" not in result.stdout  # renamed back: the same


def test_compare_still_reads_a_report_written_before_schema_version(finished, tmp_path):
    data = json.loads(finished.read_text())
    del data["schema_version"]
    (tmp_path / "report.json").write_text(json.dumps(data))
    assert run_cli("compare", tmp_path / "report.json", finished, "--json").exit_code == 0


# --------------------------------------------------------------------------- the API returns the contract


def test_api_report_is_the_report_contract(finished):
    from optcli import api

    assert api.Report is model.Report and api.Step is model.Step and api.Gate is model.Gate
    report = api.Report.from_dict(json.loads(finished.read_text()), finished.parent)
    assert report.data == json.loads(finished.read_text())
    assert report.paths.report_json == finished and report.paths.model == finished.parent / "model.onnx"
    assert report.steps[-1].latency["batch_1"].p50_ms == report.data["steps"][-1]["latency"]["batch_1"]["p50_ms"]


# --------------------------------------------------------------------------- one document, three renderers


def test_markdown_html_and_terminal_show_the_same_sections_of_a_real_report(finished):
    from report_sections import assert_same_sections

    assert_same_sections(json.loads(finished.read_text()))
