"""Version-1 metadata fixtures (tests/data/format1/): unpack one into a
folder as if it had always lived there.

A version-1 header records the volumes' absolute paths and inode numbers,
so a fixture copied elsewhere names the wrong files.  ``place`` rewrites,
in both header slots of a version-1 file, the two paths and inode numbers
(and the slot's CRC-32C), exactly what the release that wrote the fixture
would have written had the files been made in that folder.  Nothing else
changes: the state, the tables, the flags (clean or not) stay as made.
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

DATA = Path(__file__).parent / "data" / "format1"
SLOT = 16384
STD_PATH_AT, MIR_PATH_AT, PATH_MAX = 512, 512 + 4096, 4096
INO_AT = 64            # std_ino, mir_ino: two u64 after table_bytes
VERSION_AT = 8

STATES = ("new", "established", "split", "syncing-paused", "restoring-paused", "restored", "unclean")


def _table() -> list[int]:
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_T = _table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _T[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def patch_v1(meta: Path, std: Path, mir: Path) -> None:
    """Point both slots of the version-1 file ``meta`` at ``std``/``mir``."""
    si, mi = os.stat(std).st_ino, os.stat(mir).st_ino
    with open(meta, "r+b") as f:
        for slot in (0, 1):
            f.seek(slot * SLOT)
            hdr = bytearray(f.read(SLOT))
            if hdr[:8] != b"PMIRMETA" or struct.unpack_from("<I", hdr, VERSION_AT)[0] != 1:
                raise ValueError(f"{meta}: slot {slot} is not a version-1 header")
            valid = crc32c(bytes(hdr[:SLOT - 4])) == struct.unpack_from("<I", hdr, SLOT - 4)[0]
            struct.pack_into("<QQ", hdr, INO_AT, si, mi)
            for at, p in ((STD_PATH_AT, std), (MIR_PATH_AT, mir)):
                raw = os.fsencode(os.path.abspath(p))
                hdr[at:at + PATH_MAX] = raw + bytes(PATH_MAX - len(raw))
            if valid:   # a slot that was invalid stays invalid
                struct.pack_into("<I", hdr, SLOT - 4, crc32c(bytes(hdr[:SLOT - 4])))
            f.seek(slot * SLOT)
            f.write(hdr)


def place(state: str, folder: Path) -> tuple[Path, Path, Path]:
    """Unpack fixture ``state`` into ``folder``: (meta, standard, mirror)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for part in ("meta", "std", "mir"):
        dst = folder / f"{state}.{part}"
        with gzip.open(DATA / f"{state}.{part}.gz", "rb") as src, open(dst, "wb") as f:
            shutil.copyfileobj(src, f)
        out.append(dst)
    meta, std, mir = out
    patch_v1(meta, std, mir)
    return meta, std, mir
