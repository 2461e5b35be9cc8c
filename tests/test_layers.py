"""The layers of docs/architecture.md hold: every import inside llm_module goes down the picture.

A module may import its own package and anything on a lower floor, never a higher one: the engine uses
serving, serving never the engine; training never imports the engine or the server. A new module whose
floor is not listed fails here until it is given one (and drawn in docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llm_module"

FLOORS = {  # lowest first
    "errors": 0,
    "paths": 1, "settings": 1, "options": 1, "prompts": 1,
    "loader": 2, "adapter_files": 2,
    "runtime": 3,
    "training": 4,
    "data": 5, "export": 5, "serving": 5,
    "engine": 6,
    "actions": 7,
    "server": 8,
    "llm": 9, "cli": 9, "__init__": 9, "config": 9,  # config: JSORC's action config, an entry like llm
    "__main__": 10,
}


def part_of(path: Path) -> str:
    """The top-level module or package of llm_module a file belongs to."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def imported_parts(path: Path, package_dir: Path = PACKAGE) -> set[str]:
    module = ".".join(path.relative_to(package_dir.parent).with_suffix("").parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            names = [name] + ([f"{name}.{alias.name}" for alias in node.names] if name == "llm_module" else [])
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("llm_module.")}
    # `from llm_module import __version__` names a value, not a part
    return {p for p in found if (package_dir / p).is_dir() or (package_dir / f"{p}.py").is_file()}


def test_every_part_has_a_floor():
    parts = {part_of(p) for p in PACKAGE.rglob("*.py")}
    assert parts - set(FLOORS) == set(), "give the new part a floor here and in docs/architecture.md"


def test_imports_only_go_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = part_of(path)
        for target in imported_parts(path) - {here}:
            if FLOORS[target] >= FLOORS[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {target} (floor {FLOORS[target]} "
                              f">= its own {FLOORS[here]})")
    assert upward == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test above can fail: a training module importing the engine is seen."""
    package = tmp_path / "llm_module"
    for part in ("training", "engine"):
        (package / part).mkdir(parents=True)
        (package / part / "__init__.py").write_text("", encoding="utf-8")
    trainer = package / "training" / "trainer.py"
    trainer.write_text("from ..engine import Engine\nfrom ..errors import InvalidInput\n", encoding="utf-8")
    (package / "errors.py").write_text("", encoding="utf-8")
    assert imported_parts(trainer, package) == {"engine", "errors"}
