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
    assert t.shape == (3, 5) and t.dtype == torch.float16
    assert (pinned.pinned_empty((4, 4), torch.float32, zeroed=True) == 0).all()


def test_large_buffer_is_registered_exactly_and_released_after_its_last_view(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    t = pinned.pinned_empty((7, 1000, 3), torch.bfloat16, min_register_bytes=0)
    assert t.shape == (7, 1000, 3) and t.dtype == torch.bfloat16 and (t == 0).all()
    (ptr, size), = fake.registered.items()
    assert ptr == t.data_ptr() and ptr % 4096 == 0 and size == 7 * 1000 * 3 * 2
    t.copy_(torch.arange(21000, dtype=torch.bfloat16).view(7, 1000, 3))  # the memory is usable
    assert float(t[6, 999, 2]) == float(torch.tensor(20999, dtype=torch.bfloat16))
    view = t[2:].view(torch.uint8)
    del t
    gc.collect()
    assert fake.unregistered == []  # a view still uses the memory: it stays registered
    assert view.numel() == 5 * 1000 * 3 * 2
    del view
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


def test_device_copies_go_in_pieces_that_cover_every_row(monkeypatch):
    """The chunked host->device weight copy (so small copies on other streams are not held back) moves
    exactly the requested rows, whatever the chunk size."""
    from flexserve.memory import tiers as tiers_mod
    t = tiers_mod.Tiers(torch.device("cpu"))
    t.is_cuda = True  # the chunked path; the copies themselves are ordinary CPU copies here
    src = t.store(tiers_mod.Tier.CPU, torch.arange(70 * 6, dtype=torch.float32).view(70, 6))
    for chunk in (4, 24, 100, 1 << 20):  # < one row, exact rows, uneven, all at once
        monkeypatch.setattr(tiers_mod, "COPY_CHUNK_BYTES", chunk)
        dst = torch.full((70, 6), -1.0)
        t.read_rows(src, dst, 3, 67)
        assert torch.equal(dst[3:67], src.data[3:67]) and (dst[:3] == -1).all() and (dst[67:] == -1).all()
