"""The layers the README's Architecture section describes, checked on the code: an import only points down; and the
tests' own layout (docs/testing.md): every test file in a tier folder."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "optcli"

# Lowest first. A module may import its own layer or any layer below, never one above.
LAYERS = [
    ["optcli", "optcli.config", "optcli.errors", "optcli.settings", "optcli.progress"],
    ["optcli.model", "optcli.library_warnings", "optcli.environment", "optcli.report"],
    [
        "optcli.artifact",
        "optcli.data",
        "optcli.measure",
        "optcli.abtest",
        "optcli.onnx_check",
        "optcli.onnxgraph",
        "optcli.layers",
        "optcli.hf",
        "optcli.textdata",
        "optcli.llm",  # decoder LLMs: export, measurement (its run and starter sit with the runner)
    ],
    ["optcli.passes.base"],
    ["optcli.passes.*"],  # the pass families
    ["optcli.passes"],  # the registry
    ["optcli.recipe", "optcli.verbs.catalog"],
    ["optcli.steps", "optcli.owned", "optcli.gates"],
    # the single-verb cores (inspect, bench, compare, init, sweep); an LLM recipe's run and init sit beside them
    ["optcli.runner", "optcli.verbs", "optcli.llm.run", "optcli.llm.starter"],
    ["optcli.api"],  # run / validate / sweep for Python callers; the package face re-exports it lazily (PEP 562)
    ["optcli.cli", "optcli.__main__", "optcli.examples"],  # the command line: one module per verb
]

# Named like a standard-library module before this rule; renaming them is left to the branches that own them.
STDLIB_NAMED_BEFORE_THE_RULE = {"optcli/report/html.py", "optcli/passes/quantize/profile.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int:
    best, best_len = None, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.endswith(".*"):
                base = prefix[:-2]
                if name.startswith(base + ".") and best_len < len(base) + 1:
                    best, best_len = rank, len(base) + 1
            elif (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    assert best is not None, f"{name} is in no layer of the README's picture: add it to LAYERS and the README"
    return best


def optcli_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Every `optcli.*` import in the file, at any depth (lazy imports inside functions count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optcli") and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("optcli")]
    return found


def family(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith("optcli.passes.") else name


def test_no_import_runs_back_up_a_layer():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        me = module_name(path)
        for target, _, line in optcli_imports(path):
            if family(target) == family(me):
                continue  # inside one module family (a pass's own folder, report/)
            if target.startswith("optcli.report") and me.startswith("optcli.report"):
                continue
            if layer_of(target) > layer_of(me):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} {me} imports {target}")
    assert not wrong, "imports that run up a layer:\n" + "\n".join(wrong)


def test_pass_families_do_not_import_each_other():
    wrong = []
    for path in (PACKAGE / "passes").rglob("*.py"):
        me = module_name(path)
        if me in ("optcli.passes", "optcli.passes.base"):
            continue
        for target, _, line in optcli_imports(path):
            if target.startswith("optcli.passes.") and target != "optcli.passes.base" and family(target) != family(me):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} {me} imports {target}")
    assert not wrong, "one pass family reaching into another (move the shared part down a layer):\n" + "\n".join(wrong)


def test_no_private_name_crosses_a_module_boundary():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        for target, names, line in optcli_imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} from {target} import {', '.join(private)}")
    assert not wrong, (
        "private names imported from another module (make them public, named for that use):\n" + "\n".join(wrong)
    )


def test_no_module_is_named_like_a_standard_library_module():
    # optcli/inspect.py once shadowed `inspect` for anything run with optcli/ on sys.path (a script beside it,
    # a debugger, a tool's import mode); a name of our own never does.
    stdlib = {name for name in sys.stdlib_module_names if not name.startswith("_")}
    wrong = [
        str(path.relative_to(PACKAGE.parent))
        for path in [*PACKAGE.rglob("*.py"), *(p for p in PACKAGE.rglob("*") if p.is_dir())]
        if path.stem in stdlib and str(path.relative_to(PACKAGE.parent)) not in STDLIB_NAMED_BEFORE_THE_RULE
    ]
    assert not wrong, "modules named like a standard-library module (rename them): " + ", ".join(sorted(wrong))


TESTS = REPO / "tests"
TIERS = ("unit", "e2e")


def test_every_test_file_lives_in_a_tier_folder_laid_out_like_the_code():
    wrong = [
        str(path.relative_to(REPO))
        for path in TESTS.rglob("test_*.py")
        if path.relative_to(TESTS).parts[0] not in TIERS
    ]
    assert not wrong, (
        "test files outside tests/unit or tests/e2e (move each with git mv to the tier and the folder of the code it "
        "checks, e.g. tests/e2e/passes/prune/; see docs/testing.md):\n" + "\n".join(wrong)
    )


def test_system_tests_are_end_to_end_and_ci_runs_them_while_the_quick_run_does_not():
    # `system` tests start, signal and kill processes: they belong to tests/e2e. The quick default run leaves them and
    # `slow` out (pyproject addopts); make test, which CI runs, selects everything but `slow`, so none is dropped.
    import re

    marked = [p for p in TESTS.rglob("test_*.py") if re.search(r"^@pytest\.mark\.system$", p.read_text(), re.M)]
    assert marked and all(p.relative_to(TESTS).parts[0] == "e2e" for p in marked), marked
    assert """addopts = "-m 'not slow and not system'""" in (REPO / "pyproject.toml").read_text()
    make_test = (REPO / "Makefile").read_text().split("\ntest:")[1].split("\n\n")[0]
    assert "pytest -q -n 2 -m 'not slow'" in make_test
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_test_file_names_are_unique_across_the_tiers():
    # pytest imports test files by their bare name (no __init__.py in tests/), so two of one name would collide.
    seen: dict[str, list[str]] = {}
    for path in TESTS.rglob("test_*.py"):
        seen.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    assert not [v for v in seen.values() if len(v) > 1], [v for v in seen.values() if len(v) > 1]


