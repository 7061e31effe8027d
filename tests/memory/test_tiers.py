"""The storage and copy API of `flexserve.memory.tiers`: tensors kept on the GPU (here the CPU compute device),
CPU and disk tiers come back bit for bit; disk files live in a private folder under the offload directory and
are gone after close, at exit and when SIGINT/SIGTERM ends the process (not when the process ignores or handles
the signal and goes on); an unusable offload directory is one clear error."""
import glob
import os
import signal
import subprocess
import sys

import pytest
import torch

from flexserve.errors import PolicyError
from flexserve.memory import tiers as tiers_mod
from flexserve.memory.tiers import DiskTier, Tier, Tiers, nbytes

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


def random_bits(shape, dtype, seed=0):
    """Every bit pattern is fair game (NaNs with payloads, infinities, subnormals, -0.0): copies must be exact."""
    gen = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen).view(dtype).view(shape)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def flexserve_dirs(root):
    return glob.glob(os.path.join(str(root), "flexserve-*"))


@pytest.fixture
def tiers(tmp_path):
    t = Tiers(CPU, offload_dir=str(tmp_path))
    yield t
    t.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_tensor_split_across_the_three_tiers_comes_back_bit_exact(tiers, dtype):
    src = random_bits((23, 5, 3), dtype)
    parts = [(Tier.GPU, 0, 6), (Tier.CPU, 6, 15), (Tier.DISK, 15, 23)]
    handles = [(tiers.store(tier, src[lo:hi], name=f"part{lo}"), lo, hi) for tier, lo, hi in parts]
    assert [h.tier for h, _, _ in handles] == [Tier.GPU, Tier.CPU, Tier.DISK]
    assert handles[2][0].data is None and os.path.getsize(handles[2][0].path) == 8 * 15 * src.element_size()
    dst = torch.empty_like(src)
    for h, lo, hi in handles:
        tiers.read_rows(h, dst[lo:hi], 0, hi - lo)
    assert same_bits(dst, src)
    # the stored copies do not alias the source: changing it afterwards changes nothing that was stored
    src.zero_()
    again = torch.empty_like(dst)
    for h, lo, hi in handles:
        tiers.read_rows(h, again[lo:hi], 0, hi - lo)
    assert same_bits(again, dst)


@pytest.mark.parametrize("tier", list(Tier), ids=lambda t: t.value)
@pytest.mark.parametrize("staged", [False, True], ids=["unstaged", "staged"])
def test_rows_written_in_pieces_read_back_in_other_pieces(tiers, tier, staged):
    src = random_bits((12, 4), torch.bfloat16, seed=1)
    h = tiers.allocate(tier, (12, 4), torch.bfloat16, name="w")
    assert h.shape == (12, 4) and h.dtype == torch.bfloat16 and h.nbytes == 12 * 4 * 2
    staging = tiers.empty_cpu((12, 4), torch.bfloat16) if staged else None
    for lo, hi in [(0, 5), (5, 6), (6, 12)]:
        tiers.write_rows(h, src, lo, hi, staging=staging)
    dst = torch.full((12, 4), 7.0, dtype=torch.bfloat16)
    for lo, hi in [(0, 3), (3, 11)]:  # other boundaries than the writes: offsets are by row
        tiers.read_rows(h, dst, lo, hi, staging=staging)
    assert same_bits(dst[:11], src[:11]) and (dst[11] == 7).all()  # row 11 was not asked for
    tiers.read_rows(h, dst, 11, 11)  # an empty range is a no-op
    assert (dst[11] == 7).all()


@pytest.mark.parametrize("tier", [Tier.GPU, Tier.CPU], ids=lambda t: t.value)
def test_memory_tiers_copy_along_another_dimension(tiers, tier):
    src = random_bits((3, 10, 2), torch.float32, seed=2)
    h = tiers.allocate(tier, (3, 10, 2), torch.float32)
    tiers.write_rows(h, src, 0, 4, dim=1)
    tiers.write_rows(h, src, 4, 10, dim=1)
    dst = torch.zeros(3, 10, 2)
    tiers.read_rows(h, dst, 2, 7, dim=1)
    assert same_bits(dst[:, 2:7], src[:, 2:7]) and (dst[:, :2] == 0).all() and (dst[:, 7:] == 0).all()


