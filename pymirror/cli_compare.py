"""The command line's side of comparing: ``verify`` here or through the
daemon, and ``pymirror pair --adopt`` (a pair over two volumes that already
hold data), with the progress display the copy jobs use.  The options
(``verify``, ``establish --compare``, ``restore --compare``, ``pair
--adopt``) live with their commands in cli_pair.py and cli.py."""
from __future__ import annotations

import os
from typing import Any, Optional

from .cli import Ctx, out
from .sizes import format_size
from .targets import DONE, TIMEOUT, LocalTarget, RemoteTarget, connect_or_none


def adopt_here(meta: str, standard: str, mirror: str, track_size: Optional[int]) -> None:
    """Create the pair, compare its sides (progress on stderr; Ctrl-C cancels
    and removes the new metadata), and leave it split with the differing
    tracks CHANGED."""
    from .compare import Comparison
    from .pair import Pair
    from .progress import follow_snapshots

    pair = Pair.create(meta, standard, mirror, track_size=track_size)
    try:
        comp = Comparison(pair, "adopt").start()
        try:
            follow_snapshots(lambda s: DONE if comp.wait(s) else TIMEOUT, lambda: compare_snapshot(comp),
                             f"adopt {meta}")
        except BaseException:
            comp.cancel()
            comp.wait()
            raise
        differing = comp.result()
        out(f"adopted pair {meta}: {standard} + {mirror}, {format_size(pair.size)}, "
            f"{pair.tracks} tracks of {format_size(pair.track_size)}; {differing} differ and are marked "
            f"changed; state {pair.state} (copy them with 'pymirror establish --incremental {meta}' "
            f"or 'pymirror restore --incremental {meta}')")
        pair.close()
    except BaseException:
        pair.close()
        try:
            os.unlink(meta)      # nothing is left behind
        except FileNotFoundError:
            pass
        raise


def verify_here(t: LocalTarget) -> dict[str, Any]:
    """Verify a pair opened here, following the C comparison with the same
    display as a copy job (stderr); Ctrl-C cancels it."""
    from .compare import Comparison
    from .progress import follow_snapshots
    from .report import check_settled, verify_result

    pair = t.pair
    check_settled(pair, t.label)
    comp = Comparison(pair).start()
    try:
        follow_snapshots(lambda s: DONE if comp.wait(s) else TIMEOUT, lambda: compare_snapshot(comp),
                         f"verify {t.label}")
    except BaseException:
        comp.cancel()
        comp.wait()
        raise
    return verify_result(pair, comp.result())


def verify_remote(obj: Ctx, t: RemoteTarget) -> dict[str, Any]:
    """Verify through the daemon (its online verify, in C), showing the
    progress it reports in ``status`` (read on a second connection) while
    the verb waits on the first.  Ctrl-C stops following; the daemon's
    verify goes on and keeps its result (``status``: last_verify)."""
    import threading

    from .progress import follow_snapshots

    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["info"] = t.verify()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            result["exc"] = exc

    poller = connect_or_none(obj.control)
    th = threading.Thread(target=work, name="verify", daemon=True)
    th.start()

    def wait(seconds: float) -> str:
        th.join(seconds)
        return TIMEOUT if th.is_alive() else DONE

    def snapshot() -> Optional[dict[str, Any]]:
        if poller is None:
            return None
        try:
            pairs = poller.status(t.name).get("pairs") or []
        except Exception:  # noqa: BLE001 - progress is best effort (a group has no one entry)
            return None
        v = pairs[0].get("verify") if len(pairs) == 1 else None
        if not v:
            return None
        total, done = int(v["tracks_total"]), int(v["tracks_done"])
        return {"tracks_total": total, "tracks_done": done, "tracks_pending": total - done,
                "fraction": done / total if total else 1.0, "rate": None, "eta": None}

    try:
        follow_snapshots(wait, snapshot, f"verify {t.label}")
    finally:
        if poller is not None:
            poller.close()
    th.join()
    if "exc" in result:
        raise result["exc"]
    info: dict[str, Any] = result["info"]
    return info


def compare_snapshot(comp: Any) -> dict[str, Any]:
    """A comparison's progress in the shape progress.describe() shows."""
    p = comp.progress()
    left = p.tracks_total - p.tracks_done
    per_track = p.bytes_read / p.tracks_done if p.tracks_done else 0
    eta = left * per_track / p.rate if p.rate > 0 else None
    return {**p.as_dict(), "tracks_pending": left, "eta": eta, "elapsed": p.elapsed}
