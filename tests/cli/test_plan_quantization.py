"""`flexserve plan --quantization X | auto`, `--kv-cache-dtype fp8`: what the command prints and refuses."""
import json
import re

import pytest

SCHEMES = ("none", "fp8", "int8", "awq", "rtn4")
TOO_BIG = ("plan", "--model", "llama-2-7b", "--hardware", "t4", "--dtype", "bfloat16", "--gpu-mem", "4GB",
           "--cpu-mem", "8GB", "--disk", "0")  # 13.5 GB of bf16 weights; 4-bit ones fit
FITS = ("plan", "--model", "opt-1.3b", "--hardware", "h100")


def _row(out: str, label: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(label))


def _table(out: str) -> dict[str, list[str]]:
    """scheme -> the rest of its row in the table `--quantization auto` prints."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(line) > 11 and not line[:11].strip() and cells and cells[0] in SCHEMES and cells[1] in ("yes", "no"):
            rows[cells[0]] = cells[1:]
    return rows


def test_auto_gives_a_4bit_plan_when_bf16_does_not_fit(cli):
    rc, out, err = cli(*TOO_BIG, "--quantization", "auto")
    assert rc == 0, err
    assert re.search(r"^flags\s.*--quantization awq", _row(out, "flags"))
    assert "auto chose awq" in _row(out, "quantize") and "does not fit the memory" in _row(out, "quantize")
    table = _table(out)
    assert list(table) == list(SCHEMES)  # each scheme tried, in quality order
    assert table["none"][0] == "no" and table["awq"][0] == "yes" and table["awq"][-1] == "chosen"
    assert float(table["awq"][1].replace(",", "")) > float(table["fp8"][1].replace(",", ""))
    assert "none does not fit:" in out
    assert "4-bit weights" in _row(out, "quality") and "bench/RESULTS.md section 6" in _row(out, "quality")


def test_auto_keeps_the_unquantized_model_that_fits(cli):
    rc, out, err = cli(*FITS, "--quantization", "auto")
    assert rc == 0, err
    assert "--quantization" not in _row(out, "flags")
    assert "auto chose none" in _row(out, "quantize")
    table = _table(out)
    assert list(table) == list(SCHEMES) and all(cells[0] == "yes" for cells in table.values())
    assert table["none"][-1] == "chosen"
    assert "weights unquantized" in _row(out, "quality")


def test_auto_json_lists_every_scheme_tried(cli):
    rc, out, _ = cli(*TOO_BIG, "--quantization", "auto", "--json")
    data = json.loads(out)
    assert data["quantization"] == data["quantization_choice"]["chosen"] == "awq"
    trials = data["quantization_choice"]["trials"]
    assert [t["scheme"] for t in trials] == [None, "fp8", "int8", "awq", "rtn4"]
    assert [t["fits"] for t in trials][0] is False and trials[0]["why_not"]


def test_fp8_plan_stores_half_the_weight_bytes(cli):
    _, bf16, _ = cli(*FITS, "--dtype", "bfloat16", "--json")
    _, fp8, _ = cli(*FITS, "--dtype", "bfloat16", "--quantization", "fp8", "--json")
    bf16, fp8 = json.loads(bf16), json.loads(fp8)
    assert fp8["policy"]["quantization"] == "fp8" and "--quantization fp8" in fp8["flags"]
    assert fp8["weight_bytes"]["per_layer"] == pytest.approx(bf16["weight_bytes"]["per_layer"] / 2, rel=1e-12)
    assert 0.5 < fp8["weight_bytes"]["total"] / bf16["weight_bytes"]["total"] < 0.6  # embeddings stay bf16
    # both plans keep everything on the GPU: the fp8 one in fewer bytes
    assert fp8["peak_bytes"]["gpu"] < bf16["peak_bytes"]["gpu"]
    assert "fp8" in fp8["quality"]


def test_kv_cache_dtype_fp8_halves_the_cache(cli):
    _, base, _ = cli(*FITS, "--json")
    _, fp8, _ = cli(*FITS, "--kv-cache-dtype", "fp8", "--json")
    base, fp8 = json.loads(base), json.loads(fp8)
    assert fp8["weight_bytes"]["kv_per_token_layer"] == pytest.approx(base["weight_bytes"]["kv_per_token_layer"] / 2)
    assert "--kv-cache-dtype fp8" in fp8["flags"] and "fp8 KV cache" in fp8["quality"]


def test_group_size_reaches_the_plan(cli):
    rc, out, err = cli(*TOO_BIG, "--quantization", "rtn4", "--quant-group-size", "64")
    assert rc == 0, err
    assert "--quantization rtn4 --quant-group-size 64" in _row(out, "flags")
    assert "group 64" in _row(out, "quality")


def test_an_unknown_scheme_is_refused_naming_the_choices(cli, capsys):
    with pytest.raises(SystemExit) as e:
        cli(*FITS, "--quantization", "fp4")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--quantization: invalid choice: 'fp4'" in err
    for scheme in ("fp8", "int8", "rtn4", "awq", "auto"):
        assert f"'{scheme}'" in err


@pytest.mark.parametrize("flags, msg", [
    (("--quantization", "fp8", "--quant-group-size", "64"), "--quant-group-size applies to the 4-bit schemes"),
    (("--quant-group-size", "64"), "--quant-group-size needs --quantization rtn4 or awq"),
    (("--quantization", "auto", "--compress"), "--quantization auto chooses the weights' scheme"),
])
def test_conflicting_quantization_flags_are_one_clear_error(cli, flags, msg):
    rc, _, err = cli(*FITS, *flags)
    assert rc == 1 and msg in err and "Traceback" not in err


def test_policy_auto_plans_with_the_quantization_flags(monkeypatch):
    """`generate --policy auto --quantization rtn4` hands the scheme to the planner, which counts its bytes in
    every candidate, instead of setting it on an unquantized plan afterwards."""
    import argparse

    import flexserve.planner as planner
    from flexserve.cli.common import add_model_arguments, add_policy_arguments, policy_from_args
    from flexserve.config import preset
    from flexserve.offload.policy import Policy

    seen = {}

    class _Plan:
        policy = Policy.from_percent((0, 100, 100, 0, 100, 0), quantization="rtn4")
        estimate = type("E", (), {"total_tok_s": 1.0, "decode_tok_s": 1.0, "bottleneck": "pcie"})()
        hardware = type("H", (), {"name": "test"})()

    def fake_auto_plan(config, prompt_len, gen_len, **kw):
        seen.update(kw)
        return _Plan()

    monkeypatch.setattr(planner, "auto_plan", fake_auto_plan)
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    add_policy_arguments(p)
    args = p.parse_args(["--policy", "auto", "--quantization", "rtn4", "--kv-cache-dtype", "fp8", "--device", "cpu"])
    policy = policy_from_args(args, preset("opt-125m"))
    assert seen["quantization"] == "rtn4" and seen["kv_cache_dtype"] == "fp8"
    assert policy.quantization == "rtn4"
