"""Dependencies point one way. ``pretrain.encoders`` (the timm models) needs no training code;
``pretrain.engine`` (what every job shares) needs neither the CLIP job nor fine-tuning; the CLIP
job (the rest of ``pretrain``) and ``finetune`` build on those two and never on each other; no
library code imports the demo's synthetic data; and no module imports itself through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "finetune", "data_tools")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for package in PACKAGES
           for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(module: str) -> set[str]:
    """Every project module ``module`` imports, at any depth of its code (a function's late
    import is a dependency too): ``from a import b`` names ``a.b`` when that is a module."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in names if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _offenders(importers: str, allowed: tuple[str, ...],
               forbidden: tuple[str, ...] = ()) -> list[str]:
    """Imports by modules under ``importers`` of project modules outside ``allowed`` (or inside
    ``forbidden``)."""
    return [f"{module} imports {name}" for module, names in sorted(GRAPH.items())
            if _within(module, importers) for name in sorted(names)
            if not any(_within(name, a) for a in allowed)
            or any(_within(name, f) for f in forbidden)]


def _clip_job(module: str) -> bool:
    return (_within(module, "pretrain") and not _within(module, "pretrain.engine")
            and not _within(module, "pretrain.encoders") and module != "pretrain.published")


def test_library_code_does_not_import_the_demo_data() -> None:
    users = [m for m, names in GRAPH.items() if "data_tools.synthetic" in names
             and not _within(m, "data_tools")]
    assert users == []


def test_encoders_need_no_training_code() -> None:
    assert _offenders("pretrain.encoders",
                      ("pretrain.encoders", "pretrain.published", "data_tools.files")) == []


def test_the_engine_needs_neither_the_clip_job_nor_finetuning() -> None:
    assert _offenders("pretrain.engine", ("pretrain.engine", "data_tools")) == []


def test_finetuning_builds_only_on_the_engine_and_the_encoders() -> None:
    assert _offenders("finetune", ("finetune", "pretrain.engine", "pretrain.encoders",
                                   "data_tools"), forbidden=("data_tools.synthetic",)) == []


def test_the_clip_job_does_not_import_finetuning() -> None:
    offenders = [f"{m} imports {n}" for m, names in GRAPH.items() if _clip_job(m)
                 for n in names if _within(n, "finetune")]
    assert offenders == []


def test_data_tools_import_no_training_code() -> None:
    assert _offenders("data_tools", ("data_tools",)) == []


def _cycle_from(start: str, graph: dict[str, set[str]] = GRAPH) -> list[str] | None:
    """A path of imports from ``start`` back to itself, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        module, path = stack.pop()
        for name in sorted(graph[module]):
            if name == start:
                return [*path, start]
            if name not in seen:
                seen.add(name)
                stack.append((name, [*path, name]))
    return None


def test_no_module_imports_itself_through_others() -> None:
    cycles = {" -> ".join(c) for m in MODULES if (c := _cycle_from(m)) is not None}
    assert sorted(cycles) == []


def test_the_checker_sees_imports_and_cycles() -> None:
    # the graph is read from the files (module level, late and package-relative imports alike)
    assert "pretrain.engine.config" in GRAPH["pretrain.config"]
    assert "pretrain.engine.distributed" in GRAPH["pretrain.clip_eval"]
    assert _cycle_from("a", {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle_from("a", {"a": {"b"}, "b": set()}) is None


def _readme_layout() -> set[str]:
    """The module paths the README's Layout block lists (two spaces of indent per level)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout\n", 1)[1].split("```\n", 2)[1]
    listed, parents = set(), []
    for line in block.splitlines():
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip())) // 2
        parents = parents[:depth]
        if name.endswith("/"):
            parents.append(name)
        elif name.endswith(".py"):
            listed.add("".join(parents) + name)
    return listed


def test_the_readme_lists_every_module() -> None:
    tree = {str(path.relative_to(ROOT)) for folder in (*PACKAGES, "launch")
            for path in (ROOT / folder).rglob("*.py") if path.name != "__init__.py"}
    listed = _readme_layout()
    assert sorted(tree - listed) == [], "modules the README's layout does not list"
    assert sorted(listed - tree) == [], "modules the README's layout lists but the tree lacks"
