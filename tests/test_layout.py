"""The package's shape: few flat modules, small modules, no import circle, public names in place."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import sftcore
from sftcore.options import HOST_OPTIONS

PACKAGE = Path(sftcore.__file__).resolve().parent
ROOT = PACKAGE.parent
PUBLIC = ("sftcore", "sftcore.hookspecs", "sftcore.protocols", "sftcore.errors", "sftcore.tokens", "sftcore.testing", "sftcore.cli")
MAX_FLAT = 13
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every module of sftcore (and the built-in plugins) by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "plugins").glob("*.py")):
        found["sftcore_plugins." + path.stem if path.stem != "__init__" else "sftcore_plugins"] = path
    return found


def module_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The sftcore modules ``name`` imports when it is imported: top-level statements only, not
    function bodies or ``if TYPE_CHECKING:`` blocks; importing ``a.b.c`` imports ``a`` and ``a.b`` too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.With):
                visit(node.body)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    with_parents = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 2)}
    return {t for t in with_parents if t in known and t != name}


def test_at_most_thirteen_modules_sit_flat_in_the_package():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(flat) <= MAX_FLAT, f"{len(flat)} flat modules: {flat}; put new ones under data/, run/, model/ or commands/"


def test_the_data_path_and_the_run_loop_are_subpackages():
    for package in ("data", "run", "model", "commands"):
        assert (PACKAGE / package / "__init__.py").is_file(), package
    assert (PACKAGE / "data" / "pipeline.py").is_file() and (PACKAGE / "run" / "train.py").is_file()


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_400_lines(name):
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it"


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> the modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (circle := walk(target)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (circle := walk(name)):
            return circle
    return None


def test_no_import_circle_at_module_level():
    found = modules()
    circle = find_circle({name: module_level_imports(path, name, set(found)) for name, path in found.items()})
    assert circle is None, "import circle at module level: " + " -> ".join(circle or [])


def test_the_circle_check_sees_a_circle(tmp_path):
    """The check above would fail on a circle (its graph builder reads the imports it must)."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from sftcore.b import x\n")
    b.write_text("import sftcore.a\nif TYPE_CHECKING:\n    import sftcore.c\n\ndef f():\n    import sftcore.c\n")
    known = {"sftcore", "sftcore.a", "sftcore.b", "sftcore.c"}
    assert module_level_imports(a, "sftcore.a", known) == {"sftcore", "sftcore.b"}
    assert module_level_imports(b, "sftcore.b", known) == {"sftcore", "sftcore.a"}
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_public_names_plugin_authors_import_still_work():
    code = "; ".join(f"import {name}" for name in PUBLIC) + "; from sftcore import hookimpl, IGNORE_INDEX, RowDropped, SftError"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "sftcore.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Usage:" in result.stdout, result.stderr


@pytest.mark.parametrize("stage, option", [(s, o) for s, options in HOST_OPTIONS.items() for o in options])
def test_every_host_provided_option_is_documented(stage, option):
    hookspecs = importlib.import_module("sftcore.hookspecs").__doc__
    assert any(line.split()[:2] == [stage, option] for line in hookspecs.splitlines()), f"{stage} {option} in hookspecs.py"
    docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert f"| {stage} | `{option}` |" in docs, f"{stage} {option} in docs/plugins.md"


def test_the_layout_section_of_the_plugin_docs_names_every_module():
    docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    section = docs[docs.index("## How sftcore is laid out"):]
    block = section[section.index("```"):section.index("```", section.index("```") + 3)]
    named = set(block.split())
    missing = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and p.name not in named and p.parent.name != "commands"  # one per subcommand
    )
    missing += sorted(f"{d.name}/" for d in PACKAGE.iterdir() if (d / "__init__.py").is_file() and f"{d.name}/" not in named)
    assert not missing, f"docs/plugins.md, 'How sftcore is laid out', does not name: {missing}"
