"""
A Postfix socketmap policy server answering C{smtp_tls_policy_maps} lookups
from the MTA-STS policy cache.

Postfix is pointed at it with one line of C{main.cf}, the same line that
serves postfix-mta-sts-resolver ("the peer")::

    smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix

Protocol (socketmap_table(5)): every request and every reply is one
netstring (C{<len>:<data>,}); a request is C{NAME <space> KEY}; a reply is
C{OK <data>}, C{NOTFOUND }, C{TEMP <reason>}, C{TIMEOUT <reason>} or
C{PERM <reason>}, at most 100000 characters.  Requests may be pipelined:
answers go out strictly in request order.

The rooms, bottom to top:

  - L{netstring<mtasts_twisted.socketmap.netstring>}: the netstring codec
    and its size limit;
  - L{request<mtasts_twisted.socketmap.request>}: a request payload split
    into map name and key, the key normalised to a policy domain;
  - L{settings<mtasts_twisted.socketmap.settings>}: L{SocketmapSettings};
  - L{answers<mtasts_twisted.socketmap.answers>}: the pure decision from a
    policy (and the MX hosts) to the reply text, with every answer form;
  - L{dane<mtasts_twisted.socketmap.dane>}: with C{SocketmapSettings.dane},
    what DANE says of the next hop and the answer that never overrides it
    (C{OK dane-only}, C{OK dane}, C{TEMP});
  - L{deferreds<mtasts_twisted.socketmap.deferreds>}: L{result_now
    <mtasts_twisted.socketmap.deferreds.result_now>}, reading an
    already-fired L{Deferred<twisted.internet.defer.Deferred>};
  - L{admission<mtasts_twisted.socketmap.admission>}: the open connections
    and which one is closed to make room at a connection cap;
  - L{protocol<mtasts_twisted.socketmap.protocol>}: one connection (request
    order, idle timeouts, broken netstrings, the bounds on what a client can
    make us hold, C{TCP_NODELAY}) and L{ImmediateWriter};
  - L{server<mtasts_twisted.socketmap.server>}: L{SocketmapFactory}, the
    lookups, the memo of rendered answers, the counts and the connection
    caps.

Every name this package had as one module is importable from here.
"""

from mtasts_twisted.socketmap.answers import (
    ANSWER_KINDS,
    MAX_REPLY,
    policy_has_wildcard,
    render_answer,
    render_failure,
)
from mtasts_twisted.socketmap.netstring import NetstringDecoder, NetstringError, encode_netstring
from mtasts_twisted.socketmap.protocol import ImmediateWriter, SocketmapProtocol
from mtasts_twisted.socketmap.request import MalformedRequestError, ParsedKey, parse_key, parse_request
from mtasts_twisted.socketmap.server import CONNECTION_EVENTS, SocketmapFactory
from mtasts_twisted.socketmap.settings import SocketmapSettings

__all__ = [
    "ANSWER_KINDS",
    "CONNECTION_EVENTS",
    "ImmediateWriter",
    "MAX_REPLY",
    "MalformedRequestError",
    "NetstringDecoder",
    "NetstringError",
    "ParsedKey",
    "SocketmapFactory",
    "SocketmapProtocol",
    "SocketmapSettings",
    "encode_netstring",
    "parse_key",
    "parse_request",
    "policy_has_wildcard",
    "render_answer",
    "render_failure",
]
