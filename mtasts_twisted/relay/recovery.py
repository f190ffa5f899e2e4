"""
What L{Queue.recover<mtasts_twisted.relay.queue.Queue.recover>} decides
about one entry of the queue directory after a crash, and where a broken
one goes: L{check_entry} (a complete message, or why not), L{quarantine}
(moved aside with an error line, never silently dropped), and
L{read_envelope} (an envelope file, never more than it may hold).
"""

from __future__ import annotations

import os
import re
import secrets
import time

from twisted.logger import Logger

from mtasts_twisted.relay.envelope import MAX_ENVELOPE_BYTES, QueuedMessage, decode_envelope
from mtasts_twisted.relay.spool import BODY_NAME, ENVELOPE_NAME, fsync_dir

__all__ = ["ID_RE", "QUARANTINE", "check_entry", "quarantine", "read_envelope"]

# The queue's namespace, so log lines read as before this module was cut out.
log = Logger(namespace="mtasts_twisted.relay.queue")

#: A message directory's name: the queue time in microseconds, then 32 random bits.
ID_RE = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}$")
#: Where broken entries go, under the queue directory.
QUARANTINE = "quarantine"


def read_envelope(path: str) -> QueuedMessage:
    """Read and validate an envelope file, never more than it may hold."""
    with open(path, "rb") as f:
        # One octet more than allowed: decode_envelope refuses the excess.
        return decode_envelope(f.read(MAX_ENVELOPE_BYTES + 1))


def check_entry(name: str, path: str) -> str | None:
    """
    Whether entry C{name} (at C{path}) is a complete message: L{None}, or
    what is wrong with it.  A leftover C{envelope.json.tmp} (an update cut
    short) is removed on the way.
    """
    if not ID_RE.match(name) or os.path.islink(path) or not os.path.isdir(path):
        return "not a queue entry"
    tmp = os.path.join(path, ENVELOPE_NAME + ".tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
        fsync_dir(path)
    extra = set(os.listdir(path)) - {BODY_NAME, ENVELOPE_NAME}
    if extra:
        return f"unexpected files {sorted(extra)}"
    body = os.path.join(path, BODY_NAME)
    envelope = os.path.join(path, ENVELOPE_NAME)
    if not os.path.isfile(envelope):
        return "body without envelope"
    if not os.path.isfile(body):
        return "envelope without body"
    try:
        message = read_envelope(envelope)
    except (ValueError, KeyError, TypeError) as e:
        return f"envelope does not parse: {e}"
    if message.id != name:
        return f"envelope id {message.id!r} differs from its directory"
    size = os.path.getsize(body)
    if size != message.size:
        return f"body has {size} octets, envelope says {message.size}"
    return None


def quarantine(directory: str, name: str, problem: str) -> None:
    """Move entry C{name} of queue C{directory} to C{quarantine/}, durably, with an error line."""
    qdir = os.path.join(directory, QUARANTINE)
    os.makedirs(qdir, exist_ok=True)
    target = os.path.join(qdir, f"{name}.{int(time.time())}.{secrets.token_hex(2)}")
    os.rename(os.path.join(directory, name), target)
    fsync_dir(qdir)
    log.error(
        "queue entry {name} quarantined to {target}: {problem}",
        name=name,
        target=target,
        problem=problem,
    )
