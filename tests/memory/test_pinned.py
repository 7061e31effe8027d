"""`pinned_empty`'s choice of allocator and the life of a registration, with the CUDA runtime replaced by a
recorder (CI has no CUDA): large buffers are registered exactly once, exactly sized, on the device asked for and
unregistered exactly once when their memory is no longer used (not while a view of it lives), so freed memory
can be allocated again; small, empty or unpinned buffers, and any buffer without CUDA, never reach
`cudaHostRegister`; a refused registration leaves nothing behind."""
import contextlib
import gc

import numpy as np
import pytest
import torch

from flexserve.memory import pinned


class Runtime:
    """What the code under test asked of CUDA, in order."""

    def __init__(self, accept=True):
        self.accept = accept
        self.calls = []  # ("register", ptr, size, device) | ("unregister", ptr) | ("alloc", fn, pin_memory)
        self.device = None  # the device made current by torch.cuda.device(...)

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size, self.device))
        return 0 if self.accept else 2

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0

    def of(self, kind):
        return [c for c in self.calls if c[0] == kind]


@pytest.fixture
def runtime(monkeypatch):
    rt = Runtime()
    real = {"empty": torch.empty, "zeros": torch.zeros}

    def allocator(name):
        def alloc(*shape, pin_memory=False, **kw):
            if shape != ((),):  # not the element-size probe
                rt.calls.append(("alloc", name, pin_memory))
            return real[name](*shape, **kw)  # pinned or not, ordinary memory here
        return alloc

    @contextlib.contextmanager
    def device(d):
        before, rt.device = rt.device, d
        yield
        rt.device = before

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch, "empty", allocator("empty"))
    monkeypatch.setattr(torch, "zeros", allocator("zeros"))
    return rt


def test_unpinned_buffers_are_plain_memory(runtime):
    t = pinned.pinned_empty((300, 300), torch.float32, pin=False, zeroed=True, min_register_bytes=0)
    assert t.shape == (300, 300) and (t == 0).all()
    assert runtime.calls == [("alloc", "zeros", False)]


@pytest.mark.parametrize("zeroed, fn", [(False, "empty"), (True, "zeros")])
def test_without_cuda_nothing_is_pinned(runtime, monkeypatch, zeroed, fn):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t = pinned.pinned_empty((300, 300), torch.float16, zeroed=zeroed, min_register_bytes=0)
    assert t.shape == (300, 300) and t.dtype == torch.float16 and (not zeroed or (t == 0).all())
    assert runtime.calls == [("alloc", fn, False)]


@pytest.mark.parametrize("shape, zeroed, fn", [((10, 10), False, "empty"), ((10, 10), True, "zeros"),
                                               ((0, 64), False, "empty")])
def test_small_and_empty_buffers_use_the_pinned_caching_allocator(runtime, shape, zeroed, fn):
    limit = 0 if shape[0] == 0 else 401  # 10 x 10 float32 is 400 bytes: just under the limit
    t = pinned.pinned_empty(shape, torch.float32, zeroed=zeroed, min_register_bytes=limit)
    assert t.shape == shape and (not zeroed or (t == 0).all())
    assert runtime.calls == [("alloc", fn, True)]


@pytest.mark.parametrize("device, current", [(None, None), (torch.device("cuda"), None),
                                             (torch.device("cuda", 1), torch.device("cuda", 1))])
def test_registration_runs_on_the_device_named(runtime, device, current):
    t = pinned.pinned_empty((1024,), torch.uint8, device=device, min_register_bytes=1024)
    (reg,) = runtime.of("register")
    assert reg[1:] == (t.data_ptr(), 1024, current) and not runtime.of("alloc")


def test_each_registration_is_undone_once_and_freed_memory_can_be_allocated_again(runtime):
    for rnd in range(3):  # allocate, use, drop; again
        bufs = [pinned.pinned_empty((n, 7), torch.float16, min_register_bytes=0) for n in (1, 600, 4097)]
        for b in bufs:
            assert (b == 0).all() and b.data_ptr() % 4096 == 0
            b.fill_(rnd + 1)
        assert [r[2] for r in runtime.of("register")[-3:]] == [14, 8400, 57358]  # exact sizes, no rounding
        ptrs = [b.data_ptr() for b in bufs]
        del bufs, b
        gc.collect()
        assert sorted(u[1] for u in runtime.of("unregister")[-3:]) == sorted(ptrs)  # all three, once dropped
    registered = [r[1] for r in runtime.of("register")]
    unregistered = [u[1] for u in runtime.of("unregister")]
    assert len(registered) == len(unregistered) == 9
    # every unregistration follows its own registration, one for one, even when an address is reused
    open_ = set()
    for call in runtime.calls:
        if call[0] == "register":
            assert call[1] not in open_
            open_.add(call[1])
        elif call[0] == "unregister":
            open_.remove(call[1])
    assert not open_ and not runtime.of("alloc")


def test_a_view_keeps_the_registration_until_it_is_gone(runtime):
    t = pinned.pinned_empty((7, 1000, 3), torch.bfloat16, min_register_bytes=0)
    assert t.shape == (7, 1000, 3) and t.dtype == torch.bfloat16 and (t == 0).all()
    ((_, ptr, size, _),) = runtime.of("register")
    assert ptr == t.data_ptr() and size == 7 * 1000 * 3 * 2
    t.copy_(torch.arange(21000, dtype=torch.bfloat16).view(7, 1000, 3))  # the memory is usable
    assert float(t[6, 999, 2]) == float(torch.tensor(20999, dtype=torch.bfloat16))
    view = t[2:].view(torch.uint8)
    del t
    gc.collect()
    assert runtime.of("unregister") == []  # a view still uses the memory: it stays registered
    assert view.numel() == 5 * 1000 * 3 * 2
    del view
    gc.collect()
    assert runtime.of("unregister") == [("unregister", ptr)]


def test_a_refused_registration_falls_back_and_clears_the_cuda_error(runtime, monkeypatch):
    runtime.accept = False
    cleared = []
    monkeypatch.setattr(pinned, "_clear_cuda_error", lambda: cleared.append(True))
    t = pinned.pinned_empty((64, 64), torch.float32, zeroed=False, min_register_bytes=0)
    assert t.shape == (64, 64) and cleared == [True]
    assert [c[0] for c in runtime.calls] == ["register", "alloc"] and runtime.calls[1] == ("alloc", "empty", True)
    del t
    gc.collect()
    assert not runtime.of("unregister")  # nothing was registered, so nothing is undone


def test_upload_keeps_values_and_dtype_on_the_cpu():
    from flexserve.memory.pinned import upload

    t = upload(np.array([3, 1, 2]), torch.int32, torch.device("cpu"))
    assert t.dtype == torch.int32 and t.tolist() == [3, 1, 2]
    assert upload([[1, 2], [3, 4]], torch.long, torch.device("cpu")).tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("dtype", [torch.int32, torch.long])
def test_upload_parts_keeps_values_and_starts_each_part_on_16_bytes(dtype):
    from flexserve.memory.pinned import upload_parts

    parts = [np.arange(5), [7], [], np.array([[1, 2, 3], [4, 5, 6]]), list(range(9))]
    got = upload_parts(parts, dtype, torch.device("cpu"))
    assert [t.tolist() for t in got] == [list(range(5)), [7], [], [1, 2, 3, 4, 5, 6], list(range(9))]
    assert all(t.dtype == dtype for t in got)
    assert all(t.data_ptr() % 16 == 0 for t in got)
