"""Hardware profiles: sizes written by people, built-in profiles, saving and loading."""
import json

import pytest

from flexserve.errors import PolicyError
from flexserve.planner.hardware import (Hardware, default_profile_path, format_size, load_hardware, parse_size,
                                        profile, resolve_hardware, save_hardware)


@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * 2**30), ("1.5TB", 1_500_000_000_000), ("200G", 200 * 2**30), ("512MB", 512_000_000),
    ("208 GB", 208_000_000_000), ("1024", 1024), ("0", 0), ("2tib", 2 * 2**40), ("3e9", 3_000_000_000),
    (4096, 4096), ("64KiB", 65536),
])
def test_parse_size_accepts_human_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-5GB", "16 GiBs", "12XB", "1.5.3GB", "lots", "nan", -1,
                                  float("inf"), True])
def test_parse_size_rejects_nonsense_with_a_policy_error(text):
    with pytest.raises(PolicyError) as e:
        parse_size(text)
    assert repr(text).strip("'") in str(e.value) or "size" in str(e.value)


def test_parse_size_error_names_the_units():
    with pytest.raises(PolicyError, match="GiB"):
        parse_size("12XB")


def test_builtin_profiles_carry_reference_figures():
    h100 = profile("h100")
    assert h100.h2d_pinned_bw == pytest.approx(53.1e9)
    assert h100.h2d_pageable_bw == pytest.approx(7.1e9)
    assert h100.gpu_flops("float16") == pytest.approx(785e12)
    assert h100.gpu_flops("bf16") == pytest.approx(777e12)
    t4 = profile("T4")
    assert (t4.gpu_mem, t4.cpu_mem, t4.disk) == (16e9, 208e9, 1.5e12)
    assert t4.gpu_flops("float16") > t4.gpu_flops("float32")
    with pytest.raises(PolicyError, match="built-in"):
        profile("a100")
    with pytest.raises(PolicyError, match="dtype"):
        t4.gpu_flops("int3")


def test_with_memory_caps_only_the_given_tiers():
    hw = profile("h100").with_memory(gpu_mem=16e9)
    assert hw.gpu_mem == 16e9 and hw.cpu_mem == profile("h100").cpu_mem


def test_save_and_load_roundtrip_in_the_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_profile_path() == str(tmp_path / "flexserve" / "hardware.json")
    path = save_hardware(profile("t4"))
    assert path == default_profile_path()
    assert load_hardware() == profile("t4")
    assert resolve_hardware("saved") == profile("t4")


def test_default_path_without_xdg_is_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_profile_path() == str(tmp_path / ".cache" / "flexserve" / "hardware.json")


def test_hand_written_profile_accepts_human_sizes_and_toml(tmp_path):
    data = profile("t4").to_dict()
    data.update(gpu_mem="16GiB", cpu_mem="200GiB", disk="1TB")
    del data["name"]
    path = tmp_path / "box.json"
    path.write_text(json.dumps(data))
    hw = resolve_hardware(str(path))
    assert hw.name == "box" and hw.gpu_mem == 16 * 2**30 and hw.disk == 1e12
    toml = tmp_path / "box.toml"
    toml.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in data.items()))
    assert load_hardware(str(toml)).cpu_mem == 200 * 2**30


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown hardware fields"),
    ({"h2d_pinned_bw": 0}, "h2d_pinned_bw must be > 0"),
    ({"gpu_mem": -1.0}, "gpu_mem must be >= 0"),
    ({"disk_read_bw": "fast"}, "finite number"),
])
def test_bad_profiles_are_explained(change, message):
    data = {**profile("t4").to_dict(), **change}
    with pytest.raises(PolicyError, match=message):
        Hardware.from_dict(data)


def test_missing_fields_and_files_are_explained(tmp_path):
    data = profile("t4").to_dict()
    del data["cpu_flops"]
    with pytest.raises(PolicyError, match="lacks .*cpu_flops"):
        Hardware.from_dict(data)
    with pytest.raises(PolicyError, match="flexserve calibrate"):
        load_hardware(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match="not valid"):
        load_hardware(str(bad))
    with pytest.raises(PolicyError, match="neither"):
        resolve_hardware("my-laptop")


def test_format_size():
    assert format_size(16e9) == "16.0 GB"
    assert format_size(1.5e12) == "1.5 TB"
    assert format_size(12) == "12 B"
