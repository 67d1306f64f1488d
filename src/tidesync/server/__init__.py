"""The sync server: HTTP auth API, WebSocket sync endpoint, permissions, fan-out, storage.

The server integrates the changesets clients upload (by the merge rules of ``core/merge.py``),
gives each a dense server version, and sends them to the other clients. Storage backends live
in :mod:`tidesync.server.storage`; the server never imports :mod:`tidesync.client`.
"""
