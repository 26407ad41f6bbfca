"""The shape of the package: floors imported only downward (even inside functions), no import cycle, small units,
and the method table as the one place that lists the adapter methods (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"

# Each module's floor. A module may import its own floor or lower ones, never a higher one.
FLOORS: dict[int, tuple[str, ...]] = {
    0: (  # core: configs, errors, file formats, quantization, optimizers, data, losses
        "errors", "config", "files", "quant", "quant.fast", "quant.nf4", "quant.linear4bit", "optim",
        "optim.adamw8bit", "optim.paged", "optim.factory", "optim.loraplus", "data", "data.cache", "data.collate",
        "data.config", "data.dataset", "data.encode", "data.formats", "loss", "attention", "presets", "plot", "activations",
        "hardware", "bounded_yaml", "run_lock", "model_dir",
    ),
    1: (  # layers: one file per method, each an nn.Module wrapping its base layer
        "adapters", "adapters.base", "adapters.lora", "adapters.lora_fn", "adapters.dora", "adapters.mixed", "adapters.adalora",
        "adapters.qrlora",
    ),
    2: (  # model: find targets, the method table, wrap / activate / merge, quantize or load a whole model
        "walk", "targets", "quantize", "loading", "gguf_read", "adapters.rank_allocator", "methods", "inject", "arithmetic",
        "adapters.pissa",
    ),
    3: ("compress", "io", "checkpoint", "inspect", "gguf_write"),  # files: adapters and checkpoints on disk
    4: (  # runs: recipes, training, inference, serving, planning, the CLI (and the deprecated names)
        "", "adapter_section", "recipe", "run_dir", "train", "evaluate", "generate", "plan", "plan_terms", "serve", "serve.batch", "serve.engine",
        "serve.http", "serve.openai", "serve.connections", "cli", "cli.__main__", "cli.torchrun", "__main__", "distributed", "cli.env", "cli.export", "cli.plan",
        "cli.serve", "cli.boundary", "export", "variants", "variants_io",
        "quickstart", "schedule", "step", "packed", "sweep", "sweep_space", "cli.sweep",
    ),
}  # fmt: skip
FLOOR = {name: floor for floor, names in FLOORS.items() for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    lines = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
        ):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports(name: str) -> set[str]:
    """The lorakit modules ``name`` imports anywhere in its file (functions included, ``TYPE_CHECKING`` not)."""
    tree = ast.parse(MODULES[name].read_text())
    skip, found = _type_checking_lines(tree), set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            # ``from lorakit.adapters import dora``: the submodule; ``from lorakit.io import save_adapter``: the module
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            named = [t for t in subs if t.removeprefix("lorakit.") in MODULES]
            targets = named if len(named) == len(subs) else [node.module, *named]
        else:
            continue
        for target in targets:
            if target == "lorakit" or target.startswith("lorakit."):
                module = target.removeprefix("lorakit").removeprefix(".")
                if module in MODULES and module != name:
                    found.add(module)
    return found


def test_every_module_has_a_floor():
    missing = sorted(set(MODULES) - set(FLOOR))
    assert not missing, f"give these modules a floor in FLOORS (and docs/architecture.md): {missing}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_higher_floor(name):
    upward = sorted(m for m in imports(name) if FLOOR.get(m, 99) > FLOOR.get(name, -1))
    assert not upward, f"lorakit.{name} (floor {FLOOR.get(name)}) imports higher floors: {upward}"


def test_the_import_graph_has_no_cycle():
    graph = {name: imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return [*path, node, child]
            if child not in state and (cycle := visit(child, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, f"import cycle: {' -> '.join(cycle[cycle.index(cycle[-1]) :])}"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_units_are_small():
    long_files = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long_files, f"files over 500 lines: {long_files}"
    long_functions = {f"{name}.{fn}": n for name, p in MODULES.items() for fn, n in _functions(p) if n > 80}
    assert not long_functions, f"functions over 80 lines: {long_functions}"
    train_loop = dict(_functions(MODULES["train"]))["train"]
    assert train_loop <= 100, f"train() is {train_loop} lines; keep the loop readable top to bottom"


def test_the_method_table_is_the_only_list_of_methods():
    """Method names and method config classes appear in code only in the table, the methods' own files and the
    deprecated names; everything else asks the table."""
    from lorakit.methods import METHODS

    owners = {"methods", "variants", "variants_io"}
    # LoRA is the default method (its LoraConfig is the core config every layer of lorakit reads); the others:
    words = {*METHODS, *(m.config.__name__ for m in METHODS.values())} - {"lora", "LoraConfig"}
    found = []
    for name, path in MODULES.items():
        if name in owners or name.startswith("adapters."):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in words and id(node) not in docstrings:
                found.append(f"{name}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Name) and node.id in words:
                found.append(f"{name}:{node.lineno} {node.id}")
    assert not found, f"methods listed outside lorakit.methods: {found}"
