"""NBD export of pairs (see docs/nbd.md)."""
from .exports import check_pair_name
from .server import NBDServer

__all__ = ["NBDServer", "check_pair_name"]