# The longest modules today (report/view.py, artifact.py, cli.py) are just under this; the search and the fine-tune
# loop were cut under it. A module past it has grown a second job. Every module counts, none is excused.
MAX_MODULE_LINES = 700


def module_graph() -> dict[str, set[str]]:
    """optcli module -> the optcli modules it imports, at any depth (a lazy import inside a function is an edge too:
    it runs on that call). `from optcli.x import y` points at optcli.x.y where y is a module, else at optcli.x.
    A package face's PEP 562 `__getattr__` re-export is not an edge: it loads only when that name is asked for; nor is
    an import under `if TYPE_CHECKING:`, which only the type checker reads."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for me, path in modules.items():
        tree = ast.parse(path.read_text())
        lazy = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)
        } | {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.If) and isinstance(f.test, ast.Name) and f.test.id == "TYPE_CHECKING"
            for n in ast.walk(f)
        }
        edges = set()
        for node in ast.walk(tree):
            if id(node) in lazy:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                edges |= named or {node.module}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
        graph[me] = {e for e in edges if e in modules and e != me}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_import_circle_detector_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_optcli_modules():
    circles = import_circles(module_graph())
    assert not circles, "modules that import each other (move what both need into a third module):\n" + "\n".join(
        " <-> ".join(c) for c in circles
    )


def test_no_module_outgrows_one_job():
    long = []
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines")
    assert not long, f"modules over {MAX_MODULE_LINES} lines (cut them at their seams):\n" + "\n".join(long)


# --------------------------------------------------------------------------- the report contract


def _dict_keys(path: Path, marker: str) -> list[tuple[str, int]]:
    """The constant keys of every dict literal in the file that has the key `marker`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            if marker in keys:
                found += [(k, node.lineno) for k in keys]
    return found


def test_report_keys_are_declared_once_in_the_report_model():
    """report.json's keys live in optcli/report/model.py: what the runner and the gates write is declared there."""
    from optcli.report.model import Gate, Report, Speed, Step

    undeclared = []
    for path, marker, model in (
        (PACKAGE / "runner.py", "optcli_version", Report),
        (PACKAGE / "runner.py", "details", Step),
        (PACKAGE / "runner.py", "confidence", Speed),
        (PACKAGE / "measure.py", "size_bytes", Step),
        (PACKAGE / "measure.py", "nonzero_parameters", Step),
        (PACKAGE / "gates.py", "limit", Gate),
    ):
        for key, line in _dict_keys(path, marker):
            if key not in model.model_fields:
                undeclared.append(f"{path.name}:{line} {key!r} is not declared on report.model.{model.__name__}")
    assert not undeclared, "report keys written but not declared in optcli/report/model.py:\n" + "\n".join(undeclared)


def test_the_report_contract_imports_nothing_of_optcli():
    """At the bottom: the runner, the passes' details models, compare and the API all build on it."""
    assert not optcli_imports(PACKAGE / "report" / "model.py")
    assert not optcli_imports(PACKAGE / "report" / "sections.py")


def test_every_pass_type_registers_a_details_model_declared_beside_it():
    from optcli.passes import get_pass, pass_types
    from optcli.report.model import StepDetails

    for kind in pass_types():
        spec = get_pass(kind)
        assert issubclass(spec.details, StepDetails) and spec.details is not StepDetails, (
            f"pass {kind}: declare its details model beside it and register it (PassSpec(details=...))"
        )
        assert family(spec.details.__module__) == family(spec.apply.__module__), (kind, spec.details.__module__)
        assert spec.details.model_config.get("extra") == "allow", kind  # a pass may record more than it declares


def test_report_views_read_only_details_keys_their_pass_declares():
    from optcli.passes import get_pass
    from optcli.report.passviews import VIEWS

    for kind, view in VIEWS.items():
        declared = get_pass(kind).details.model_fields
        missing = [key for key in view.reads if key not in declared]
        assert not missing, f"{type(view).__name__} reads details keys {missing} that {kind}'s details model lacks"
