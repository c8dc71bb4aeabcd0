"""The command line's side of comparing: ``pymirror pair --adopt`` (a pair
over two volumes that already hold data), with the progress display the
copy jobs use.  ``verify``, ``establish --compare`` and ``restore
--compare`` live with their verbs in cli_pair.py."""
from __future__ import annotations

import os
from typing import Optional

from .cli import out
from .sizes import format_size


def adopt_here(meta: str, standard: str, mirror: str, track_size: Optional[int]) -> None:
    """Create the pair, compare its sides (progress on stderr; Ctrl-C cancels
    and removes the new metadata), and leave it split with the differing
    tracks CHANGED."""
    from .cli_pair import compare_snapshot
    from .compare import Comparison
    from .pair import Pair
    from .progress import follow_snapshots
    from .targets import DONE, TIMEOUT

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
