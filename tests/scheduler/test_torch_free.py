"""The scheduling core must stay importable and testable without torch (DESIGN.md, STYLE.md)."""
import ast
from pathlib import Path

import flexserve.scheduler

ALLOWED_OUTSIDE = {"flexserve.errors"}


def test_scheduler_modules_import_no_torch_and_nothing_heavy_from_the_package():
    root = Path(flexserve.scheduler.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    names = [node.module or ""]
                elif node.level == 1:
                    continue  # within flexserve.scheduler
                else:
                    names = ["flexserve." + (node.module or "")]
            else:
                continue
            for name in names:
                assert not name.split(".")[0] == "torch", f"{path.name} imports {name}"
                if name.startswith("flexserve"):
                    assert name in ALLOWED_OUTSIDE, f"{path.name} imports {name}"