def test_device_copies_go_in_pieces_that_cover_every_row(monkeypatch):
    """The chunked host->device weight copy (so small copies on other streams are not held back) moves
    exactly the requested rows, whatever the chunk size."""
    t = Tiers(CPU)
    t.is_cuda = True  # the chunked path; the copies themselves are ordinary CPU copies here
    src = t.store(Tier.CPU, torch.arange(70 * 6, dtype=torch.float32).view(70, 6))
    copies = []
    real_copy = torch.Tensor.copy_

    def copy_(dst, other, non_blocking=False):
        copies.append(dst.shape[0])
        return real_copy(dst, other, non_blocking=non_blocking)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    # 64 rows of 24 bytes: a chunk under one row, exactly four rows, ten rows and a bit (the last piece is
    # short), all at once
    for chunk, pieces in [(4, [1] * 64), (96, [4] * 16), (250, [10] * 6 + [4]), (1 << 20, [64])]:
        monkeypatch.setattr(tiers_mod, "COPY_CHUNK_BYTES", chunk)
        copies.clear()
        dst = torch.full((70, 6), -1.0)
        t.read_rows(src, dst, 3, 67)
        assert copies == pieces, chunk
        assert torch.equal(dst[3:67], src.data[3:67]) and (dst[:3] == -1).all() and (dst[67:] == -1).all()


def test_disk_files_live_in_a_private_folder_of_the_offload_dir_and_go_on_close(tmp_path):
    t = Tiers(CPU, offload_dir=str(tmp_path))
    t.store(Tier.GPU, torch.ones(3))
    t.store(Tier.CPU, torch.ones(3))
    assert flexserve_dirs(tmp_path) == []  # nothing on disk until the disk tier is used
    a = t.store(Tier.DISK, torch.arange(6.0), name="kv")
    b = t.allocate(Tier.DISK, (1000, 4), torch.float16, name="act")
    (root,) = flexserve_dirs(tmp_path)
    assert os.path.dirname(a.path) == root and os.path.basename(a.path).startswith("kv-")
    assert os.path.dirname(b.path) == root and os.path.basename(b.path).startswith("act-") and a.path != b.path
    assert os.path.getsize(b.path) == nbytes((1000, 4), torch.float16) == 8000  # allocated at full size
    other = Tiers(CPU, offload_dir=str(tmp_path))  # a second executor on the same directory
    c = other.store(Tier.DISK, torch.arange(3.0))
    assert os.path.dirname(c.path) != root
    t.close()
    assert not os.path.exists(root) and os.path.exists(c.path)  # only its own files go
    t.close()  # closing twice is harmless
    dst = torch.empty(3)
    other.read_rows(c, dst, 0, 3)
    assert dst.tolist() == [0.0, 1.0, 2.0]
    other.close()
    assert flexserve_dirs(tmp_path) == []


def test_a_missing_offload_dir_is_created(tmp_path):
    target = tmp_path / "a" / "b"
    t = Tiers(CPU, offload_dir=str(target))
    h = t.store(Tier.DISK, torch.ones(2))
    assert os.path.commonpath([h.path, str(target)]) == str(target)
    t.close()
    assert os.listdir(target) == []


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_an_unusable_offload_dir_is_one_clear_error(tmp_path, where):
    (tmp_path / "f").write_text("not a directory")
    bad = str(tmp_path / "f") if where == "a-file" else str(tmp_path / "f" / "sub")
    t = Tiers(CPU, offload_dir=bad)
    t.store(Tier.CPU, torch.ones(2))  # the memory tiers do not need it
    with pytest.raises(PolicyError, match=f"cannot use offload_dir '{bad}'"):
        t.store(Tier.DISK, torch.ones(2))


