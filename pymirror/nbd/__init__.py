"""NBD export of a pair (see docs/nbd.md)."""
from .server import NBDServer

__all__ = ["NBDServer"]
