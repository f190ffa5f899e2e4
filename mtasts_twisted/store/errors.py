"""
The store's one error: L{StoreError}, with a C{reason} saying what failed.
"""

from __future__ import annotations

from mtasts_twisted.policy import MTASTSError

__all__ = ["StoreError"]


class StoreError(MTASTSError):
    """
    The store cannot be opened or used.

    The message names the file or database and says what to do.  C{reason}
    is one of C{not-a-database}, C{database-corrupt}, C{database-read-only},
    C{schema-too-new}, C{not-an-mtasts-database}, C{database-locked},
    C{database-unavailable}, C{bad-database-url}, C{store-closed} or
    C{store-error}.
    """

    reason = "store-error"
