"""The import layering of the package (the contract's rules), read from the source with `ast`.

Imports inside functions count (a lazy import is still a dependency), except for the torch-free
rule, which is about what importing a module loads: there only module-level imports count, and a
subprocess checks that importing the torch-free modules really leaves torch unloaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unipan"


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name of the imported module (or of the package a name comes from)
    names: tuple[str, ...]  # `from module import a, b`: ("a", "b"); `import module`: ()
    line: int
    module_level: bool  # not inside a function (class bodies, if/try at the top level count)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, (), child.lineno, not in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                names = tuple(a.name for a in child.names)
                found.append(Import(_resolve(path, child), names, child.lineno, not in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def imported_modules(imp: Import) -> list[str]:
    """Every module an import may bind: `from a.b import c` may import the submodule a.b.c."""
    return [imp.module] + [f"{imp.module}.{n}" for n in imp.names if n != "*"]


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


SOURCES = sorted(PACKAGE.rglob("*.py"))
IMPORTS = {path: imports_of(path) for path in SOURCES}


def files(folder: str) -> list[Path]:
    """The modules of the subpackage `unipan/<folder>/`."""
    return [p for p in SOURCES if p.relative_to(PACKAGE).parts[0] == folder]


def violations(paths: list[Path], forbidden: str, module_level_only: bool = False) -> list[str]:
    out = []
    for path in paths:
        for imp in IMPORTS[path]:
            if module_level_only and not imp.module_level:
                continue
            if within(imp.module, forbidden):
                out.append(f"{path.relative_to(PACKAGE.parent)}:{imp.line} imports {imp.module}")
    return out


def test_the_sources_are_found() -> None:
    assert len(SOURCES) > 30
    assert all(within(module_name(p), "unipan") for p in SOURCES)
    # relative imports resolve (the package uses absolute ones, but a relative one must not hide)
    assert all(imp.module for imps in IMPORTS.values() for imp in imps)


def test_fusion_imports_no_config() -> None:
    assert not violations(files("fusion"), "unipan.config")


def test_engine_never_imports_the_predictor() -> None:
    assert not violations(files("engine"), "unipan.predictor")


def test_predictor_imports_no_fusion() -> None:
    assert not violations([PACKAGE / "predictor.py"], "unipan.fusion")


def test_model_files_do_not_import_each_other() -> None:
    folder = PACKAGE / "modeling" / "models"
    model_files = sorted(p for p in folder.glob("*.py") if p.name != "__init__.py")
    assert model_files
    bad = []
    for path in model_files:
        siblings = {module_name(p) for p in model_files if p != path} | {"unipan.modeling.models"}
        for imp in IMPORTS[path]:
            # `from unipan.modeling.models import upsnet` imports a sibling too
            hits = [m for m in imported_modules(imp) if m in siblings and m != "unipan.modeling.models"]
            if imp.module == "unipan.modeling.models" or hits:
                bad.append(f"{path.name}:{imp.line} imports {imp.module} {list(imp.names)}")
    assert not bad


def test_segments_imports_only_structures_from_the_package() -> None:
    path = PACKAGE / "segments.py"
    assert path.is_file(), "unipan/segments.py (the one home of id-map operations) is missing"
    bad = [
        f"line {imp.line}: {imp.module}"
        for imp in IMPORTS[path]
        if within(imp.module, "unipan") and imp.module != "unipan.structures"
    ]
    assert not bad


TORCH_FREE = [*sorted(files("config")), PACKAGE / "fusion" / "settings.py"]


@pytest.mark.parametrize("path", TORCH_FREE, ids=[str(p.relative_to(PACKAGE)) for p in TORCH_FREE])
def test_torch_free_modules_import_no_torch(path: Path) -> None:
    assert not violations([path], "torch", module_level_only=True)


def test_importing_the_torch_free_modules_loads_no_torch() -> None:
    code = (
        "import sys, unipan.config, unipan.fusion.settings, unipan.config.models, unipan.config.parts; "
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
        "print(loaded[:5]); sys.exit(1 if loaded else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
