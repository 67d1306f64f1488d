"""Internal helpers both the device (``store/``, ``client/``) and the server use: the
process-wide garbage-collector pause, many-row SQLite INSERTs, and telling a full disk
from other SQLite errors. Nothing here knows models, sync or the server; ``server/``
imports these instead of ``store/`` (DESIGN.md §1, tests/test_layering.py)."""
