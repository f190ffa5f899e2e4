"""
C{mtasts-twisted queue list|show ID|retry ID|delete ID}: the relay queue in
C{DATA-DIR/queue}, and the operations behind it (L{queue_list},
L{queue_show}, L{queue_retry}, L{queue_delete}) on any
L{mtasts_twisted.relay.Queue}.

A running relay sees what these change at its next periodic poll (they
may run in another process: the queue directory is the shared state).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any, TextIO

import attrs

from mtasts_twisted.cli.common import EX_NOINPUT, EX_OK

if TYPE_CHECKING:
    from mtasts_twisted.relay import Queue, QueuedMessage

__all__ = ["queue_delete", "queue_list", "queue_retry", "queue_show", "run_queue"]


def _summary(message: QueuedMessage, now: float) -> dict[str, Any]:
    return {
        "id": message.id,
        "sender": message.sender,
        "recipients": [r.address for r in message.recipients],
        "pending": [r.address for r in message.pending],
        "size": message.size,
        "created": message.created,
        "age": max(0.0, now - message.created),
        "attempts": message.attempts,
        "next_attempt": message.next_attempt,
        "last_error": message.last_error,
    }


def queue_list(queue: Queue) -> list[dict[str, Any]]:
    """
    One summary dict per queued message, oldest first (C{id}, C{sender},
    C{recipients}, C{pending}, C{size}, C{created}, C{age}, C{attempts},
    C{next_attempt}, C{last_error}).
    """
    now = queue.now()
    return [_summary(m, now) for m in queue.list()]


def queue_show(queue: Queue, ident: str) -> dict[str, Any]:
    """
    The full envelope of one message, as JSON-able dict (the summary plus
    per-recipient C{recipients_state}).

    @raise mtasts_twisted.relay.UnknownMessageError: no such message.
    """
    message = queue.get(ident)
    data = _summary(message, queue.now())
    data["recipients_state"] = [r.to_json() for r in message.recipients]
    return data


def queue_retry(queue: Queue, ident: str) -> QueuedMessage:
    """
    Make every pending recipient of a message due now.  A running relay
    picks it up at its next poll (if that message is in flight, the relay's
    own envelope update may win: retry again).

    @raise mtasts_twisted.relay.UnknownMessageError: no such message.
    """
    from twisted.logger import Logger  # not at import: the other commands need no Twisted

    message = queue.get(ident)
    now = queue.now()
    for r in message.pending:
        message = message.with_recipient(attrs.evolve(r, next_attempt=now))
    queue.update(message)
    Logger(namespace=__name__).info("retry of {id} requested", id=ident)
    return message


def queue_delete(queue: Queue, ident: str) -> None:
    """
    Remove a message without delivering it and without a DSN.

    @raise mtasts_twisted.relay.UnknownMessageError: no such message.
    """
    queue.remove(ident)


def run_queue(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """C{mtasts-twisted queue list|show ID|retry ID|delete ID} on C{DATA-DIR/queue}."""
    from mtasts_twisted.relay import Queue, UnknownMessageError

    directory = os.path.join(args.data_dir, "queue")
    if not os.path.isdir(directory):
        if args.action == "list":
            out.write("[]\n" if args.json else "the queue is empty\n")
            return EX_OK
        err.write(f"mtasts-twisted queue: no queue at {directory}\n")
        return EX_NOINPUT
    queue = Queue(directory)
    try:
        if args.action == "list":
            items = queue_list(queue)
            if args.json:
                out.write(json.dumps(items) + "\n")
            elif not items:
                out.write("the queue is empty\n")
            for item in items if not args.json else ():
                out.write(f"{item['id']}\t{item['sender'] or '<>'}\t{len(item['pending'])} pending"
                          f"\tage {int(item['age'])} s\tattempts {item['attempts']}"
                          f"{chr(9) + item['last_error'] if item['last_error'] else ''}\n")
        elif args.action == "show":
            out.write(json.dumps(queue_show(queue, args.id), indent=None if args.json else 2) + "\n")
        elif args.action == "retry":
            queue_retry(queue, args.id)
            out.write(f"{args.id}: due now\n")
        else:
            queue_delete(queue, args.id)
            out.write(f"{args.id}: deleted\n")
    except UnknownMessageError:
        err.write(f"mtasts-twisted queue: no message {args.id}\n")
        return EX_NOINPUT
    return EX_OK
