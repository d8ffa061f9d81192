"""Huge-page-backed CPU outputs behave like any other tensor."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys

import torch

from skyrl_fn import _alloc

_BIG = (4096, 1024)  # 16 MiB of float32, above MIN_BYTES


def test_large_cpu_tensor_is_mapped_aligned_and_owns_exactly_its_bytes():
    x = _alloc.empty(_BIG, torch.float32)
    assert x.shape == _BIG and x.dtype == torch.float32 and x.is_contiguous()
    assert x.data_ptr() % (2 << 20) == 0
    assert x.untyped_storage().nbytes() == 4096 * 1024 * 4
    x.fill_(1.5)
    assert float(x.sum()) == 1.5 * x.numel()


def test_small_and_disabled_fall_back_to_torch_empty(monkeypatch):
    small = _alloc.empty((16, 16), torch.float32)
    assert small.untyped_storage().nbytes() == 16 * 16 * 4
    monkeypatch.setenv("SKYRL_FN_HUGE_PAGES", "0")
    plain = _alloc.empty(_BIG, torch.float64)
    assert plain.shape == _BIG and plain.dtype == torch.float64


def test_round_trips_through_pickle_and_torch_save():
    x = _alloc.empty(_BIG, torch.float32)
    x.copy_(torch.arange(x.numel(), dtype=torch.float32).view(_BIG))
    assert torch.equal(pickle.loads(pickle.dumps(x)), x)
    buf = io.BytesIO()
    torch.save(x, buf)
    assert len(buf.getvalue()) < x.numel() * 4 + 4096  # only its own bytes are written
    buf.seek(0)
    assert torch.equal(torch.load(buf), x)


def test_memory_is_released_with_the_tensor():
    # 100 x 16 MiB touched and dropped: if mappings leaked, peak RSS would grow by ~1.6 GB.
    code = (
        "import resource, torch\n"
        "from skyrl_fn import _alloc\n"
        "for _ in range(100):\n"
        "    x = _alloc.empty((4096, 1024), torch.float32); x.fill_(1.0); v = x[:, :3]; del x, v\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    peak_kib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert peak_kib < 1_000_000, peak_kib
