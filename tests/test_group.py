"""Consistency groups (issue 10 item 7): ``Pair.hold_io`` holds host writes
at a barrier, and ``pymirror.group`` splits, establishes and restores many
pairs at one instant.  The test that matters is dependent-write consistency:
writers make causal chains across 100 pairs (each write issued only after
the previous one was acknowledged, its sequence number in the data); after a
group split under that load, the mirrors hold a prefix of every chain (if a
mirror holds write B, it holds every write acknowledged before B was issued).
The same check run against a plain loop of splits finds a violation, so the
test can fail."""
from __future__ import annotations

import random
import struct
import threading
import time

import pytest

import pymirror
from pymirror import StateError, group

TRACK = 4096
SIZE = 4 * TRACK
NPAIRS = 100
NWRITERS = 4
SLOT = 512                      # writer w writes its records at offset w * SLOT


def make_pairs(n=NPAIRS):
    pairs = [pymirror.Pair.memory(SIZE, TRACK) for _ in range(n)]
    for p in pairs:
        p.establish(assume_equal=True)
    return pairs


class Chains:
    """Writers making causal chains over the pairs."""

    rounds = 0

    def __init__(self, pairs):
        Chains.rounds += 1
        self.magic = 0x5EC00000 + Chains.rounds     # records of earlier rounds do not count
        self.pairs = pairs
        self.stop = threading.Event()
        self.logs = [[] for _ in range(NWRITERS)]     # (seq, pair index), in issue order
        self.errors = []
        self.threads = [threading.Thread(target=self._run, args=(w,)) for w in range(NWRITERS)]

    def _run(self, w):
        rng = random.Random(w)
        seq = 0
        try:
            while not self.stop.is_set():
                seq += 1
                i = rng.randrange(len(self.pairs))
                self.pairs[i].write(w * SLOT, struct.pack("<QQ", self.magic, seq))   # acknowledged on return
                self.logs[w].append((seq, i))
        except Exception as exc:   # pragma: no cover - reported by the test
            self.errors.append(exc)

    def __enter__(self):
        for t in self.threads:
            t.start()
        while min(len(log) for log in self.logs) < 200:   # the load is on
            time.sleep(0.005)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def violations(self):
        """Where the mirrors do not hold a prefix of a writer's chain: with S
        the latest of writer w's writes found in any mirror, every pair's
        mirror must hold w's last write to it issued up to S (it was
        acknowledged before S was issued).  (writer, pair, found, expected)."""
        bad = []
        for w in range(NWRITERS):
            seen = []
            for p in self.pairs:
                magic, seq = struct.unpack("<QQ", p.mirror_read(w * SLOT, 16))
                seen.append(seq if magic == self.magic else 0)
            cut = max(seen)
            expect = [0] * len(self.pairs)
            for seq, i in self.logs[w]:
                if seq > cut:
                    break
                expect[i] = seq
            bad += [(w, i, seen[i], expect[i]) for i in range(len(self.pairs)) if seen[i] != expect[i]]
        return bad


def close_all(pairs):
    for p in pairs:
        p.close()


def test_group_split_keeps_dependent_writes_consistent():
    pairs = make_pairs()
    try:
        for _ in range(3):
            with Chains(pairs) as chains:
                group.split(pairs)
                hold = group.last_hold_seconds
                time.sleep(0.02)                       # writers go on, standard only
            assert not chains.errors
            assert all(p.state == "split" for p in pairs)
            assert chains.violations() == []
            assert hold is not None and 0 < hold < 10
            jobs = group.establish(pairs, incremental=True)
            assert len(jobs) == NPAIRS and all(j.wait(timeout=60) for j in jobs)
            assert all(p.state == "established" and p.verify() == [] for p in pairs)
    finally:
        close_all(pairs)


