"""``pymirror demo``: the whole story on two scratch volumes, checked.

1. create a standard and a mirror, fill the standard with recognisable data;
2. establish (full) and split;
3. damage the standard with random writes (the "bad change" to undo);
4. start a protected incremental restore; while it runs, a host writer keeps
   writing (whole and partial tracks) and a host reader checks that every read
   already returns the restored image;
5. check: the mirror is unchanged, every host write is intact, every other
   track equals the mirror; print a summary.

Memory stays bounded: the checks stream the volumes in 1 MiB pieces, and host
writes are kept as (offset, length, seed) and regenerated when checked.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import CopyConfig
from .pair import Pair
from .progress import follow
from .sizes import format_size
from .volume import Volume

CHUNK = 1 << 20


def _pattern(track: int, length: int) -> bytes:
    """Recognisable content of a track: its number repeated."""
    word = f"pymirror track {track:010d} ".encode()
    return (word * (length // len(word) + 1))[:length]


def _noise(seed: int, length: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


def _digest(read_into: Any, size: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        read_into(off, mv[:n])
        h.update(mv[:n])
    return h.hexdigest()


class _Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.checks: list[tuple[str, bool, str]] = []

    def row(self, name: str, value: str) -> None:
        self.rows.append((name, value))

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append((name, ok, detail))
        print(f"  [{'ok' if ok else 'FAIL'}] {name}{(': ' + detail) if detail else ''}", flush=True)

    def print(self) -> bool:
        width = max(len(n) for n, _ in self.rows)
        print("\nsummary")
        for name, value in self.rows:
            print(f"  {name:<{width}}  {value}")
        ok = all(c[1] for c in self.checks)
        passed = sum(c[1] for c in self.checks)
        print(f"\n{passed} of {len(self.checks)} checks passed: {'OK' if ok else 'FAILED'}")
        return ok


def run_demo(size: int = 256 << 20, track_size: int = 64 << 10, damage: float = 0.25,
             rate: int = 256 << 20, workdir: Optional[str] = None, seed: int = 1) -> bool:
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="pymirror-demo-")
        folder = Path(tmp)
    else:
        folder = Path(workdir)
        folder.mkdir(parents=True, exist_ok=True)
    try:
        return _run(folder, size, track_size, damage, rate, seed)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(folder: Path, size: int, track_size: int, damage: float, rate: int, seed: int) -> bool:
    rng = np.random.default_rng(seed)
    rep = _Report()
    std_path, mir_path, meta = folder / "standard.img", folder / "mirror.img", folder / "pair.meta"
    for p in (std_path, mir_path, meta):
        if p.exists():
            p.unlink()
    tracks = -(-size // track_size)
    print(f"pymirror demo in {folder}: two {format_size(size)} volumes, {tracks} tracks of {format_size(track_size)}")

    # 1. volumes, recognisable data on the standard
    t0 = time.monotonic()
    with Volume.create(std_path, size, track_size) as std:
        for t in range(tracks):
            off = t * track_size
            std.write(off, _pattern(t, min(track_size, size - off)))
    Volume.create(mir_path, size, track_size).close()
    print(f"1. filled the standard with per-track patterns ({time.monotonic() - t0:.2f} s)")

    pair = Pair.create(meta, std_path, mir_path, track_size=track_size)
    try:
        # 2. establish + split
        print("2. establish (full copy to the mirror), then split")
        follow(pair.establish(), "establish")
        rep.check("after establish, the mirror equals the standard", pair.verify() == [])
        pair.split()
        mirror_hash = _digest(pair.mirror_readinto, size)

        # 3. damage
        n_damage = max(1, int(tracks * damage))
        damaged = rng.choice(tracks, size=n_damage, replace=False)
        for i, t in enumerate(damaged.tolist()):
            off = int(t) * track_size
            length = min(track_size, size - off)
            cut = int(rng.integers(1, length + 1))
            pair.write(off, _noise(seed * 1_000_003 + i, cut))
        differ = len(pair.verify())
        print(f"3. damaged {n_damage} tracks of the standard with random writes ({differ} tracks now differ)")
        rep.check("damage is visible before the restore", differ == n_damage, f"{differ} tracks differ")

        # 4. restore while a host writes and reads
        rest = [t for t in range(tracks) if t not in set(damaged.tolist())]
        order = rng.permutation(tracks).tolist()
        write_tracks = order[: max(1, tracks // 20)]            # 5% of tracks get host writes
        read_tracks = [t for t in order[len(write_tracks):]][: max(1, tracks // 20)]
        writes: list[tuple[int, int, int]] = []                 # (offset, length, seed), in order
        bad_reads: list[int] = []
        reads_done = [0]
        stop = threading.Event()

        def writer() -> None:
            for i, t in enumerate(write_tracks):
                base = t * track_size
                tlen = min(track_size, size - base)
                if i % 3 == 0:                                 # a whole track
                    off, length = base, tlen
                else:                                          # part of a track
                    start = int(rng.integers(0, tlen))
                    length = int(rng.integers(1, tlen - start + 1))
                    off = base + start
                s = seed * 7_000_003 + i
                pair.write(off, _noise(s, length))
                writes.append((off, length, s))

        def reader() -> None:
            # Tracks nobody writes during the restore must read as the mirror's.
            for t in read_tracks:
                if stop.is_set():
                    return
                off = t * track_size
                length = min(track_size, size - off)
                if pair.read(off, length) != pair.mirror_read(off, length):
                    bad_reads.append(t)
                reads_done[0] += 1

        print(f"4. protected incremental restore, rate limit {format_size(rate)}/s; "
              f"a host writer and a reader run meanwhile")
        t_cmd = time.monotonic()
        job = pair.restore(incremental=True, protect=True, config=CopyConfig(rate=rate))
        returned_in = time.monotonic() - t_cmd
        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for th in threads:
            th.start()
        final = follow(job, "restore")
        stop.set()
        for th in threads:
            th.join()
        rep.check("restore() returned before copying", returned_in < 0.5, f"{returned_in * 1e3:.1f} ms")

        # 5. checks
        print("5. checks")
        rep.check("the mirror is unchanged (protected restore)",
                  _digest(pair.mirror_readinto, size) == mirror_hash)
        rep.check("reads during the restore saw the restored image", not bad_reads,
                  f"{reads_done[0]} reads, {len(bad_reads)} wrong")
        # expected = mirror overlaid with the host writes, in order
        last_write: dict[int, list[tuple[int, int, int]]] = {}
        for w in writes:
            last_write.setdefault(w[0] // track_size, []).append(w)
        lost = wrong_other = 0
        for t in range(tracks):
            off = t * track_size
            length = min(track_size, size - off)
            expect = bytearray(pair.mirror_read(off, length))
            for (woff, wlen, s) in last_write.get(t, []):
                expect[woff - off: woff - off + wlen] = _noise(s, wlen)
            if pair.read(off, length) != expect:
                if t in last_write:
                    lost += 1
                else:
                    wrong_other += 1
        rep.check("every host write is intact", lost == 0, f"{len(writes)} writes, {lost} tracks wrong")
        rep.check("every other track equals the mirror", wrong_other == 0,
                  f"{tracks - len(last_write)} tracks, {wrong_other} wrong")
        rep.check("pair ends restored", pair.state == "restored", pair.state)
        rep.check("incremental: only changed tracks were restored", final.tracks_total == n_damage,
                  f"{final.tracks_total} tracks restored for {n_damage} damaged")

        rep.row("volume size", f"{format_size(size)} ({tracks} tracks of {format_size(track_size)})")
        rep.row("tracks damaged", str(n_damage))
        rep.row("restore returned in", f"{returned_in * 1e3:.2f} ms")
        rep.row("tracks restored", f"{final.tracks_total} in {final.elapsed:.2f} s "
                f"({final.rate / (1 << 20):.0f} MiB/s)")
        rep.row("copied / skipped / merged", f"{final.tracks_copied} / {final.tracks_skipped} / {final.tracks_merged}")
        rep.row("reads redirected to mirror", str(final.reads_redirected))
        rep.row("host writes during restore", str(len(writes)))
        rep.row("host reads checked", str(reads_done[0]))
    finally:
        pair.close()
    ok = rep.print()
    sys.stdout.flush()
    return ok
