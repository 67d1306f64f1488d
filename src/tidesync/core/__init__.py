"""Pure logic shared by client and server: changesets, HLC, merge, query language.

Nothing here performs I/O, reads the clock or draws random numbers: callers pass them in.
"""