def test_a_plain_loop_of_splits_breaks_dependent_writes():
    """The check above can fail: split the pairs one by one under the same
    load and chains are cut (observed on the first attempt of every run:
    300 to 390 of the 400 (writer, pair) records wrong, e.g. a mirror holding
    writer 0's write 26923 while pair 0's mirror holds its write 3125 where
    the chain says 26900-odd)."""
    pairs = make_pairs()
    try:
        found = []
        for _ in range(10):
            with Chains(pairs) as chains:
                for p in pairs:
                    p.split()
                    time.sleep(0.0002)             # a script's pace between commands
            found = chains.violations()
            if found:
                break
            for p in pairs:
                p.establish(incremental=True).wait(timeout=60)
        assert found, "a plain split loop under dependent writes never broke a chain"
    finally:
        close_all(pairs)


def test_hold_io_blocks_writes_and_flushes_then_lets_them_go():
    pair = pymirror.Pair.memory(SIZE, TRACK)
    pair.establish(assume_equal=True)
    done = []

    def writer():
        pair.write(0, b"late")
        done.append("write")
        pair.flush()
        done.append("flush")

    with pair.hold_io():
        with pair.hold_io():                      # holds nest
            t = threading.Thread(target=writer)
            t.start()
            time.sleep(0.1)
            assert done == []
            assert pair.read(0, 4) == bytes(4)    # reads go on
        time.sleep(0.05)
        assert done == []                         # still held by the outer hold
        pair.split()                              # commands work while held
        assert pair.mirror_read(0, 4) == bytes(4)
    t.join(timeout=10)
    assert done == ["write", "flush"]
    assert pair.read(0, 4) == b"late" and pair.mirror_read(0, 4) == bytes(4)
    pair.close()


def test_group_commands_check_every_state_first():
    pairs = make_pairs(5)
    try:
        pairs[3].split()
        with pytest.raises(StateError, match="nothing was changed"):
            group.split(pairs)
        assert [p.state for p in pairs] == ["established"] * 3 + ["split", "established"]
        with pytest.raises(ValueError, match="twice"):
            group.split([pairs[0], pairs[0]])
        with pytest.raises(ValueError):
            group.split([])
        group.split(pairs[:3] + pairs[4:])
        assert all(p.state == "split" for p in pairs)
        # an inconsistent mirror stops a group restore before anything changes
        pairs[1].write(0, b"x")
        pairs[1].establish(incremental=True, config=pymirror.CopyConfig(rate=1))
        pairs[1].cancel()
        assert pairs[1].mirror_invalid >= 1
        with pytest.raises(StateError, match="inconsistent"):
            group.restore(pairs)
        assert all(p.state == "split" for p in pairs)
        with pytest.raises(StateError, match="incremental establish"):
            group.establish(pairs + [pymirror.Pair.memory(SIZE, TRACK)], incremental=True)
        jobs = group.establish(pairs, incremental=True, config=pymirror.CopyConfig())
        assert all(j.wait(timeout=30) for j in jobs)
        group.split(pairs)
        for p in pairs:
            p.write(TRACK, b"damage")
        jobs = group.restore(pairs, incremental=True, protect=True)
        assert len(jobs) == 5 and all(j.wait(timeout=30) for j in jobs)
        assert all(p.state == "restored" and p.read(TRACK, 6) == bytes(6) for p in pairs)
    finally:
        close_all(pairs)


def test_close_waits_for_a_hold_and_the_writes_it_held():
    pair = pymirror.Pair.memory(SIZE, TRACK)
    pair.establish(assume_equal=True)
    events = []
    held = threading.Event()
    release = threading.Event()

    def holder():
        with pair.hold_io():
            held.set()
            release.wait(10)
            events.append("released")

    def writer():
        pair.write(0, b"w")
        events.append("written")

    def closer():
        pair.close()
        events.append("closed")

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    held.wait(10)
    threads += [threading.Thread(target=writer), threading.Thread(target=closer)]
    threads[1].start()
    time.sleep(0.05)
    threads[2].start()
    time.sleep(0.1)
    assert events == []                     # the write waits at the barrier, close waits for both
    release.set()
    for t in threads:
        t.join(timeout=10)
    assert events[0] == "released" and events[-1] == "closed" and "written" in events
    with pytest.raises(pymirror.ClosedError):
        pair.write(0, b"late")
