"""`flexserve --help` answers at once: building the parser imports neither torch nor the planner."""
import subprocess
import sys

from flexserve.cli.plan import PLAN_DTYPES
from flexserve.planner.shapes import DTYPE_BYTES


def test_parser_imports_no_torch():
    code = ("import sys; import flexserve.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'flexserve.planner') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plan_dtype_choices_are_the_planners():
    assert set(PLAN_DTYPES) == set(DTYPE_BYTES)
