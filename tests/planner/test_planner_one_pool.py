"""One memory counted once: on a CPU (or unified-memory) machine the GPU and CPU tiers are the same RAM, and
`--policy auto` never returns a policy that the executor's own memory check then refuses."""
import dataclasses

import pytest
import torch

from flexserve.config import PRESETS, preset
from flexserve.errors import PolicyError
from flexserve.offload.budget import check_fits, tier_needs
from flexserve.planner import auto_plan, profile, save_hardware, search
from flexserve.planner.hardware import GIB

# a CPU-only box as `flexserve calibrate` describes one: the "GPU" is the CPU and its memory the host's 23 GiB
CPU_BOX = dataclasses.replace(profile("t4"), name="cpu-box", gpu_mem=23 * GIB, cpu_mem=23 * GIB, disk=80e9,
                              unified_memory=True)
SHAPES = dict(gpu_batch_sizes=(1, 4, 16, 64), num_gpu_batches=(1, 2, 4))


def test_one_pool_holds_both_tiers_once():
    plan = search(preset("opt-13b"), CPU_BOX, 512, 32, **SHAPES)
    peaks = plan.estimate.peak_bytes
    pool = CPU_BOX.pool_limit()
    assert pool == pytest.approx(23 * GIB * (1 - CPU_BOX.host_reserve))
    assert peaks["gpu"] + peaks["cpu"] <= pool * (1 + 1e-9)
    assert not plan.estimate.overflows(CPU_BOX)
    # counted as two memories, the same box yields a plan that needs more than the RAM there is
    two = search(preset("opt-13b"), dataclasses.replace(CPU_BOX, unified_memory=False), 512, 32, **SHAPES)
    both = two.estimate.peak_bytes["gpu"] + two.estimate.peak_bytes["cpu"]
    assert both > pool
    assert any("one memory" in line for line in two.estimate.overflows(CPU_BOX))


def test_a_model_larger_than_the_pool_goes_to_disk_or_is_refused_with_the_pool_named():
    small_disk = dataclasses.replace(CPU_BOX, disk=0.0)
    with pytest.raises(PolicyError, match="one pool for the GPU and CPU tiers"):
        search(preset("opt-30b"), small_disk, 512, 32)
    plan = search(preset("opt-30b"), CPU_BOX, 512, 32, **SHAPES)
    assert plan.policy.w_gpu_percent + plan.policy.w_cpu_percent < 100


def test_unified_memory_round_trips_and_is_checked(tmp_path):
    path = tmp_path / "box.json"
    save_hardware(CPU_BOX, str(path))
    from flexserve.planner import load_hardware

    assert load_hardware(str(path)).unified_memory is True
    with pytest.raises(PolicyError, match="unified_memory"):
        dataclasses.replace(CPU_BOX, unified_memory=1)


@pytest.fixture
def saved_t4(tmp_path, monkeypatch):
    """This machine planned with fixed rates (no calibration in tests); its sizes are what it has free."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    save_hardware(dataclasses.replace(profile("t4"), disk=200e9))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_auto_on_the_cpu_passes_the_executor_check_or_says_why(name, saved_t4):
    config, dtype_bytes = preset(name), 4  # the executor computes in float32 on a CPU
    try:
        plan = auto_plan(config, 128, 8, dtype_bytes=dtype_bytes, device="cpu", **SHAPES)
    except PolicyError as e:
        assert "fit" in str(e) or "needs" in str(e)
        return
    assert plan.hardware.unified_memory
    for t in tier_needs(config, plan.policy, dtype_bytes, 136, torch.device("cpu")):
        assert t.shortfall == 0, t
    check_fits(config, plan.policy, dtype_bytes, 136, torch.device("cpu"))


def test_auto_lowers_the_pool_until_the_executor_agrees(saved_t4, monkeypatch):
    """When the executor counts less memory free than the profile (RAM taken since calibration), the plan
    shrinks until its check passes."""
    import flexserve.offload.budget as budget

    free = 3 * GIB
    monkeypatch.setattr(budget, "available", lambda device: budget.TierBytes(free, free, 0))
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=40 * GIB))
    config = preset("opt-1.3b")
    plan = auto_plan(config, 128, 8, dtype_bytes=4, device="cpu", **SHAPES)
    check_fits(config, plan.policy, 4, 136, torch.device("cpu"))
    gpu, _ = tier_needs(config, plan.policy, 4, 136, torch.device("cpu"))
    assert gpu.need <= free and plan.hardware.gpu_mem < 40 * GIB
