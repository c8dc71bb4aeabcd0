"""Metadata format 2: files written by the release before it (format 1,
tests/data/format1/) are upgraded in place when opened, in every state a
pair can be left in (mid-job included), and then behave exactly as that
release behaved with them (expected.json, recorded by it); a file of a
newer format is refused.  Crash safety of the upgrade: csrc/tests/test_upgrade.c."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("format1", Path(__file__).with_name("format1.py"))
format1 = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("format1", format1)
_spec.loader.exec_module(format1)
from pymirror import ForeignMetadataError, Pair, Volume
from pymirror.check import check_metadata
from pymirror.pair import peek, track_counts

EXPECTED = json.loads((format1.DATA / "expected.json").read_text())


def versions(meta: Path) -> list:
    return [s["version"] for s in check_metadata(meta)["slots"]]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def follow_up(state: str, p: Pair) -> str:
    """The command make_format1.py ran after opening (same order of tests)."""
    if p.progress.running:
        p.resume().wait()
        return "resume"
    if state == "new":
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


@pytest.mark.parametrize("state", format1.STATES)
def test_a_format_1_pair_is_upgraded_in_place_and_behaves_as_before(tmp_path: Path, state: str) -> None:
    meta, std, mir = format1.place(state, tmp_path)
    assert versions(meta) == [1, 1]
    before = peek(meta)                      # reading the header does not upgrade it
    assert versions(meta) == [1, 1]
    exp = EXPECTED[state]
    with Pair.open(meta) as p:
        assert versions(meta) == [2, 2]      # both slots rewritten at open
        assert str(p.state) == exp["open"]["state"]
        assert bool(p.progress.running) == exp["open"]["running"]
        assert track_counts(p) == exp["open"]["counts"]
        assert p.mirror_invalid == exp["open"]["mirror_invalid"]
        # nothing recorded about outside changes in format 1: said, not guessed
        assert p.volume_trust("standard")["outside"] == "not-recorded"
        assert p.volume_trust("standard")["identity_recorded"]      # recorded by the upgrade
    after_upgrade = peek(meta)
    assert after_upgrade["generation"] >= before["generation"] + 2
    assert {k: after_upgrade[k] for k in ("standard", "mirror", "size", "track_size")} == \
        {k: before[k] for k in ("standard", "mirror", "size", "track_size")}
    with Pair.open(meta) as p:               # a format-2 file: opened as it is
        assert peek(meta)["generation"] == after_upgrade["generation"]
        assert p.volume_trust("standard")["outside"] == "unchanged"   # stamped at the clean close
        cmd = follow_up(state, p)
        assert cmd == exp["after"]["command"]
        assert str(p.state) == exp["after"]["state"]
        assert p.verify() == exp["after"]["differing"]
    assert sha(std) == exp["after"]["standard_sha256"]
    assert sha(mir) == exp["after"]["mirror_sha256"]
    assert check_metadata(meta)["verdict"] == 0


def set_version(meta: Path, slot: int, version: int) -> None:
    with open(meta, "r+b") as f:
        f.seek(slot * format1.SLOT)
        hdr = bytearray(f.read(format1.SLOT))
        struct.pack_into("<I", hdr, format1.VERSION_AT, version)
        struct.pack_into("<I", hdr, format1.SLOT - 4, format1.crc32c(bytes(hdr[:format1.SLOT - 4])))
        f.seek(slot * format1.SLOT)
        f.write(hdr)


def new_pair(tmp_path: Path) -> Path:
    for name in ("s.img", "m.img"):
        Volume.create(tmp_path / name, 1 << 20).close()
    Pair.create(tmp_path / "p.meta", tmp_path / "s.img", tmp_path / "m.img").close()
    return tmp_path / "p.meta"


@pytest.mark.parametrize("slots", [(0, 1), (0,), (1,)])
def test_a_newer_format_is_refused_with_a_clear_message(tmp_path: Path, slots: tuple) -> None:
    meta = new_pair(tmp_path)
    for s in slots:                          # one newer slot is enough: the other is an older state
        set_version(meta, s, 3)
    raw = meta.read_bytes()
    for call in (lambda: Pair.open(meta), lambda: peek(meta)):
        with pytest.raises(ForeignMetadataError) as info:
            call()
        assert "metadata format 3 is newer than this pymirror (reads up to 2): upgrade pymirror" in str(info.value)
    assert meta.read_bytes() == raw          # nothing written
    assert check_metadata(meta)["verdict"] == 2         # unusable by this pymirror


def test_a_moved_format_1_pair_is_relocated_and_upgraded_at_once(tmp_path: Path) -> None:
    import gzip

    paths = {}
    for part in ("meta", "std", "mir"):                      # as made: its paths name a folder long gone
        paths[part] = tmp_path / f"split.{part}"
        paths[part].write_bytes(gzip.decompress((format1.DATA / f"split.{part}.gz").read_bytes()))
    with pytest.raises(FileNotFoundError) as info:
        Pair.open(paths["meta"])
    assert "--relocate" in str(info.value)
    assert versions(paths["meta"]) == [1, 1]                 # a refused open writes nothing
    with Pair.relocate(paths["meta"], paths["std"], paths["mir"]) as p:
        assert p.state == "split" and track_counts(p) == EXPECTED["split"]["open"]["counts"]
        assert "only the size was checked" in p.volume_trust("standard")["note"]
    assert versions(paths["meta"]) == [2, 2]
    assert peek(paths["meta"])["standard"] == str(paths["std"])
    with Pair.open(paths["meta"]) as p:
        p.restore(incremental=True, protect=True).wait()
        assert p.verify() == []
    assert sha(paths["std"]) == EXPECTED["split"]["after"]["standard_sha256"]
