"""
The errors of the relay queue (L{mtasts_twisted.relay.queue.Queue} and its
L{mtasts_twisted.relay.spool.MessageWriter}), and the SMTP replies the
intake gives for them.
"""

from __future__ import annotations

__all__ = [
    "MessageTooLargeError",
    "QueueError",
    "QueueFullError",
    "UnknownMessageError",
]


class QueueError(Exception):
    """Base class of the queue's errors."""


class QueueFullError(QueueError):
    """
    The queue cannot take this message now: too many messages, too many
    bytes, or the disk is full (an SMTP server answers C{452 4.3.1},
    RFC 3463 "mail system full").
    """


class MessageTooLargeError(QueueError):
    """
    The message is larger than the queue's maximum message size (an SMTP
    server answers C{552 5.3.4}, RFC 3463, RFC 1870).
    """


class UnknownMessageError(QueueError, KeyError):
    """No message with this id is in the queue (or the id is malformed)."""
