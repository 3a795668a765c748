"""The package's layering, read from the source: which modules may import which.

model (no training knowledge) <- teachers <- engine <- stages <- pipeline <- cli. An import that
points up this list, or product code that imports the test helpers, fails here with its file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megadistill"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (top level or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    files = sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.rglob("*.py"))
    return [
        f"{p.relative_to(PACKAGE.parent)} imports {name}"
        for p in files
        if p.name != "testing.py"
        for name in sorted(_imports(p))
        if name in forbidden or name.startswith(tuple(f"{f}." for f in forbidden))
    ]


def test_no_product_module_imports_the_test_helpers():
    assert _offenders("", ("megadistill.testing",)) == []


def test_the_model_knows_no_training():
    # Stage I observes the model through a probe (stages/align.py); the model imports none of it.
    assert _offenders("model", ("megadistill.stages", "megadistill.engine", "megadistill.trainer",
                                "deepspeed")) == []  # fmt: skip


def test_stages_do_not_reach_up():
    # Exporting a stage's result is the pipeline's step; the stages never import the merge.
    up = ("megadistill.merge", "megadistill.pipeline", "megadistill.eval", "megadistill.cli")
    assert _offenders("stages", up) == []
    assert _offenders("engine", ("megadistill.stages", *up)) == []


def test_the_model_does_not_import_the_conversion():
    # The hybrid settings are one typed object (megadistill/hybrid.py) below the model.
    assert _offenders("model", ("megadistill.teachers.conversion",)) == []


def test_a_recipe_and_its_hybrid_settings_load_without_torch():
    code = (
        "import sys; import megadistill.pipeline.dag, megadistill.hybrid; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
