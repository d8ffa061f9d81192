"""Huge-page-backed CPU outputs behave like any other tensor."""

from __future__ import annotations

import io
import os
import pickle

import torch

from skyrl_fn.core import _alloc

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


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_is_released_with_the_tensor():
    # 100 x 16 MiB touched and dropped: if mappings leaked, the resident set would grow by ~1.6 GB
    # (measured in this process: a fresh interpreter would cost ~4 s of CPU importing torch).
    _alloc.release()
    before = peak = _resident_bytes()
    for _ in range(100):
        x = _alloc.empty(_BIG, torch.float32)
        x.fill_(1.0)
        v = x[:, :3]
        del x, v
        peak = max(peak, _resident_bytes())
    _alloc.release()
    assert peak - before < 512 << 20, (peak - before) >> 20


def test_a_freed_mapping_is_reused_only_when_nothing_refers_to_it(monkeypatch):
    monkeypatch.setenv("SKYRL_FN_HUGE_PAGES_CACHE_MB", "256")
    _alloc.release()
    a = _alloc.empty(_BIG, torch.float32)
    ptr = a.data_ptr()
    view = a[:, :3]  # a view keeps the mapping in use
    storage = a.untyped_storage()  # so does a bare storage
    del a
    b = _alloc.empty(_BIG, torch.float32)
    assert b.data_ptr() != ptr
    del view, b
    c = _alloc.empty(_BIG, torch.float32)
    assert c.data_ptr() != ptr  # the storage still holds it
    del storage, c
    d = _alloc.empty(_BIG, torch.int32)  # same size class, any dtype
    assert d.data_ptr() == ptr
    in_use, free = _alloc.cached_bytes()
    assert in_use >= d.numel() * 4
    del d
    assert _alloc.release() >= 4096 * 1024 * 4
    assert _alloc.cached_bytes() == (0, 0)


def test_cache_size_zero_never_reuses(monkeypatch):
    monkeypatch.setenv("SKYRL_FN_HUGE_PAGES_CACHE_MB", "0")
    _alloc.release()
    ptrs = set()
    for _ in range(3):
        x = _alloc.empty(_BIG, torch.float32)
        ptrs.add(x.data_ptr())
        x.fill_(0)
        del x
    assert _alloc.cached_bytes() == (0, 0)


def test_concurrent_callers_never_share_a_mapping(monkeypatch):
    import threading

    monkeypatch.setenv("SKYRL_FN_HUGE_PAGES_CACHE_MB", "256")
    live: dict[int, int] = {}  # data_ptr -> thread holding it
    lock, errors = threading.Lock(), []

    def work(me: int) -> None:
        try:
            for _ in range(20):
                x = _alloc.empty(_BIG, torch.float32)
                with lock:
                    if x.data_ptr() in live:
                        errors.append(f"thread {me} got the mapping thread {live[x.data_ptr()]} holds")
                    live[x.data_ptr()] = me
                x.fill_(float(me))
                assert float(x[0, 0]) == float(me) and float(x[-1, -1]) == float(me)
                with lock:
                    del live[x.data_ptr()]
                del x
        except Exception as err:  # surfaced below: a thread's exception would not fail the test
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _alloc.release()
    assert not errors, errors
