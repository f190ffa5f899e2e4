"""
Which nameservers to ask: a nameserver as given on the command line
(L{parse_nameserver}, L{format_nameserver}) and those of a resolv.conf
file (L{system_nameservers}).  No network I/O.
"""

from __future__ import annotations

import ipaddress

from twisted.logger import Logger

__all__ = ["DEFAULT_PORT", "Nameserver", "format_nameserver", "parse_nameserver", "system_nameservers"]

# The namespace of the module this room was cut from, so log lines read as before.
log = Logger(namespace="mtasts_twisted.dns")

#: A nameserver: an IP address (text) and a port.
Nameserver = tuple[str, int]

DEFAULT_PORT = 53


def _parse_port(text: str, original: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"invalid nameserver {original!r}: port {text!r} is not a number")
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"invalid nameserver {original!r}: port {port} out of range 1-65535")
    return port


def _parse_ip(text: str, original: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"invalid nameserver {original!r}: {text!r} is not an IP address"
            " (use IP, IP:PORT or [IPv6]:PORT; host names are not allowed)"
        ) from None


def parse_nameserver(text: str) -> Nameserver:
    """
    Parse a nameserver given as C{IP}, C{IPv4:PORT}, C{IPv6} or
    C{[IPv6]:PORT} (the CLI's and twistd's C{--nameserver}).

    @param text: the nameserver as written.
    @return: C{(ip, port)}, the IP normalised (IPv6 compressed), the port
        53 when not given.
    @raise ValueError: with a message naming C{text}, for anything else
        (host names, bad ports, unbalanced brackets, empty text).
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid nameserver {text!r}: expected text")
    value = text.strip()
    if not value:
        raise ValueError("invalid nameserver '': empty")
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"invalid nameserver {text!r}: missing ']'")
        address = _parse_ip(value[1:end], text)
        rest = value[end + 1 :]
        if not rest:
            port = DEFAULT_PORT
        elif rest.startswith(":"):
            port = _parse_port(rest[1:], text)
        else:
            raise ValueError(f"invalid nameserver {text!r}: unexpected {rest!r} after ']'")
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        address = _parse_ip(host, text)
        port = _parse_port(port_text, text)
    else:
        # A bare IPv4 address, or a bare IPv6 address (two or more colons).
        address = _parse_ip(value, text)
        port = DEFAULT_PORT
    return str(address), port


def format_nameserver(server: Nameserver) -> str:
    """
    Format a nameserver as C{IP:PORT} or C{[IPv6]:PORT} (the inverse of
    L{parse_nameserver}).

    @param server: C{(ip, port)}.
    @return: the text form, for messages and logs.
    """
    host, port = server
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def system_nameservers(path: str = "/etc/resolv.conf") -> tuple[Nameserver, ...]:
    """
    Read the nameservers of a resolv.conf file (no network I/O).

    @param path: the file to read.
    @return: its C{nameserver} lines as C{(ip, 53)} pairs, in order, bad
        lines skipped; C{(("127.0.0.1", 53),)} when the file is missing or
        names none (resolv.conf(5)'s default: a server on this machine).
    """
    servers: list[Nameserver] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1])
            except ValueError:
                log.warn("ignoring bad nameserver {value!r} in {path}", value=fields[1], path=path)
                continue
            servers.append((str(address), DEFAULT_PORT))
    return tuple(servers) or (("127.0.0.1", DEFAULT_PORT),)
