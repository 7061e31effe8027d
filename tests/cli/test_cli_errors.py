"""Mistakes on the command line get one clear message on stderr and exit status 1, never a traceback."""
import subprocess
import sys

import pytest


def test_bad_sampling_values_on_cli(cli):
    rc, out, err = cli("generate", "--model", "dummy:opt-125m", "--temperature", "-2", "hi")
    assert rc == 1 and "temperature" in err and "Traceback" not in err and not out


def test_prompt_too_long_on_cli(cli):
    rc, out, err = cli("generate", "--raw", "--device", "cpu", "hello " * 9000)
    assert rc == 1 and "context window is 8192" in err and "Traceback" not in err and not out


def test_cli_process_reports_errors_without_a_traceback(tmp_path):
    """The installed entry point, as a user runs it: one line on stderr, exit status 1."""
    proc = subprocess.run([sys.executable, "-m", "flexserve.cli", "generate", "--model", str(tmp_path / "nope"),
                           "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"flexserve: error: model path {str(tmp_path / 'nope')!r} does not exist"]


@pytest.mark.parametrize("flags, msg", [
    (["--num-levels", "0"], "--num-levels (num_levels) must be >= 1"),
    (["--quantum-ratio", "0.5"], "--quantum-ratio (quantum_ratio) must be >= 1"),
    (["--starvation-threshold-s", "0"], "--starvation-threshold-s (starvation_threshold_s) must be > 0"),
    (["--num-gpu-blocks", "0"], "--num-gpu-blocks (num_gpu_blocks) must be an integer >= 1"),
])
def test_out_of_range_engine_flags_are_one_clear_error(cli, flags, msg):
    rc, out, err = cli("bench", "serve", "--simulate", "--num-requests", "5", *flags)
    assert rc == 1 and msg in err and "Traceback" not in err and not out
