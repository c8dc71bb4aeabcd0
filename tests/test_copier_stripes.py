"""The striped copier against racing host writers, with real threads.

Small tracks (4 KiB) and many copiers (16) with short batches make the
copiers' stripes small and cut often, so stripes, stolen halves, the
kernel copy between files (copy_file_range), read-ahead and write-behind
all meet host writes on the same tracks.  Each writer thread owns
interleaved byte segments that straddle track boundaries and writes random
pieces of them (some whole tracks, some partial) while the job runs.  At
the end the target must equal the source image overlaid with every host
write: a copy that landed after a racing host write would show as old
bytes.  Run for file-backed pairs (kernel copy) and memory pairs (buffered
copy), for restore and for establish."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import pymirror
from pymirror import CopyConfig

TRACK = 4096
SIZE = 4 << 20            # 1024 tracks
SEG = 5000                # not a divisor of the track size
WRITERS = 4
COPIERS = 16


def image(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8).tobytes()


def make_pair(kind: str, tmp_path, std_img: bytes, mir_img: bytes) -> pymirror.Pair:
    if kind == "file":
        for name, data in (("std.img", std_img), ("mir.img", mir_img)):
            (tmp_path / name).write_bytes(data)
        pair = pymirror.Pair.create(tmp_path / "pair.meta", tmp_path / "std.img", tmp_path / "mir.img",
                                    track_size=TRACK)
    else:
        pair = pymirror.Pair.memory(SIZE, track_size=TRACK)
    return pair


def race(pair: pymirror.Pair, start_job, seed: int) -> list[list[tuple[int, bytes]]]:
    """Start the job and WRITERS threads writing their own segments at once;
    return each thread's writes in order."""
    nseg = SIZE // SEG
    writes: list[list[tuple[int, bytes]]] = [[] for _ in range(WRITERS)]
    failures: list[str] = []
    barrier = threading.Barrier(WRITERS + 1)

    def writer(k: int) -> None:
        rng = np.random.default_rng(seed * 100 + k)
        mine = [s for s in range(nseg) if s % WRITERS == k]
        barrier.wait()
        for i in range(250):
            seg = int(rng.choice(mine))
            if i % 5 == 0:
                # a whole track inside the segment, if one fits: the no-copy path
                first = -(-seg * SEG // TRACK) * TRACK
                if first + TRACK <= (seg + 1) * SEG:
                    off, length = first, TRACK
                else:
                    off, length = seg * SEG, SEG
            else:
                start = int(rng.integers(0, SEG))
                off, length = seg * SEG + start, int(rng.integers(1, SEG - start + 1))
            data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            pair.write(off, data)
            writes[k].append((off, data))
            if pair.read(off, length) != data:
                failures.append(f"writer {k}: write {i} at {off} not read back")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(WRITERS)]
    for t in threads:
        t.start()
    job = start_job()
    barrier.wait()
    for t in threads:
        t.join()
    assert job.wait(timeout=120)
    assert not failures, failures[:5]
    return writes


def expected(base: bytes, writes: list[list[tuple[int, bytes]]]) -> bytes:
    out = bytearray(base)
    for mine in writes:             # segments are disjoint between writers
        for off, data in mine:
            out[off:off + len(data)] = data
    return bytes(out)


def first_difference(a: bytes, b: bytes) -> str:
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    if diff.size == 0:
        return "equal"
    return f"{diff.size} bytes differ, first at {int(diff[0])} (track {int(diff[0]) // TRACK})"


@pytest.mark.parametrize("kind", ["file", "memory"])
@pytest.mark.parametrize("seed,rate", [(1, 0), (2, 0), (3, 8 << 20)])
def test_restore_stripes_never_overwrite_a_racing_host_write(tmp_path, kind, seed, rate):
    """rate: a rate limit makes each copier wait between finding a run and
    claiming it, the window in which a host write can take its tracks."""
    std_img, mir_img = image(10 + seed), image(20 + seed)
    pair = make_pair(kind, tmp_path, std_img, mir_img)
    with pair:
        if kind == "memory":
            pair.write(0, std_img)
            pair.establish().wait()
            pair.split()
            pair.write(0, image(30 + seed))         # diverge the standard
            for off in range(0, SIZE, 1 << 20):     # and the mirror, so the restore matters
                pair.mirror_write(off, mir_img[off:off + (1 << 20)])
        else:
            pair.establish(assume_equal=True)       # two different files: every track must be copied
            pair.split()
        cfg = CopyConfig(copiers=COPIERS, batch_size=4 * TRACK, rate=rate)
        writes = race(pair, lambda: pair.restore(protect=True, config=cfg), seed)
        pair.flush()
        got = pair.read(0, SIZE)
        want = expected(mir_img, writes)
        assert got == want, first_difference(got, want)
        assert pair.mirror_read(0, SIZE) == mir_img     # protected: the mirror is untouched
        assert pair.state == "restored"


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_establish_stripes_keep_both_sides_equal_under_racing_writes(tmp_path, kind):
    std_img, mir_img = image(41), image(42)
    pair = make_pair(kind, tmp_path, std_img, mir_img)
    with pair:
        if kind == "memory":
            pair.write(0, std_img)
        cfg = CopyConfig(copiers=COPIERS, batch_size=4 * TRACK)
        writes = race(pair, lambda: pair.establish(config=cfg), 7)
        pair.flush()
        want = expected(std_img, writes)
        got = pair.read(0, SIZE)
        assert got == want, first_difference(got, want)
        assert pair.state == "established"
        pair.split()
        mirror = pair.mirror_read(0, SIZE)
        assert mirror == want, first_difference(mirror, want)


def test_auto_settings_resolve_and_explicit_ones_stay(tmp_path):
    """The default config leaves copiers and batch size to the core; the
    resulting restore still copies everything."""
    std_img, mir_img = image(51), image(52)
    pair = make_pair("file", tmp_path, std_img, mir_img)
    with pair:
        pair.establish(assume_equal=True)
        pair.split()
        assert CopyConfig().copiers == 0 and CopyConfig().batch_size == 0
        pair.restore().wait(timeout=60)
        assert pair.read(0, SIZE) == mir_img
        with pytest.raises(pymirror.ConfigError):
            CopyConfig(copiers=65)
        with pytest.raises(pymirror.ConfigError):
            CopyConfig(batch_size=100)
