"""
The relay phase's two helper processes (both asyncio, loopback only):

    python bench/relay.py sink --cert C --key K [--port 25] [--control 9998]
    python bench/relay.py submit [--host 127.0.0.x] --port P --count N --tag T [--conns 4] [--timeout 120]

``sink``: an MX on 127.0.0.1:PORT that offers STARTTLS with the certificate
of mx.relay.bench.test (from the bench CA), accepts every message and
discards it.  It counts messages per run tag (the ``bench-TAG-...`` local
part of MAIL FROM), separately for messages that arrived after STARTTLS
("tls") and without it ("plain"), with the monotonic time of the first and
the last.  It cannot verify the client: the sender verifies the sink's
certificate (our relay under the enforce policy; Postfix with the peer's
``secure match=...`` answer and smtp_tls_CAfile).  A JSON line protocol on
127.0.0.1:CONTROL answers ``{"op": "stats", "tag": T}``.  Prints READY when
listening.

``submit``: the load.  N messages of about 2 KB, one recipient each at
relay.bench.test, over CONNS SMTP connections to 127.0.0.1:PORT with
PIPELINING (MAIL, RCPT, DATA in one write), as fast as the relay accepts.
Then polls the sink until it has received all N messages for the tag or
TIMEOUT seconds have passed since the first submission.  Prints one JSON
object: submitted, submit_s, received (over TLS), plain, total_s (first
submission to the last message received at the sink), msgs_per_s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import sys
import time

HOST = "127.0.0.1"
MX_NAME = b"mx.relay.bench.test"
DOMAIN = "relay.bench.test"
TAG = re.compile(rb"bench-([A-Za-z0-9]+)-")


# --- the sink ---------------------------------------------------------------------------


class Counts:
    def __init__(self) -> None:
        self.tags: dict[str, dict] = {}

    def add(self, tag: str, tls: bool) -> None:
        entry = self.tags.get(tag)
        now = time.monotonic()
        if entry is None:
            entry = self.tags[tag] = {"tls": 0, "plain": 0, "first": now, "last": now}
        entry["tls" if tls else "plain"] += 1
        entry["last"] = now


async def sink_session(reader, writer, context: ssl.SSLContext, counts: Counts) -> None:
    tls = False
    tag = None
    rcpts = 0

    def send(text: bytes) -> None:
        writer.write(text)

    try:
        send(b"220 " + MX_NAME + b" ESMTP bench sink\r\n")
        for _ in range(1_000_000):  # bounded: one iteration per command
            line = await asyncio.wait_for(reader.readline(), 60)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                tag, rcpts = None, 0
                ext = [b"PIPELINING", b"8BITMIME", b"SIZE 10240000"]
                if not tls:
                    ext.append(b"STARTTLS")
                lines = [MX_NAME] + ext
                send(b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) + b"250 " + lines[-1] + b"\r\n")
            elif verb == b"STAR" and not tls:
                send(b"220 2.0.0 Ready to start TLS\r\n")
                await writer.drain()
                await asyncio.wait_for(writer.start_tls(context), 30)
                tls, tag, rcpts = True, None, 0
            elif verb == b"MAIL":
                m = TAG.search(line)
                tag = m.group(1).decode() if m else "untagged"
                rcpts = 0
                send(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                rcpts += 1
                send(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                if tag is None or not rcpts:
                    send(b"503 5.5.1 Bad sequence of commands\r\n")
                    continue
                send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                first = await asyncio.wait_for(reader.readline(), 60)
                if first != b".\r\n":
                    await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 60)
                counts.add(tag, tls)
                tag, rcpts = None, 0
                send(b"250 2.0.0 Ok: queued\r\n")
            elif verb in (b"RSET", b"NOOP"):
                if verb == b"RSET":
                    tag, rcpts = None, 0
                send(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                send(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                send(b"502 5.5.2 Command not recognized\r\n")
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
        return
    finally:
        writer.close()


async def control_session(reader, writer, counts: Counts) -> None:
    try:
        for _ in range(10000):
            line = await reader.readline()
            if not line:
                return
            request = json.loads(line)
            if request.get("op") == "stats":
                reply = counts.tags.get(request.get("tag"), {"tls": 0, "plain": 0, "first": None, "last": None})
            else:
                reply = {"ok": True}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    finally:
        writer.close()


async def sink_main(args) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    counts = Counts()
    await asyncio.start_server(lambda r, w: sink_session(r, w, context, counts), HOST, args.port,
                               backlog=1024, limit=1 << 20)
    await asyncio.start_server(lambda r, w: control_session(r, w, counts), HOST, args.control)
    print("READY", flush=True)
    await asyncio.Event().wait()


def json_request(port: int, request: dict, timeout: float = 30) -> dict:
    """Send one JSON line to a loopback control port; return its one-line JSON answer."""
    import socket

    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def sink_stats(port: int, tag: str) -> dict:
    return json_request(port, {"op": "stats", "tag": tag}, timeout=10)


# --- the load -----------------------------------------------------------------------------


def message(tag: str, i: int) -> bytes:
    head = (f"From: <bench-{tag}-{i}@sender.bench.test>\r\nTo: <user{i}@{DOMAIN}>\r\n"
            f"Subject: relay bench {tag} {i}\r\nMessage-ID: <{tag}.{i}@sender.bench.test>\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = (b"The quick brown fox jumps over the lazy dog; relay bench filler text 0123456789.\r\n")
    body = line * ((2048 - len(head)) // len(line) + 1)
    return head + body


async def read_reply(reader) -> tuple[int, bytes]:
    lines = []
    for _ in range(200):
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        lines.append(line)
        if line[3:4] != b"-":
            break
    return int(lines[-1][:3]), b"".join(lines)


async def submit_connection(host: str, port: int, tag: str, todo: list, state: dict, deadline: float) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        code, text = await read_reply(reader)
        if code != 220:
            raise RuntimeError(f"greeting {text!r}")
        writer.write(b"EHLO load.bench.test\r\n")
        code, text = await read_reply(reader)
        if code != 250 or b"PIPELINING" not in text:
            raise RuntimeError(f"EHLO {text!r}")
        while todo and time.monotonic() < deadline:
            i = todo.pop()
            if state["first"] is None:
                state["first"] = time.monotonic()
            writer.write(f"MAIL FROM:<bench-{tag}-{i}@sender.bench.test>\r\n"
                         f"RCPT TO:<user{i}@{DOMAIN}>\r\nDATA\r\n".encode())
            replies = [await read_reply(reader) for _ in range(3)]
            if [c for c, _ in replies] != [250, 250, 354]:
                raise RuntimeError(f"message {i}: {replies!r}")
            writer.write(message(tag, i) + b".\r\n")
            code, text = await read_reply(reader)
            if code != 250:
                raise RuntimeError(f"message {i}: end of data {text!r}")
            state["submitted"] += 1
            state["last"] = time.monotonic()
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


async def submit_main(args) -> dict:
    todo = list(range(args.count - 1, -1, -1))
    state = {"first": None, "last": None, "submitted": 0}
    start = time.monotonic()
    deadline = start + args.timeout
    results = await asyncio.gather(*[submit_connection(args.host, args.port, args.tag, todo, state, deadline)
                                     for _ in range(args.conns)], return_exceptions=True)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    first = state["first"] or start
    stats = {}
    for _ in range(100000):  # bounded by the deadline too
        stats = sink_stats(args.control, args.tag)
        if stats["tls"] + stats["plain"] >= state["submitted"] or time.monotonic() > first + args.timeout:
            break
        await asyncio.sleep(0.05)
    received = stats["tls"]
    end = stats["last"] if stats.get("last") else time.monotonic()
    total = max(1e-9, end - first)
    return {
        "tag": args.tag, "count": args.count, "conns": args.conns, "submitted": state["submitted"],
        "submit_s": round((state["last"] or first) - first, 3), "received": received, "plain": stats["plain"],
        "total_s": round(total, 3), "msgs_per_s": round(received / total, 1),
        "complete": received == args.count, "errors": errors[:3], "t_first": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--port", type=int, default=25)
    s.add_argument("--control", type=int, default=9998)
    l = sub.add_parser("submit")
    l.add_argument("--host", default=HOST, help="the relay's intake address (loopback)")
    l.add_argument("--port", type=int, required=True)
    l.add_argument("--count", type=int, default=300)
    l.add_argument("--tag", required=True)
    l.add_argument("--conns", type=int, default=4)
    l.add_argument("--timeout", type=float, default=120.0)
    l.add_argument("--control", type=int, default=9998)
    args = parser.parse_args()
    if args.cmd == "sink":
        asyncio.run(sink_main(args))
    else:
        if not args.host.startswith("127."):
            raise SystemExit("--host: loopback only")
        if not re.fullmatch(r"[A-Za-z0-9]+", args.tag):
            raise SystemExit("--tag: letters and digits only")
        json.dump(asyncio.run(submit_main(args)), sys.stdout)
        print()


if __name__ == "__main__":
    main()
