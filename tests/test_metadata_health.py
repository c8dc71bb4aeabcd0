"""Metadata damage is reported (issue 16 item 4): a fall back to the older
header slot warns (Python warnings, one CLI line), ``pymirror check``
reports each slot, and ``pymirror pair --relocate`` points a pair at its
moved volumes after checking that they are the same volumes."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from pymirror import ForeignMetadataError, MetadataWarning, Pair, Volume
from pymirror.check import check_metadata
from pymirror.pair import peek

_spec = importlib.util.spec_from_file_location("cli_util", Path(__file__).with_name("cli_util.py"))
cli_util = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cli_util", cli_util)
_spec.loader.exec_module(cli_util)

TRACK = 64 << 10
SIZE = 40 * TRACK
SLOT = 16384


def make(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    std, mir, meta = folder / "std.img", folder / "mir.img", folder / "p.meta"
    for v in (std, mir):
        Volume.create(v, SIZE).close()
    with Pair.create(meta, std, mir) as p:
        p.write(0, os.urandom(SIZE))
        p.establish().wait()
        p.split()
        p.write(3 * TRACK, b"after the split" * 10)
    return meta


def current_slot(meta: Path) -> int:
    return check_metadata(meta)["current"]


def env(tmp_path: Path) -> dict:
    return dict(os.environ, PYMIRROR_CONTROL=str(tmp_path / "none.sock"))


def test_a_healthy_file_checks_healthy(tmp_path: Path) -> None:
    meta = make(tmp_path)
    r = check_metadata(meta)
    assert r["verdict"] == 0 and r["health"] == "healthy"
    assert [s["valid"] for s in r["slots"]] == [True, True]
    assert all(t["ok"] for s in r["slots"] for t in s["tables"]) and len(r["slots"][0]["tables"]) == 6
    assert r["slots"][r["current"]]["state"] == "split"
    proc = cli_util.run("check", meta, env=env(tmp_path))
    assert proc.stdout.startswith(f"{meta}: healthy") and proc.returncode == 0


def damage(meta: Path, where: str) -> tuple[int, int]:
    """Overwrite four bytes of the current slot's header or first table;
    returns (that slot, the generation of the other one)."""
    cur = current_slot(meta)
    other_gen = check_metadata(meta)["slots"][1 - cur]["generation"]
    if where == "header":
        at = cur * SLOT + 40
    else:
        tables = (meta.stat().st_size - 2 * SLOT) // 2
        at = 2 * SLOT + cur * tables + 10                       # PENDING(standard) of the current slot
    with open(meta, "r+b") as f:
        f.seek(at)
        f.write(b"\xde\xad\xbe\xef")
    return cur, other_gen


@pytest.mark.parametrize("where", ["header", "table"])
def test_four_bytes_overwritten_warn_and_check_reports_them(tmp_path: Path, where: str) -> None:
    meta = make(tmp_path)
    cur, gen = damage(meta, where)
    r = check_metadata(meta)
    assert r["verdict"] == 1 and r["current"] == 1 - cur
    bad = r["slots"][cur]
    assert not bad["valid"] and bad["why"]
    if where == "table":
        assert "table 0" in bad["why"] and not bad["tables"][0]["ok"] and all(t["ok"] for t in bad["tables"][1:])
    proc = cli_util.run("check", meta, check=False, env=env(tmp_path))
    assert proc.returncode == 1 and "INVALID" in proc.stdout and "damaged but usable" in proc.stdout
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with Pair.open(meta) as p:
            assert p.state == "split"
    msgs = [str(w.message) for w in seen if issubclass(w.category, MetadataWarning)]
    assert len(msgs) == 1 and f"header slot {cur} is damaged" in msgs[0] and f"generation {gen}" in msgs[0]
    assert str(meta) in msgs[0]
    # the older slot was not closed cleanly: its recovery committed, which rewrote the damaged slot
    assert check_metadata(meta)["verdict"] == 0
    cur, gen = damage(meta, where)
    proc = cli_util.run("query", meta, env=env(tmp_path))
    warn = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(warn) == 1 and warn[0].startswith("warning: ") and f"header slot {cur} is damaged" in warn[0], \
        proc.stderr


def test_an_unusable_file_exits_2(tmp_path: Path) -> None:
    meta = make(tmp_path)
    with open(meta, "r+b") as f:
        for slot in (0, 1):
            f.seek(slot * SLOT + 20)
            f.write(b"\x01\x02\x03\x04")
    assert check_metadata(meta)["verdict"] == 2
    proc = cli_util.run("check", meta, check=False, env=env(tmp_path))
    assert proc.returncode == 2 and "unusable" in proc.stdout
    other = tmp_path / "other.txt"
    other.write_text("not metadata\n" * 3000)
    proc = cli_util.run("check", other, "--json", check=False, env=env(tmp_path))
    assert proc.returncode == 2 and json.loads(proc.stdout)["current"] is None


def test_relocate_after_mv_of_the_pairs_folder(tmp_path: Path) -> None:
    old = tmp_path / "old"
    meta = make(old)
    new = tmp_path / "new"
    shutil.move(str(old), str(new))
    e = env(tmp_path)
    proc = cli_util.run("query", new / "p.meta", check=False, env=e)
    line = cli_util.one_line_error(proc, 2)
    assert "does not exist" in line and "--relocate" in line
    raw = (new / "p.meta").read_bytes()
    proc = cli_util.run("pair", new / "p.meta", "--relocate", "--standard", new / "std.img",
                        "--mirror", new / "mir.img", env=e)
    assert "relocated pair" in proc.stdout and "sampled checksums match" in proc.stdout
    assert (new / "p.meta").read_bytes() != raw
    info = peek(new / "p.meta")
    assert info["standard"] == str(new / "std.img") and info["mirror"] == str(new / "mir.img")
    with Pair.open(new / "p.meta") as p:                        # the tables came along
        assert p.state == "split" and p.volume_trust("standard")["outside"] == "unchanged"
        p.restore(incremental=True).wait()
        assert p.verify() == []
    del meta


def test_relocate_to_a_copy_on_another_file_checks_the_samples(tmp_path: Path) -> None:
    meta = make(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    for name in ("std.img", "mir.img"):                         # a copy: new inodes, same bytes
        shutil.copyfile(tmp_path / "a" / name, b / name)
    with Pair.relocate(meta, b / "std.img", b / "mir.img") as p:
        assert p.state == "split"
        assert "sampled checksums match" in p.volume_trust("standard")["note"]


@pytest.mark.parametrize("bad", ["content", "size", "swapped"])
def test_relocate_refuses_other_volumes_and_changes_nothing(tmp_path: Path, bad: str) -> None:
    meta = make(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    for name in ("std.img", "mir.img"):
        shutil.copyfile(tmp_path / "a" / name, b / name)
    std, mir = b / "std.img", b / "mir.img"
    if bad == "content":
        with open(std, "r+b") as f:                             # track 0 is always sampled
            f.write(b"another volume")
    elif bad == "size":
        with open(std, "ab") as f:
            f.write(b"\0" * TRACK)
    else:
        std, mir = mir, std
        with open(std, "r+b") as f:                             # the mirror differs at track 3... not sampled
            f.seek(0)
            f.write(b"the mirror, not the standard")
    raw = meta.read_bytes()
    with pytest.raises(ForeignMetadataError) as info:
        Pair.relocate(meta, std, mir)
    assert str(std) in str(info.value) or "bytes" in str(info.value)
    assert meta.read_bytes() == raw
    proc = cli_util.run("pair", meta, "--relocate", "--standard", std, "--mirror", mir, check=False,
                        env=env(tmp_path))
    cli_util.one_line_error(proc, 2)
    assert meta.read_bytes() == raw
