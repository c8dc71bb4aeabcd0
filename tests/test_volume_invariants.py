"""The invariants of a pair (docs/states.md), as one suite over every kind
of pair: local files, NBD exports (qemu-nbd, nbdkit) and mixed ones
(tests/volume_kinds.py has the registry; a new kind of volume is one entry
there).  Servers are started and stopped by the tests.

Each test names the invariant it checks: full and incremental restores are
exact and incremental (2, 5), a protected restore leaves the mirror
untouched while host writers and readers race the copier (1, 3, 4), reads of
PENDING tracks see the final image (4), established pairs stay equal under
overlapping writers (6), verify finds what differs, and a pair reopens from
its metadata by the volumes' URIs.
"""
from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import pymirror
import pymirror.uri
from pymirror import CopyConfig

sys.path.insert(0, str(Path(__file__).parent))   # tests/ has no __init__.py
from volume_kinds import PAIR_KINDS, Volumes, kind_fixtures, pair_id

TRACK = 64 << 10
SIZE = 4 << 20
TRACKS = SIZE // TRACK


@pytest.fixture(params=PAIR_KINDS, ids=pair_id)
def vols(request, tmp_path):
    for name in kind_fixtures(request.param):      # the Ceph cluster for rbd
        request.getfixturevalue(name)
    v = Volumes(tmp_path, request.param, SIZE)
    yield v
    v.close()


def rand(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def digest(read: "callable", size: int = SIZE) -> str:
    return hashlib.sha256(read(0, size)).hexdigest()


def established(vols: Volumes, tmp_path, **kw) -> pymirror.Pair:
    """A pair of the two volumes, filled with random data and established."""
    pair = pymirror.Pair.create(tmp_path / "pair.meta", vols.standard.uri, vols.mirror.uri, track_size=TRACK,
                                **kw)
    pair.write(0, rand(1, SIZE))
    assert pair.establish().wait(timeout=60)
    assert pair.state == "established"
    return pair


def split_and_diverge(pair: pymirror.Pair) -> None:
    pair.split()
    pair.write(0, rand(2, SIZE))           # every track of the standard differs from the mirror


def test_volumes_are_what_the_kinds_say(vols, tmp_path):
    pair = established(vols, tmp_path)
    try:
        for vol, backing in ((pair.standard, vols.standard), (pair.mirror, vols.mirror)):
            assert vol.kind == backing.volume_kind
            assert vol.detects_outside_changes == (backing.volume_kind == "file")
        assert pair.verify() == []
    finally:
        pair.close()


def test_full_restore_is_exact_and_leaves_the_mirror_untouched(vols, tmp_path):
    pair = established(vols, tmp_path)
    try:
        split_and_diverge(pair)
        pair.mirror_write(7 * TRACK + 5, b"changed on the mirror while split")
        mirror = pair.mirror_read(0, SIZE)
        assert pair.read(0, SIZE) != mirror
        assert pair.restore(protect=True).wait(timeout=60)
        assert pair.state == "restored"
        assert pair.read(0, SIZE) == mirror                     # invariant 2
        assert pair.mirror_read(0, SIZE) == mirror              # invariant 1
        assert pair.verify() == []
        p = pair.progress
        assert p.tracks_total == TRACKS and p.bytes_written == SIZE
    finally:
        pair.close()


@pytest.mark.parametrize("kind", ["restore", "establish"])
def test_incremental_copies_only_the_changed_tracks(vols, tmp_path, kind):
    pair = established(vols, tmp_path)
    try:
        pair.split()
        std_tracks, mir_tracks = {3, 4, 40}, {4, 17, 63}
        for t in std_tracks:
            pair.write(t * TRACK + 100, b"x" * 50)
        for t in mir_tracks:
            pair.mirror_write(t * TRACK, b"y" * TRACK)
        job = (pair.restore(incremental=True, protect=True) if kind == "restore"
               else pair.establish(incremental=True))
        assert job.wait(timeout=60)
        p = job.progress
        changed = std_tracks | mir_tracks
        assert p.tracks_total == len(changed)                   # invariant 5: the tracks
        assert p.bytes_read == len(changed) * TRACK             # ... and the bytes
        assert p.bytes_written == len(changed) * TRACK
        assert pair.verify() == []
        if kind == "restore":
            assert pair.read(17 * TRACK, TRACK) == b"y" * TRACK
            assert pair.read(3 * TRACK + 100, 50) != b"x" * 50
    finally:
        pair.close()


@pytest.mark.parametrize("policy", ["redirect", "hydrate"])
def test_reads_of_pending_tracks_see_the_final_image(vols, tmp_path, policy):
    pair = established(vols, tmp_path)
    try:
        split_and_diverge(pair)
        mirror = pair.mirror_read(0, SIZE)
        job = pair.restore(protect=True, config=CopyConfig(read_policy=policy, rate=1))
        # reads across track boundaries while (nearly) every track is PENDING
        for off in (0, 5 * TRACK - 3, 20 * TRACK + 1000, SIZE - 4096):
            assert pair.read(off, 8192 if off + 8192 <= SIZE else SIZE - off) == \
                mirror[off:off + 8192]                          # invariant 4
        p = job.progress
        assert p.tracks_pending > 0
        if policy == "redirect":
            assert p.reads_redirected > 0
        else:
            assert p.reads_hydrated > 0
        job.set_rate(0)
        assert job.wait(timeout=60)
        assert pair.read(0, SIZE) == mirror
    finally:
        pair.close()


def test_protected_restore_with_host_writers_and_readers_racing_the_copier(vols, tmp_path):
    threads_n, seg = 3, 3000             # segments straddle tracks; every track shared by all threads
    pair = established(vols, tmp_path)
    try:
        split_and_diverge(pair)
        mirror = pair.mirror_read(0, SIZE)
        mirror_hash = hashlib.sha256(mirror).hexdigest()
        nseg = SIZE // seg
        segments = {k: [s for s in range(nseg) if s % threads_n == k] for k in range(threads_n)}
        writes: dict[int, list[tuple[int, bytes]]] = {k: [] for k in range(threads_n)}
        failures: list[str] = []
        barrier = threading.Barrier(threads_n + 1)

        def worker(k: int) -> None:
            rng = np.random.default_rng(100 + k)
            written: set[int] = set()
            barrier.wait()
            for i in range(120):
                s = int(rng.choice(segments[k]))
                start = int(rng.integers(0, seg))
                length = int(rng.integers(1, seg - start + 1))
                data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
                pair.write(s * seg + start, data)
                writes[k].append((s * seg + start, data))
                written.add(s)
                if pair.read(s * seg + start, length) != data:
                    failures.append(f"thread {k}: write {i} not read back")      # invariant 3
                fresh = int(rng.choice(segments[k]))
                if fresh not in written and pair.read(fresh * seg, seg) != mirror[fresh * seg:(fresh + 1) * seg]:
                    failures.append(f"thread {k}: untouched segment {fresh} is not the mirror's")  # 4

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(threads_n)]
        for t in threads:
            t.start()
        job = pair.restore(protect=True, config=CopyConfig(copiers=2, rate=4 << 20))
        barrier.wait()
        for t in threads:
            t.join()
        assert job.wait(timeout=120)
        assert not failures, failures[:5]
        assert pair.state == "restored"
        assert digest(pair.mirror_read) == mirror_hash          # invariant 1
        expect = bytearray(mirror)
        for k in range(threads_n):
            for off, data in writes[k]:
                expect[off:off + len(data)] = data
        assert pair.read(0, SIZE) == bytes(expect)              # invariant 3
    finally:
        pair.close()


