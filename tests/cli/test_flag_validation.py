"""Every out-of-range numeric flag is refused up front: exit status 1 and one line on stderr that names the flag,
before any model is loaded (a model that does not exist proves it: its error would come second)."""
import socket

import pytest

MISSING = "/nonexistent/model"  # reached only if the flags were accepted

GENERATE = [
    (["--gpu-batch-size", "0"], "--gpu-batch-size"),
    (["--gpu-batch-size", "-3"], "--gpu-batch-size"),
    (["--num-gpu-batches", "0"], "--num-gpu-batches"),
    (["--percent", "120", "0", "100", "0", "100", "0"], "--percent"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-5"], "--top-k"),
    (["-n", "0"], "-n"),
    (["--num-prompts", "0"], "--num-prompts"),
]

SERVE = [
    (["--port", "99999"], "--port"),
    (["--port", "0"], "--port"),
    (["--port", "-1"], "--port"),
    (["--drain-timeout", "-1"], "--drain-timeout"),
    (["--num-gpu-blocks", "0"], "--num-gpu-blocks"),
    (["--num-cpu-blocks", "-1"], "--num-cpu-blocks"),
    (["--block-size", "0"], "--block-size"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--max-num-batched-tokens", "-1"], "--max-num-batched-tokens"),
    (["--prefill-chunk-size", "0"], "--prefill-chunk-size"),
    (["--max-queue-len", "0"], "--max-queue-len"),
    (["--sliding-window", "-4"], "--sliding-window"),
    (["--attention-sinks", "-1"], "--attention-sinks"),
    (["--attention-sinks", "4"], "--sliding-window"),
    (["--num-levels", "0"], "num_levels"),
    (["--gpu-batch-size", "0"], "--gpu-batch-size"),
]


def _one_line_naming(rc, out, err, flag):
    lines = err.strip().splitlines()
    assert rc == 1 and not out, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("flexserve: error: ") and flag in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, flag", GENERATE, ids=[" ".join(f) for f, _ in GENERATE])
def test_generate_refuses_bad_flags(cli, flags, flag):
    _one_line_naming(*cli("generate", "--model", MISSING, *flags, "hi"), flag)


@pytest.mark.parametrize("flags, flag", SERVE, ids=[" ".join(f) for f, _ in SERVE])
def test_serve_refuses_bad_flags(cli, flags, flag):
    _one_line_naming(*cli("serve", "--model", MISSING, *flags), flag)


@pytest.mark.parametrize("flags, flag", [(["--window", "0"], "--window"), (["--stride", "0"], "--stride"),
                                         (["--window", "8", "--stride", "9"], "--stride")])
def test_ppl_refuses_bad_flags(cli, tmp_path, flags, flag):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    _one_line_naming(*cli("ppl", "--model", MISSING, str(text), *flags), flag)


BENCH = [
    (["serve", "--simulate", "--block-size", "0"], "--block-size"),
    (["serve", "--simulate", "--num-requests", "0"], "--num-requests"),
    (["serve", "--simulate", "--rate", "-1"], "--rate"),
    (["serve", "--simulate", "--cv", "0"], "--cv"),
    (["serve", "--simulate", "--max-context", "0"], "--max-context"),
    (["serve", "--simulate", "--prompt-len", "0"], "--prompt-len"),
    (["throughput", "--model", MISSING, "--prompt-len", "0"], "--prompt-len"),
    (["throughput", "--model", MISSING, "--gen-len", "-1"], "--gen-len"),
    (["throughput", "--model", MISSING, "--gpu-batch-size", "0"], "--gpu-batch-size"),
]


@pytest.mark.parametrize("flags, flag", BENCH, ids=[" ".join(f) for f, _ in BENCH])
def test_bench_refuses_bad_flags(cli, flags, flag):
    _one_line_naming(*cli("bench", *flags), flag)


def test_port_in_use_is_reported_before_the_model_loads(cli):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out, err = cli("serve", "--model", MISSING, "--port", str(port))
    _one_line_naming(rc, out, err, "--port")
    assert "in use" in err and str(port) in err


def test_disk_offload_without_folder_names_the_flag(cli):
    _one_line_naming(*cli("generate", "--model", "dummy:opt-125m", "--device", "cpu",
                          "--percent", "50", "0", "100", "0", "100", "0", "hi"), "--offload-dir")
