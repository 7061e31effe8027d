"""Mistakes users make get one clear message and a non-zero exit, never a traceback."""
import json
import os
import shutil

import pytest

from flexserve import LLM, ModelLoadError, Policy, PolicyError, PromptTooLongError, RequestError, SamplingParams
from flexserve.cli import main
from flexserve.weights import default_model_path


def run_cli(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_missing_model_path(capsys, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    rc, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "hi")
    assert rc == 1 and "does not exist" in err and "Traceback" not in err


def test_unknown_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 8}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))
    rc, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "hi")
    assert rc == 1 and "GPT2LMHeadModel" in err


def test_folder_without_weights(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(str(tmp_path))


def test_truncated_safetensors(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    for f in os.listdir(folder):
        shutil.copy(os.path.join(folder, f), tmp_path / f)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated|cannot read"):
        LLM(str(tmp_path), dtype="float32", device="cpu")


def test_garbage_safetensors_header(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        LLM(str(tmp_path))


def test_truncated_gguf(tmp_path, capsys):
    data = open(default_model_path(), "rb").read()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="GGUF"):
        LLM(str(bad))
    rc, _, err = run_cli(capsys, "generate", "--model", str(bad), "hi")
    assert rc == 1 and "GGUF" in err and "Traceback" not in err


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"123")
    with pytest.raises(ModelLoadError, match="neither"):
        LLM(str(f))


def test_unknown_preset():
    with pytest.raises(ModelLoadError, match="unknown preset"):
        LLM("dummy:opt-7t")


def test_prompt_longer_than_context(tiny_model):
    folder, _ = tiny_model("llama-gqa")  # context window 128
    with LLM(folder, dtype="float32", device="cpu") as llm:
        with pytest.raises(PromptTooLongError, match="context window is 128"):
            llm.generate({"prompt_token_ids": [5] * 200})
        # a prompt that fits still works afterwards, and generation is clipped to the window
        out = llm.generate({"prompt_token_ids": [5] * 120}, SamplingParams(max_tokens=50, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 8 and out[0].outputs[0].finish_reason == "length"
        with pytest.raises(RequestError, match="empty"):
            llm.generate({"prompt_token_ids": []})
        with pytest.raises(RequestError, match="token ids"):
            llm.generate({"prompt_token_ids": [1, 10_000]})


@pytest.mark.parametrize("kw, msg", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_k": -5}, "top_k"), ({"n": 0}, "n must"),
    ({"logprobs": 99}, "logprobs"),
])
def test_bad_sampling_values(kw, msg):
    with pytest.raises(RequestError, match=msg):
        SamplingParams(**kw)


def test_bad_sampling_values_on_cli(capsys):
    rc, _, err = run_cli(capsys, "generate", "--model", "dummy:opt-125m", "--temperature", "-2", "hi")
    assert rc == 1 and "temperature" in err


def test_prompt_too_long_on_cli(capsys):
    rc, _, err = run_cli(capsys, "generate", "--raw", "--device", "cpu", "hello " * 9000)
    assert rc == 1 and "context window is 8192" in err and "Traceback" not in err


def test_cli_process_reports_errors_without_a_traceback(tmp_path):
    """The installed entry point, as a user runs it: one line on stderr, exit status 1."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "flexserve.cli", "generate", "--model", str(tmp_path / "nope"),
                           "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"flexserve: error: model path {str(tmp_path / 'nope')!r} does not exist"]


@pytest.mark.parametrize("flags, msg", [
    (["--num-levels", "0"], "num_levels must be >= 1"),
    (["--quantum-ratio", "0.5"], "quantum_ratio must be >= 1"),
    (["--starvation-threshold-s", "0"], "starvation_threshold_s must be > 0"),
    (["--num-gpu-blocks", "0"], "num_gpu_blocks >= 1"),
])
def test_out_of_range_engine_flags_are_one_clear_error(capsys, flags, msg):
    rc, out, err = run_cli(capsys, "bench", "serve", "--simulate", "--num-requests", "5", *flags)
    assert rc == 1 and msg in err and "Traceback" not in err and not out
