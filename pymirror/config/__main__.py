"""``python -m pymirror.config --cflags --libs``: flags for C programs that
link the installed pymirror library (see pymirror.capi)."""
import sys

from ..capi import main

sys.exit(main())