@pytest.mark.parametrize("offload_dir", [None, ""])
def test_disk_without_an_offload_dir_is_one_clear_error(offload_dir):
    with pytest.raises(PolicyError, match="no offload_dir"):
        Tiers(CPU, offload_dir=offload_dir).allocate(Tier.DISK, (2,), torch.float32)
    with pytest.raises(PolicyError, match="no offload_dir"):
        DiskTier(offload_dir)


def test_a_file_cut_short_under_the_reader_is_an_error_not_garbage(tiers):
    h = tiers.store(Tier.DISK, torch.arange(40.0).view(10, 4))
    os.truncate(h.path, 6 * 4 * 4)  # rows 6.. are gone
    dst = torch.zeros(10, 4)
    tiers.read_rows(h, dst, 0, 6)
    assert dst[:6].flatten().tolist() == list(range(24))
    with pytest.raises(OSError, match="short read"):
        tiers.read_rows(h, dst, 4, 10)


_CHILD = """
import sys, torch
from flexserve.memory.tiers import Tier, Tiers
t = Tiers(torch.device("cpu"), offload_dir=sys.argv[1])
h = t.store(Tier.DISK, torch.arange(10.0))
print(h.path, flush=True)
sys.stdin.readline()  # until the parent has looked (and maybe signalled)
"""


@pytest.mark.parametrize("how", ["exit", "SIGTERM", "SIGINT"])
def test_disk_files_are_removed_at_exit_and_on_a_signal_without_close(tmp_path, how):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        path = proc.stdout.readline().strip()
        assert os.path.isfile(path) and os.path.getsize(path) == 40, proc.stderr.read() if proc.poll() else path
        if how != "exit":
            proc.send_signal(getattr(signal, how))
        proc.communicate("go\n", timeout=30)
    finally:
        proc.kill()
    # a signal still ends the process, and by that signal (as a shell or supervisor sees it)
    assert proc.returncode == (0 if how == "exit" else -getattr(signal, how))
    assert flexserve_dirs(tmp_path) == []


_IGNORING_CHILD = """
import os, signal, sys, time, torch
signal.signal(signal.SIGTERM, signal.SIG_IGN)
from flexserve.memory.tiers import Tier, Tiers
t = Tiers(torch.device("cpu"), offload_dir=sys.argv[1])
h = t.store(Tier.DISK, torch.arange(10.0))
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print(os.path.exists(h.path), flush=True)
"""


def test_a_process_that_ignores_sigterm_keeps_running_with_its_files(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _IGNORING_CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-500:]
    assert flexserve_dirs(tmp_path) == []  # and they go at its normal exit


_HANDLING_CHILD = """
import os, signal, sys, time, torch
seen = []
def on_term(signum, frame):
    seen.append(signum)
    if sys.argv[2] == "exit":
        sys.exit(3)
signal.signal(signal.SIGTERM, on_term)
from flexserve.memory.tiers import Tier, Tiers
t = Tiers(torch.device("cpu"), offload_dir=sys.argv[1])
h = t.store(Tier.DISK, torch.arange(10.0))
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
finally:
    print(seen == [signal.SIGTERM], os.path.exists(h.path), flush=True)
dst = torch.empty(10)
t.read_rows(h, dst, 0, 10)  # the files are still usable
print(dst.tolist() == list(range(10)), flush=True)
"""


@pytest.mark.parametrize("handler", ["returns", "exit"])
def test_the_process_s_own_sigterm_handler_decides_whether_the_files_go(tmp_path, handler):
    """A handler that returns lets the process go on with its files; one that exits takes them with it."""
    proc = subprocess.run([sys.executable, "-c", _HANDLING_CHILD, str(tmp_path), handler], capture_output=True,
                          text=True, timeout=60)
    if handler == "returns":
        assert proc.returncode == 0 and proc.stdout.split() == ["True", "True", "True"], proc.stderr[-500:]
    else:  # the handler ran, the files were gone before the exit went on, and the exit status is the handler's
        assert proc.returncode == 3 and proc.stdout.split() == ["True", "False"], proc.stderr[-500:]
    assert flexserve_dirs(tmp_path) == []
