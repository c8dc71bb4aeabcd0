"""Make the version-1 metadata fixtures in tests/data/format1/ (run once,
with the release that writes format 1: pymirror 0.2 as of commit bd8fcfc).

    python tests/data/make_format1.py

For each state it leaves ``STATE.meta.gz``, ``STATE.std.gz`` and
``STATE.mir.gz`` (the metadata and the two 2 MiB volumes, 32 tracks of
64 KiB, patterned so they compress), then records in ``expected.json`` what
that same release does with a copy of each (tests/format1.py ``place``):
the state and track counts on open, then one follow-up command run to its
end and the SHA-256 of both volumes after it.  tests/test_format_upgrade.py
checks that a newer pymirror, upgrading the file in place, does the same.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import format1  # noqa: E402  (tests/format1.py)

from pymirror import Pair  # noqa: E402
from pymirror.config import CopyConfig  # noqa: E402
from pymirror.pair import track_counts  # noqa: E402

TRACK = 64 << 10
TRACKS = 32
SIZE = TRACK * TRACKS
SLOW = CopyConfig(rate=256 << 10, copiers=1, batch_size=TRACK)


def fill(byte: int, n: int = TRACK) -> bytes:
    return bytes([byte]) * n


def volumes(d: Path, name: str) -> tuple[Path, Path, Path]:
    std, mir = d / f"{name}.std", d / f"{name}.mir"
    with open(std, "wb") as f:
        for t in range(TRACKS):
            f.write(fill(1 + t))
    with open(mir, "wb") as f:
        f.truncate(SIZE)
    return d / f"{name}.meta", std, mir


def established(d: Path, name: str) -> Pair:
    meta, std, mir = volumes(d, name)
    p = Pair.create(meta, std, mir, track_size=TRACK)
    p.establish().wait()
    return p


def split_with_changes(p: Pair) -> None:
    p.split()
    p.write(3 * TRACK, fill(0xA3))                  # a whole track
    p.write(4 * TRACK + 100, b"partial")             # part of one
    p.mirror_write(10 * TRACK, fill(0xB0, 4096))    # the mirror's side
    p.flush()
    p.mirror_flush()


def make(d: Path) -> None:
    meta, std, mir = volumes(d, "new")
    Pair.create(meta, std, mir, track_size=TRACK).close()

    established(d, "established").close()

    p = established(d, "split")
    split_with_changes(p)
    p.close()

    meta, std, mir = volumes(d, "syncing-paused")
    p = Pair.create(meta, std, mir, track_size=TRACK, config=SLOW)
    p.establish()
    time.sleep(0.3)
    p.close()                                       # the job stays resumable

    p = established(d, "restoring-paused")
    split_with_changes(p)
    p.restore(incremental=False, protect=True, config=SLOW)
    p.write(20 * TRACK, fill(0xC4))                 # a host write during the restore
    p.write(21 * TRACK + 5, b"merged", fua=True)
    time.sleep(0.3)
    p.close()

    p = established(d, "restored")
    split_with_changes(p)
    p.restore(incremental=True, protect=True).wait()
    p.close()

    # closed uncleanly: a process writing to an established pair dies
    established(d, "unclean").close()
    child = (
        "import os, sys\n"
        "from pymirror import Pair\n"
        "p = Pair.open(sys.argv[1])\n"
        "p.write(7 * 65536, bytes([0xD7]) * 65536, fua=True)\n"
        "p.write(25 * 65536 + 3, b'unflushed')\n"
        "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", child, str(d / "unclean.meta")], check=True, cwd="/")

    for state in format1.STATES:
        with open(d / f"{state}.meta", "rb") as f:
            if f.read(12)[8:12] != (1).to_bytes(4, "little"):
                sys.exit("this pymirror writes a newer metadata format: the fixtures must stay format 1 "
                         "(see README.md); nothing was replaced")
        for part in ("meta", "std", "mir"):
            with open(d / f"{state}.{part}", "rb") as src:
                raw = src.read()
            # mtime=0: the same bytes give the same .gz
            with open(format1.DATA / f"{state}.{part}.gz", "wb") as f:
                with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
                    g.write(raw)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def then(state: str, p: Pair) -> str:
    """The follow-up command each fixture gets, run to its end."""
    if p.progress.running:
        p.resume().wait()
        return "resume"
    if state in ("new",):
        p.establish().wait()
        return "establish"
    if state == "established":
        p.split()
        return "split"
    if state == "split":
        p.restore(incremental=True, protect=True).wait()
        return "restore --incremental"
    if state == "restored":
        p.establish(incremental=True).wait()
        return "establish --incremental"
    raise AssertionError(state)


def expected(d: Path) -> dict:
    out = {}
    for state in format1.STATES:
        meta, std, mir = format1.place(state, d / "check")
        with Pair.open(meta) as p:
            counts = track_counts(p)
            on_open = {"state": str(p.state), "running": bool(p.progress.running),
                       "counts": counts, "mirror_invalid": p.mirror_invalid}
            cmd = then(state, p)
            after = {"command": cmd, "state": str(p.state), "differing": p.verify()}
        after["standard_sha256"], after["mirror_sha256"] = sha(std), sha(mir)
        out[state] = {"open": on_open, "after": after}
    return out


def main() -> None:
    format1.DATA.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        make(Path(tmp))
        exp = expected(Path(tmp))
    (format1.DATA / "expected.json").write_text(json.dumps(exp, indent=1, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in format1.DATA.iterdir())
    print(f"wrote {len(list(format1.DATA.iterdir()))} files, {total} bytes, in {format1.DATA}")


if __name__ == "__main__":
    main()
