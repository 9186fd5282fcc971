"""Identifiers shared by every layer, as distinct types so a replica id is never mistaken for a URL or a key."""

from __future__ import annotations

from typing import NewType

BackendId = NewType("BackendId", str)
"""A replica's stable id: its base URL as configured or discovered (``http://10.0.0.7:8000``)."""

BlockKey = NewType("BlockKey", int)
"""The router's 64-bit key for one full block of tokens, chained over every block before it."""
