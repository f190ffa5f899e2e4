"""
C{mtasts-twisted queue list|show ID|retry ID|delete ID}: the relay queue in
C{DATA-DIR/queue}, and the operations behind it (L{queue_list},
L{queue_show}, L{queue_retry}, L{queue_delete}) on any
L{mtasts_twisted.relay.Queue}.

A running relay sees what these change at its next periodic poll (they
may run in another process: the queue directory is the shared state).

Output: C{list} prints one line per message (id, sender, the pending
recipients, age, attempts, next attempt, last error), C{show} the
envelope with dates and every recipient's state; C{--json} prints the
dicts of L{queue_list} and L{queue_show} (times as POSIX seconds).  A
queue that cannot be written (a full disk, a read-only file system) is
one line on standard error and exit status 73; a damaged envelope, 65.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any, TextIO

import attrs

from mtasts_twisted.cli.common import EX_CANTCREAT, EX_DATAERR, EX_NOINPUT, EX_OK, iso

if TYPE_CHECKING:
    from mtasts_twisted.relay import Queue, QueuedMessage, RecipientState

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


def duration(seconds: float) -> str:
    """C{seconds} for people: C{"45 s"}, C{"12 min"}, C{"3 h 12 min"}, C{"2 d 3 h"}."""
    seconds = int(max(0.0, seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 3600:
        return f"{minutes} min"
    if seconds < 86400:
        return f"{hours} h {minutes % 60} min" if minutes % 60 else f"{hours} h"
    return f"{days} d {hours % 24} h" if hours % 24 else f"{days} d"


def _when(timestamp: float, now: float) -> str:
    """An absolute time with how far it is from now."""
    if timestamp <= now:
        return f"{iso(timestamp)} ({duration(now - timestamp)} ago)"
    return f"{iso(timestamp)} (in {duration(timestamp - now)})"


def _address(address: str) -> str:
    return f"<{address}>"


def format_list_line(item: dict[str, Any]) -> str:
    """One message of L{queue_list} as a tab-separated line."""
    pending = item["pending"]
    fields = [
        item["id"],
        _address(item["sender"]),
        ", ".join(_address(r) for r in pending) or "-",
        f"{len(pending)} of {len(item['recipients'])} pending",
        f"age {duration(item['age'])}",
        f"attempts {item['attempts']}",
    ]
    if item["next_attempt"] is not None:
        now = item["created"] + item["age"]
        fields.append(f"next {iso(item['next_attempt'])}" if item["next_attempt"] > now else "due now")
    if item["last_error"]:
        fields.append(item["last_error"])
    return "\t".join(fields)


def _recipient_line(r: RecipientState, now: float, width: int) -> str:
    from mtasts_twisted.relay import RecipientStatus

    parts = [f"  {_address(r.address):<{width}}", f"{r.state.value:<9}"]
    if r.attempts:
        parts.append(f"attempts {r.attempts}")
    if r.state is RecipientStatus.PENDING:
        parts.append(f"next {_when(r.next_attempt, now)}" if r.next_attempt > now else "due now")
    if r.reason:
        parts.append(r.reason)
    if r.remote_mta:
        parts.append(f"via {r.remote_mta}")
    return "  ".join(parts)


def format_show(message: QueuedMessage, now: float) -> str:
    """One message for people: dates, not POSIX seconds; a line per recipient."""
    pending = message.pending
    lines = [
        f"message     {message.id}",
        f"sender      {_address(message.sender)}",
        f"size        {message.size} octets",
        f"created     {_when(message.created, now)}",
        f"attempts    {message.attempts}",
    ]
    next_attempt = message.next_attempt
    if next_attempt is not None:
        lines.append(f"next        {_when(next_attempt, now) if next_attempt > now else 'due now'}")
    if message.last_error:
        lines.append(f"last error  {message.last_error}")
    lines.append(f"recipients  {len(pending)} of {len(message.recipients)} pending")
    width = max(len(_address(r.address)) for r in message.recipients)
    lines += [_recipient_line(r, now, width) for r in message.recipients]
    return "\n".join(lines) + "\n"


def run_queue(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """C{mtasts-twisted queue list|show ID|retry ID|delete ID} on C{DATA-DIR/queue}."""
    from mtasts_twisted.relay import Queue, QueueFullError, UnknownMessageError

    directory = os.path.join(args.data_dir, "queue")
    prefix = "mtasts-twisted queue: "
    if not os.path.isdir(directory):
        if args.action == "list":
            out.write("[]\n" if args.json else "the queue is empty\n")
            return EX_OK
        err.write(f"{prefix}no message {args.id}: the queue is empty (no queue at {directory})\n")
        return EX_NOINPUT
    try:
        queue = Queue(directory)
        if args.action == "list":
            items = queue_list(queue)
            if args.json:
                out.write(json.dumps(items) + "\n")
            elif not items:
                out.write("the queue is empty\n")
            else:
                out.writelines(format_list_line(item) + "\n" for item in items)
        elif args.action == "show":
            if args.json:
                out.write(json.dumps(queue_show(queue, args.id)) + "\n")
            else:
                out.write(format_show(queue.get(args.id), queue.now()))
        elif args.action == "retry":
            queue_retry(queue, args.id)
            out.write(f"{args.id}: due now\n")
        else:
            queue_delete(queue, args.id)
            out.write(f"{args.id}: deleted\n")
    except UnknownMessageError:
        empty = " (the queue is empty)" if not _any_message(directory) else ""
        err.write(f"{prefix}no message {args.id}{empty}\n")
        return EX_NOINPUT
    except QueueFullError as e:
        err.write(f"{prefix}cannot write the queue in {directory}: {_reason(e)}\n")
        return EX_CANTCREAT
    except (ValueError, KeyError, TypeError) as e:
        # Only the envelope of one message is read and parsed here.
        err.write(f"{prefix}the envelope of {args.id} is damaged: {e}\n")
        return EX_DATAERR
    except OSError as e:
        if args.action in ("list", "show"):
            err.write(f"{prefix}cannot read the queue in {directory}: {_reason(e)}\n")
            return EX_NOINPUT
        err.write(f"{prefix}cannot {args.action} {args.id} in {directory}: {_reason(e)}\n")
        return EX_CANTCREAT
    return EX_OK


def _reason(error: BaseException) -> str:
    """The system's words for C{error} (without the path), one line."""
    cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _any_message(directory: str) -> bool:
    try:
        return any(not name.startswith(("tmp-", "del-")) and name != "quarantine" for name in os.listdir(directory))
    except OSError:
        return True
