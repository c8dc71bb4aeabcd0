"""pymirror._record: the frozen value classes behave as the frozen dataclasses
they replace at run time (repr, equality, hash, construction errors,
assignment refused, pickling), and pymirror's own records keep their fields."""
from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import Optional

import pytest

import pymirror
from pymirror import CopyConfig, Progress, Settings
from pymirror._record import FrozenInstanceError, fields, record
from pymirror.uri import VolumeURI


def twins():
    """The same class body as a record and as a frozen dataclass."""
    def body(deco):
        @deco(frozen=True)
        class Point:
            x: int
            y: int
            label: Optional[str] = None
            seen: int = 0

            def __post_init__(self) -> None:
                if self.x < 0:
                    raise ValueError("x must not be negative")
        return Point
    return body(record), body(dataclasses.dataclass)


CALLS = [((1, 2), {}), ((1,), {"y": 2}), ((), {"x": 1, "y": 2, "label": "a"}), ((1, 2, "b", 3), {}),
         ((), {"y": 5, "x": 0, "seen": 7})]
BAD = [((), {}), ((1,), {}), ((1, 2, 3, 4, 5), {}), ((1, 2), {"z": 1}), ((1, 2), {"x": 3}), ((-1, 2), {})]


@pytest.mark.parametrize("args,kwargs", CALLS)
def test_a_record_is_built_and_shown_as_the_dataclass(args, kwargs) -> None:
    R, D = twins()
    r, d = R(*args, **kwargs), D(*args, **kwargs)
    assert repr(r) == repr(d)
    assert fields(r) == tuple(f.name for f in dataclasses.fields(d))
    assert [getattr(r, f) for f in fields(r)] == [getattr(d, f) for f in fields(r)]
    assert r == R(*args, **kwargs) and hash(r) == hash(R(*args, **kwargs)) == hash(d)
    assert r != R(9, 9) and r != d and (r == 1) is False
    assert R.__match_args__ == D.__match_args__
    assert r.__dict__ == d.__dict__


@pytest.mark.parametrize("args,kwargs", BAD)
def test_a_record_refuses_what_the_dataclass_refuses(args, kwargs) -> None:
    R, D = twins()
    with pytest.raises(Exception) as by_dataclass:
        D(*args, **kwargs)
    with pytest.raises(by_dataclass.type) as by_record:
        R(*args, **kwargs)
    assert str(by_record.value).split(".")[-1] == str(by_dataclass.value).split(".")[-1]


def test_a_record_is_frozen_and_pickles() -> None:
    R, _ = twins()
    r = R(1, 2, "a")
    with pytest.raises(FrozenInstanceError):
        r.x = 3
    with pytest.raises(AttributeError):
        r.other = 3
    with pytest.raises(AttributeError):
        del r.x
    assert copy.copy(r) == r and copy.deepcopy(r) == r
    assert r.__replace__(y=5) == R(1, 5, "a")           # copy.replace (Python 3.13)
    with pytest.raises(ValueError):
        r.__replace__(x=-1)                             # through __init__ and __post_init__
    for v in (CopyConfig(copiers=2, host_latency_target="5ms"), Settings(track_size=1 << 20), VolumeURI("file", "/a", "/a")):
        assert pickle.loads(pickle.dumps(v)) == v


def test_pymirrors_records_keep_their_fields_and_checks() -> None:
    c = CopyConfig()
    assert repr(c) == ("CopyConfig(copiers=0, batch_size=0, rate=0, retries=3, read_policy='redirect', "
                       "pace='auto', host_latency_target='2x', order='hot')")
    assert c.replace(copiers=2, rate=None) == CopyConfig(copiers=2)
    with pytest.raises(pymirror.ConfigError):
        c.replace(copiers=65)           # replace validates, as dataclasses.replace did
    with pytest.raises(pymirror.ConfigError):
        CopyConfig(read_policy="nope")
    assert Settings().copy == c and Settings(track_size=4096).track_size == 4096
    with pytest.raises(pymirror.ConfigError):
        Settings(track_size=3000)
    assert VolumeURI("file", "/x", "/x").remote is False and VolumeURI("nbd", "nbd://h").path is None
    pair = pymirror.Pair.memory(1 << 20, track_size=64 << 10)
    p = pair.progress
    assert isinstance(p, Progress) and p == pair.progress
    d = p.as_dict()
    assert list(d)[: len(fields(p))] == list(fields(p)) and d["state"] == p.state
    assert {"state", "tracks_pending", "host_read_p99", "pace_quiet", "bytes_zeroed"} <= set(fields(Progress))
    pair.close()
