"""The README's table of planned policies is what `flexserve plan` prints for the commands above it."""
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SECTION = README[README.index("## The FlexGen paper's setting"):]
COMMANDS = re.findall(r"^flexserve (plan .*)$", SECTION.split("```")[1], re.MULTILINE)
ROWS = re.findall(r"^\| (OPT-[^|]+) \| `([^`]+)` \| ([0-9.]+)", SECTION, re.MULTILINE)


def test_the_section_has_a_command_per_row():
    assert len(COMMANDS) == len(ROWS) == 3


@pytest.mark.parametrize("i", range(3))
def test_plan_prints_the_documented_policy(cli, i):
    rc, out, _ = cli(*COMMANDS[i].split())
    assert rc == 0
    name, flags, decode = ROWS[i]
    assert re.search(r"^flags\s+" + re.escape(flags) + r"\s*$", out, re.MULTILINE), (name, out)
    printed = re.search(r"^predicted .*decode ([0-9.]+) tok/s", out, re.MULTILINE)
    assert printed and float(printed.group(1)) == pytest.approx(float(decode), rel=0.01), (name, printed)
