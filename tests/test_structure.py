"""The package's shape: data flows one way, so no two jaxformer modules import each other.

Every import in jaxformer/ counts, the lazy ones inside functions too (they still tie the modules
together; they only hide the circle from Python's import-time check).
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxformer"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the jaxformer modules it imports anywhere in its source (a submodule named in
    `from pkg import sub` counts as that submodule)."""
    files = {_module_name(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            for target in targets:
                while target and target not in files:  # `import jaxformer.a.b` with b a function: a
                    target = target.rpartition(".")[0]
                if target and target != name and target != "jaxformer":
                    graph[name].add(target)
    return graph


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "jaxformer.model" in graph["jaxformer.translate"]    # at the top of the file
    assert "jaxformer.data" in graph["jaxformer.io.runs"]  # inside read()


def test_the_imports_form_no_circle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError(f"import circle: {' -> '.join(path[path.index(dep):] + [dep])}")
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


# The flow of data, lowest first: a module may import only modules of a lower stage (or of its own package).
STAGES = {
    "jaxformer.ops": 0, "jaxformer.config": 0, "jaxformer.synthetic": 0, "jaxformer.preemption": 0,
    "jaxformer.metrics": 0, "jaxformer.bleu": 0, "jaxformer.parseval": 0, "jaxformer.loss": 0, "jaxformer.optim": 0,
    "jaxformer.parallel": 0, "jaxformer.grammar": 0, "jaxformer.lines": 0, "jaxformer.staging": 0,
    "jaxformer.attention": 1, "jaxformer.data": 1, "jaxformer.choose": 1, "jaxformer.layout": 1,
    "jaxformer.decode_cache": 2, "jaxformer.decode_masks": 2, "jaxformer.decode_rows": 3,
    "jaxformer.model": 3,
    "jaxformer.steps": 4, "jaxformer.checkpoint": 4, "jaxformer.decode": 4, "jaxformer.alignment": 4,
    "jaxformer.translate": 5, "jaxformer.run_config": 5,
    "jaxformer.io": 6, "jaxformer.plotting": 6, "jaxformer.parsing": 6,
    "jaxformer.evaluate": 7, "jaxformer.validation": 7,
    "jaxformer.train": 8, "jaxformer.cli_args": 8,
    "jaxformer.cli": 9,
    "jaxformer": 10,
}


def _stage(module: str) -> tuple[str, int]:
    for prefix in sorted(STAGES, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, STAGES[prefix]
    raise AssertionError(f"{module} has no place in STAGES: add it where the flow of data puts it")


def test_nothing_imports_upward():
    upward = []
    for module, deps in import_graph().items():
        package, stage = _stage(module)
        for dep in deps:
            dep_package, dep_stage = _stage(dep)
            if dep_stage >= stage and dep_package != package:
                upward.append(f"{module} -> {dep}")
    assert not upward, f"imports against the flow of data: {upward}"


def test_the_model_options_are_the_same_in_the_config_and_the_model():
    """`default_config().model` (config.py) and `TransformerConfig`'s defaults (model.py) list the same options
    with the same values; vocab_size and pad_id are the vocabulary's, not options."""
    import dataclasses

    from jaxformer.config import default_config
    from jaxformer.data import PAD_ID
    from jaxformer.model import TransformerConfig

    config = default_config().model.to_dict()
    fields = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    assert fields.pop("pad_id") == PAD_ID
    fields.pop("vocab_size")
    model = fields
    assert sorted(config) == sorted(model), (f"only in config.py: {sorted(set(config) - set(model))}; only in "
                                             f"model.py: {sorted(set(model) - set(config))}")
    differ = {key: (config[key], model[key]) for key in model if config[key] != model[key]}
    assert not differ, f"(config.py, model.py) defaults differ: {differ}"


TESTS = pathlib.Path(__file__).resolve().parent


def test_no_test_module_imports_another():
    """What tests share lives in tests/helpers.py (plain functions, constants) and tests/conftest.py (fixtures,
    and the settings that must come before jax is imported): a test module that imports another ties the two
    together and pulls in its fixtures and imports."""
    test_modules = {p.stem for p in TESTS.glob("test_*.py")}
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module in (None, "tests"):  # from . / from tests import x
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[-1] in test_modules and (len(parts) == 1 or parts[:-1] == ["tests"]):
                    found.append(f"{path.name}:{node.lineno} imports {name}")
    assert not found, f"test modules importing test modules (move the shared code to helpers.py or conftest.py): {found}"
