"""Write-intent with mark-ahead (docs/format.md, "Write-intent"), against a
plain-Python model: which 4 MiB regions a sequence of host writes marks,
how many metadata commits the writes wait for, and what an unclean stop
turns into CHANGED tracks.

The unclean stop is made in process: the metadata file's bytes are taken
while the pair is open (what a crash leaves on disk), the pair is closed,
and those bytes are put back before reopening."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

import pymirror
from pymirror._core import lib

TRACK = 64 << 10
REGION = 4 << 20
TPR = REGION // TRACK            # tracks per region
NREG = 40
SIZE = NREG * REGION
AHEAD_MAX = 16


class IntentModel:
    """The rule of csrc/meta.c's intent() and mark_ahead(), one thread."""

    def __init__(self, nregions: int) -> None:
        self.n = nregions
        self.marked: set[int] = set()

    def write(self, r0: int, r1: int) -> bool:
        """Mark for a write over regions r0..r1; True if it waits for a commit."""
        need = any(r not in self.marked for r in range(r0, r1 + 1))
        self.marked |= set(range(r0, r1 + 1))
        if need:
            run = 0
            while run < AHEAD_MAX and run < r0 and (r0 - 1 - run) in self.marked:
                run += 1
            self.marked |= {r for r in range(r1 + 1, r1 + run + 1) if r < self.n}
        return need


def make_split_pair(d):
    for n in ("s", "m"):
        pymirror.Volume.create(d / f"{n}.img", SIZE).close()
    pair = pymirror.Pair.create(d / "p.meta", d / "s.img", d / "m.img")
    pair.establish(assume_equal=True)
    pair.split()
    return pair


def changed_tracks(pair, side=lib.PM_STANDARD) -> set[int]:
    with pair._call as p:
        bm = lib.pm_table_flag(lib.pm_pair_table(p, side), lib.PM_CHANGED)
        return {t for t in range(SIZE // TRACK) if lib.pm_bitmap_get(bm, t) == 1}


def region_tracks(regions) -> set[int]:
    return {r * TPR + i for r in regions for i in range(TPR)}


def write_region(pair, r0: int, span: int) -> tuple[int, int]:
    """A write from near the end of region r0 over span more regions."""
    off = r0 * REGION + REGION - 8192 if span else r0 * REGION + 4096
    length = 16384 + (span - 1) * REGION if span else 4096
    length = min(length, SIZE - off)
    pair.write(off, b"w" * length)
    return off // REGION, (off + length - 1) // REGION


def test_a_sequential_stream_waits_for_few_commits(tmp_path):
    with make_split_pair(tmp_path) as pair:
        c0 = pair.progress.commits
        for r in range(NREG):                      # one write per region, in order
            pair.write(r * REGION, b"s" * 65536)
        commits = pair.progress.commits - c0
    model = IntentModel(NREG)
    assert commits == sum(model.write(r, r) for r in range(NREG))
    assert commits <= 7                            # 40 regions: 0, 1, 3, 7, 15, 31 (and no more)


def test_random_writes_mark_nothing_ahead(tmp_path):
    with make_split_pair(tmp_path) as pair:
        c0 = pair.progress.commits
        for r in (30, 10, 20, 0, 38):              # no marked region just before any of them
            pair.write(r * REGION, b"r" * 4096)
        assert pair.progress.commits - c0 == 5
        raw = (tmp_path / "p.meta").read_bytes()
    (tmp_path / "p.meta").write_bytes(raw)         # as a crash would leave it
    with pymirror.Pair.open(tmp_path / "p.meta") as pair:
        assert changed_tracks(pair) == region_tracks({30, 10, 20, 0, 38})


writes = st.lists(st.one_of(
    st.tuples(st.just("at"), st.integers(0, NREG - 1), st.integers(0, 2)),
    st.tuples(st.just("run"), st.integers(0, NREG - 1), st.integers(2, 24)),
), min_size=1, max_size=8)


@settings(max_examples=25, deadline=None)
@given(ops=writes)
def test_marks_and_commits_follow_the_model_and_an_unclean_stop_keeps_them(tmp_path_factory, ops):
    d = tmp_path_factory.mktemp("intent")
    model = IntentModel(NREG)
    expected = 0
    with make_split_pair(d) as pair:
        c0 = pair.progress.commits
        for kind, r, n in ops:
            if kind == "at":
                expected += model.write(*write_region(pair, r, n))
            else:
                for x in range(r, min(r + n, NREG)):
                    expected += model.write(*write_region(pair, x, 0))
        assert pair.progress.commits - c0 == expected
        raw = (d / "p.meta").read_bytes()
        written = changed_tracks(pair)
    assert written <= region_tracks(model.marked)
    (d / "p.meta").write_bytes(raw)
    with pymirror.Pair.open(d / "p.meta") as pair:
        # every track of every marked region counts as changed: a superset of
        # the writes, and no more than the model's marks (mark-ahead is bounded)
        assert changed_tracks(pair) == region_tracks(model.marked)
        pair.restore(incremental=True).wait()       # copies back every written track
        assert pair.verify() == []


def test_concurrent_streams_keep_every_write_and_mark_a_bounded_amount(tmp_path):
    """Four threads each write their own sequential stream, interleaved; after
    an unclean stop every written track is CHANGED, and nothing beyond a
    stream's regions plus AHEAD_MAX regions is."""
    import threading
    starts = (0, 9, 18, 27)                       # streams of 8 regions, one region apart
    with make_split_pair(tmp_path) as pair:
        barrier = threading.Barrier(len(starts))

        def stream(r0):
            barrier.wait()
            for off in range(r0 * REGION, (r0 + 8) * REGION, 256 << 10):
                pair.write(off, b"t" * (256 << 10))

        threads = [threading.Thread(target=stream, args=(r,)) for r in starts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        raw = (tmp_path / "p.meta").read_bytes()
    (tmp_path / "p.meta").write_bytes(raw)
    with pymirror.Pair.open(tmp_path / "p.meta") as pair:
        got = changed_tracks(pair)
        written = region_tracks(r + i for r in starts for i in range(8))
        assert written <= got
        assert got <= region_tracks(x for r in starts for x in range(r, min(r + 8 + AHEAD_MAX, NREG)))
        pair.restore(incremental=True).wait()
        assert pair.verify() == []
