"""Host buffers registered with CUDA exactly sized (no power-of-two rounding), unregistered when dropped.

CI has no CUDA, so the CUDA runtime is replaced by a recorder; the logic under test is ours: page alignment,
exact size, the unregister on garbage collection, and the plain path without CUDA."""
import gc

import torch

from flexserve.memory import pinned


class FakeCudart:
    def __init__(self, ok: bool = True):
        self.ok = ok
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr, size, flags):
        if self.ok:
            self.registered[ptr] = size
        return 0 if self.ok else 1

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


def test_without_cuda_nothing_is_pinned():
    t = pinned.pinned_empty((3, 5), torch.float16)
    assert t.shape == (3, 5) and t.dtype == torch.float16 and not hasattr(t, "_pinned_owner")


def test_large_buffer_is_registered_exactly_and_released(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    t = pinned.pinned_empty((7, 1000, 3), torch.bfloat16, min_register_bytes=0)
    assert t.shape == (7, 1000, 3) and t.dtype == torch.bfloat16
    (ptr, size), = fake.registered.items()
    assert ptr == t.data_ptr() and ptr % 4096 == 0 and size == 7 * 1000 * 3 * 2
    t.copy_(torch.arange(21000, dtype=torch.bfloat16).view(7, 1000, 3))  # the memory is usable
    assert float(t[6, 999, 2]) == float(torch.tensor(20999, dtype=torch.bfloat16))
    del t
    gc.collect()
    assert fake.unregistered == [ptr]


def test_failed_registration_falls_back_to_the_caching_allocator(monkeypatch):
    fake = FakeCudart(ok=False)
    calls = []
    real_empty = torch.empty

    def empty(*shape, **kw):
        calls.append(kw.get("pin_memory", False))
        kw.pop("pin_memory", None)
        return real_empty(*shape, **kw)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch, "empty", empty)
    t = pinned.pinned_empty((4, 4), torch.float32, min_register_bytes=0)
    assert t.shape == (4, 4) and calls[-1] is True and not fake.registered
