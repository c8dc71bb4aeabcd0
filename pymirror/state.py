"""The pair's states (see docs/states.md)."""
from __future__ import annotations

import enum

__all__ = ["State", "STATES"]


class State(str, enum.Enum):
    """A pair's state.  Each member is also its name as a string, so
    ``pair.state == "split"`` holds, ``str(State.SPLIT) == "split"``, and it
    serialises to JSON as ``"split"``."""

    NEW = "new"
    SYNCING = "syncing"
    ESTABLISHED = "established"
    SPLIT = "split"
    RESTORING = "restoring"
    RESTORED = "restored"
    DETACHED = "detached"   # the mirror failed on a host write (docs/states.md)

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def from_code(cls, code: int) -> "State":
        """The member for the C core's ``enum pm_state`` value."""
        if isinstance(code, int) and 0 <= code < len(_BY_CODE):
            return _BY_CODE[code]
        raise ValueError(f"unknown pair state code {code!r}")


_BY_CODE = tuple(State)     # the C enum's order: PM_STATE_NEW = 0, ...
#: the state names in the C enum's order (plain strings)
STATES = tuple(s.value for s in State)