def test_unprotected_restore_mirrors_host_writes(vols, tmp_path):
    pair = established(vols, tmp_path)
    try:
        split_and_diverge(pair)
        job = pair.restore(protect=False, config=CopyConfig(rate=8 << 20))
        pair.write(10 * TRACK + 7, b"during the restore")
        assert job.wait(timeout=60)
        assert pair.state == "established"
        assert pair.verify() == []
        assert pair.mirror_read(10 * TRACK + 7, 18) == b"during the restore"
    finally:
        pair.close()


def test_established_sides_stay_equal_under_overlapping_writers(vols, tmp_path):
    pair = established(vols, tmp_path)
    try:
        barrier = threading.Barrier(3)

        def worker(k: int) -> None:
            rng = np.random.default_rng(k)
            barrier.wait()
            for _ in range(150):
                off = int(rng.integers(0, 4 * TRACK))       # all hammer the same 4 tracks
                pair.write(off, bytes([k + 1]) * int(rng.integers(1, 20000)))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert pair.verify() == []                              # invariant 6
    finally:
        pair.close()


def test_verify_names_the_differing_tracks_and_reopen_by_uri(vols, tmp_path):
    pair = established(vols, tmp_path)
    pair.split()
    pair.mirror_write(9 * TRACK, b"m")
    pair.write(33 * TRACK + TRACK - 1, b"s")
    assert pair.verify() == [9, 33]
    pair.close()
    again = pymirror.Pair.open(tmp_path / "pair.meta")
    try:
        assert again.state == "split"
        assert (again.standard.path, again.mirror.path) == (
            pymirror.uri.parse(vols.standard.uri).text, pymirror.uri.parse(vols.mirror.uri).text)
        assert again.verify() == [9, 33]
        assert again.restore(incremental=True).wait(timeout=60)
        assert again.verify() == []
    finally:
        again.close()
