"""Real threads against a file-backed pair while the copier runs.

Restore: writer threads own interleaved byte segments (each segment straddles
track boundaries, every track is shared by all threads), write random pieces
of their own segments, and read back both what they wrote (no write lost) and
pieces they never wrote (must read as the mirror: the final image).  At the
end the standard equals the mirror overlaid with every write, and the mirror's
hash is unchanged.  Established: threads write the *same* bytes concurrently;
both sides must end identical (invariant 6)."""
from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

import pymirror
from pymirror import CopyConfig

TRACK = 64 << 10
SIZE = 16 << 20
SEG = 3000                 # segment size: not a divisor of the track size
THREADS = 4


def digest(read_into, size: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    for off in range(0, size, len(buf)):
        n = min(len(buf), size - off)
        mv = memoryview(buf)[:n]
        read_into(off, mv)
        h.update(mv)
    return h.hexdigest()


def fill(vol: pymirror.Volume, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for off in range(0, vol.size, 1 << 20):
        vol.write(off, rng.integers(0, 256, min(1 << 20, vol.size - off), dtype=np.uint8).tobytes())


@pytest.fixture
def split_pair(tmp_path):
    std = pymirror.Volume.create(tmp_path / "std.img", SIZE, TRACK)
    mir = pymirror.Volume.create(tmp_path / "mir.img", SIZE, TRACK)
    fill(std, 1)
    std.close(), mir.close()
    pair = pymirror.Pair.create(tmp_path / "pair.meta", tmp_path / "std.img", tmp_path / "mir.img")
    assert pair.establish().wait(timeout=60)
    pair.split()
    # Diverge the standard from the mirror everywhere, so the restore matters.
    rng = np.random.default_rng(2)
    for off in range(0, SIZE, 1 << 20):
        pair.write(off, rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    yield pair
    pair.close()


@pytest.mark.parametrize("order", ["hot", "ascending"])
@pytest.mark.parametrize("policy", ["redirect", "hydrate"])
def test_restore_under_concurrent_writers_and_readers(split_pair, policy, order):
    pair = split_pair
    mirror_hash = digest(pair.mirror_readinto, SIZE)
    nseg = SIZE // SEG
    segments = {k: [s for s in range(nseg) if s % THREADS == k] for k in range(THREADS)}
    writes: dict[int, list[tuple[int, bytes]]] = {k: [] for k in range(THREADS)}
    failures: list[str] = []
    barrier = threading.Barrier(THREADS + 1)

    def worker(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        written = set()
        barrier.wait()
        for i in range(300):
            seg = int(rng.choice(segments[k]))
            base = seg * SEG
            start = int(rng.integers(0, SEG))
            length = int(rng.integers(1, SEG - start + 1))
            data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            pair.write(base + start, data)
            writes[k].append((base + start, data))
            written.add(seg)
            if pair.read(base + start, length) != data:
                failures.append(f"thread {k}: write {i} at {base + start} not read back")
            fresh = int(rng.choice(segments[k]))
            if fresh not in written:
                off = fresh * SEG
                if pair.read(off, SEG) != pair.mirror_read(off, SEG):
                    failures.append(f"thread {k}: untouched segment {fresh} does not read as the mirror")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    job = pair.restore(protect=True, config=CopyConfig(copiers=2, rate=64 << 20, read_policy=policy, order=order))
    barrier.wait()
    for t in threads:
        t.join()
    assert job.wait(timeout=120)
    assert not failures, failures[:5]
    assert pair.state == "restored"
    assert digest(pair.mirror_readinto, SIZE) == mirror_hash, "protected mirror changed"

    # Expected: the mirror overlaid with each thread's writes in its own order.
    expect = bytearray(pair.mirror_read(0, SIZE))
    for k in range(THREADS):
        for off, data in writes[k]:
            expect[off:off + len(data)] = data
    got = pair.read(0, SIZE)
    assert got == bytes(expect)
    p = pair.progress
    assert p.tracks_copied + p.tracks_skipped + p.tracks_merged >= p.tracks_total
    if order == "ascending":
        assert p.tracks_hot == 0          # hot-first only when asked


def test_established_concurrent_overlapping_writers_keep_sides_equal(tmp_path):
    pair = pymirror.Pair.memory(4 << 20, 4096)
    assert pair.establish().wait(timeout=30)
    barrier = threading.Barrier(THREADS)

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        barrier.wait()
        for _ in range(400):
            off = int(rng.integers(0, 64 << 10))      # all threads hammer the same 16 tracks
            n = int(rng.integers(1, 20000))
            pair.write(off, bytes([k + 1]) * n)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pair.verify() == []
    pair.close()


def test_establish_under_concurrent_writers(tmp_path):
    pair = pymirror.Pair.memory(8 << 20, 4096, config=CopyConfig(rate=16 << 20))
    for off in range(0, 8 << 20, 1 << 20):
        pair.write(off, bytes([off >> 20]) * (1 << 20))
    job = pair.establish()
    barrier = threading.Barrier(THREADS)

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        barrier.wait()
        for _ in range(300):
            off = int(rng.integers(0, (8 << 20) - 10000))
            pair.write(off, bytes([0x80 + k]) * int(rng.integers(1, 10000)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert job.wait(timeout=60)
    assert pair.state == "established"
    assert pair.verify() == []
    pair.close()
