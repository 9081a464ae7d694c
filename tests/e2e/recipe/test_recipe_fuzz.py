"""Generated recipes: `optcli validate` accepts each one or refuses it with exit 2 and one line; never a traceback, never a hang."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from conftest import digits_recipe, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optcli.errors import BadInput
from optcli.passes import pass_types
from optcli.recipe import load_recipe

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "static",
            "dynamic",
            "int8",
            "uint8",
            "minmax",
            "entropy",
            "auto",
            "1e400",
            ".nan",
            "-1",
            "x",
            "a:b",
            "../../etc/passwd",
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
PATHS = [
    "seed",
    "model",
    "model.path",
    "model.factory",
    "model.factory_kwargs",
    "model.inputs",
    "model.inputs.0",
    "model.inputs.0.shape",
    "model.inputs.0.dtype",
    "model.trust_pickle",
    "data",
    "data.eval",
    "data.eval.samples",
    "data.eval.batch_size",
    "data.eval.labels",
    "data.eval.metric",
    "data.calibration.path",
    "data.calibration.seed",
    "report.latency.batch_sizes",
    "report.latency.runs",
    "report.latency.threads",
    "report.fidelity_samples",
    "gates.max_accuracy_drop",
    "gates.min_speedup",
    "gates.max_size_bytes",
    "passes",
    "passes.0",
    "passes.0.opset",
    "passes.0.atol",
    "passes.1.mode",
    "passes.1.calibration",
    "passes.1.calibration.samples",
    "passes.1.exclude",
    "passes.1.extra_options",
    "unknown",
    "passes.0.unknown",
]
OPTIONS = [
    "mode",
    "opset",
    "per_channel",
    "sparsity",
    "epochs",
    "lr",
    "method",
    "scope",
    "exporter",
    "calibration",
    "exclude",
    "structured",
    "distill",
]
PASS = st.builds(
    lambda t, opts: {"type": t, **opts},
    st.sampled_from([*pass_types(), "bogus", ""]),
    st.dictionaries(st.sampled_from(OPTIONS), VALUES, max_size=3),
)


def _set(raw: dict, dotted: str, value) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            return
    last = parts[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value


@st.composite
def recipes(draw, digits: Path) -> dict:
    raw = digits_recipe(
        digits, draw(st.lists(PASS, max_size=4)) if draw(st.booleans()) else [{"type": "export"}, {"type": "quantize"}]
    )
    for _ in range(draw(st.integers(0, 4))):
        _set(raw, draw(st.sampled_from(PATHS)), draw(VALUES))
    return raw


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(folder: Path, raw) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_load_recipe_accepts_or_raises_bad_input_only(digits, folder, data):
    raw = data.draw(recipes(digits))
    path = _write(folder, raw)
    started = time.perf_counter()
    try:
        load_recipe(path)
    except BadInput as e:
        assert str(e).strip(), "a refusal must say something"
    assert time.perf_counter() - started < 10


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_validate_cli_exits_0_or_2_with_one_line(digits, folder, data):
    path = _write(folder, data.draw(recipes(digits)))
    result = run_cli("validate", path)
    assert result.exit_code in (0, 2), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    if result.exit_code == 2:
        assert lines[0].startswith("error: ") and "internal error" not in lines[0], lines[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.lists(
        st.sampled_from(
            [*"model:path-[]{}&*!|>'\"#%@`,? \n\t0123456789.:abc", "!!python/object ", "*a", "&a ", "<<: "]
        ),
        max_size=60,
    ).map("".join)
)
def test_arbitrary_yaml_text_is_refused_as_bad_input(folder, text):
    # Any other exception type (ConstructorError, RecursionError, TypeError ...) fails the test.
    path = folder / "text.yaml"
    path.write_text(text)
    with pytest.raises(BadInput, match=r"\S"):
        load_recipe(path)
