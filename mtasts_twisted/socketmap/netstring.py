"""
Netstrings (U{http://cr.yp.to/proto/netstrings.txt}), the framing of every
Postfix socketmap request and reply (socketmap_table(5)): the encoder and a
strict incremental decoder with a size limit.
"""

from __future__ import annotations

__all__ = ["NetstringDecoder", "NetstringError", "encode_netstring"]


class NetstringError(ValueError):
    """
    The input is not a sequence of netstrings within the size limit: the
    stream cannot be resynchronised, so the connection must be closed.

    @ivar frames: the complete netstrings decoded from the same chunk before
        the breakage, in order (they are valid requests and may be answered).
    """

    def __init__(self, message: str, frames: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.frames: list[bytes] = frames if frames is not None else []


def encode_netstring(data: bytes) -> bytes:
    """Return C{data} as one netstring: C{b"<len>:<data>,"}."""
    return b"%d:%s," % (len(data), data)


class NetstringDecoder:
    """
    An incremental netstring decoder: feed it bytes as they arrive, get the
    complete payloads back.

    Strict as the netstring definition asks: the length is a non-empty run of
    ASCII digits without leading zeros ("[len] begins with <30> exactly when
    [string] is empty"), followed by C{:}, the payload and C{,}.  A length
    above C{max_length} is an error as soon as its digits are seen, so a huge
    length prefix never makes the decoder buffer anything.  Once broken, the
    decoder stays broken.

    A payload that is still incomplete is kept as a list of chunks and joined
    once, when its last byte arrives, so byte-at-a-time input costs linear
    time.
    """

    __slots__ = ("_broken", "_buffer", "_chunks", "_digits", "_have", "_want", "max_length")

    def __init__(self, max_length: int = 10000) -> None:
        """
        @param max_length: the largest payload accepted, in bytes.
        """
        if max_length < 0:
            raise ValueError("max_length must not be negative")
        self.max_length = max_length
        self._digits = len(str(max_length))
        self._buffer = b""
        self._chunks: list[bytes] = []
        self._have = 0
        self._want = 0
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete netstring are held."""
        return self._have if self._want else len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """
        Add C{data} and return the payloads of every netstring it completes.

        @raise NetstringError: the input is not a netstring (its C{frames}
            hold the payloads completed before the breakage).
        """
        if self._broken is not None:
            raise NetstringError(self._broken)
        if self._want:
            # A payload is incomplete: collect chunks until it can be complete.
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._want:
                return []
            buf = b"".join(self._chunks)
            self._chunks = []
            self._have = self._want = 0
        elif self._buffer:
            buf = self._buffer + data
        else:
            buf = data
        frames: list[bytes] = []
        pos = 0
        size = len(buf)
        digits = self._digits
        while pos < size:
            colon = buf.find(b":", pos, pos + digits + 1)
            if colon < 0:
                head = buf[pos:pos + digits + 1]
                if len(head) > digits or not head.isdigit():
                    raise self._break("netstring length is not a decimal number within the limit", frames)
                if len(head) > 1 and head[0] == 0x30:
                    raise self._break("netstring length has leading zeros", frames)
                if int(head) > self.max_length:
                    raise self._break(f"netstring longer than {self.max_length} bytes", frames)
                break  # the length is still arriving
            head = buf[pos:colon]
            if not head.isdigit():  # bytes.isdigit(): ASCII digits only
                raise self._break("netstring length is not a decimal number", frames)
            if len(head) > 1 and head[0] == 0x30:
                raise self._break("netstring length has leading zeros", frames)
            length = int(head)
            if length > self.max_length:
                raise self._break(f"netstring longer than {self.max_length} bytes", frames)
            end = colon + 1 + length
            if end >= size:
                # Incomplete payload (or its comma): wait for end + 1 bytes.
                rest = buf[pos:]
                self._chunks = [rest]
                self._have = len(rest)
                self._want = end + 1 - pos
                self._buffer = b""
                return frames
            if buf[end] != 0x2C:
                raise self._break("netstring not terminated by a comma", frames)
            frames.append(buf[colon + 1:end])
            pos = end + 1
        self._buffer = buf[pos:] if pos < size else b""
        return frames

    def _break(self, reason: str, frames: list[bytes]) -> NetstringError:
        self._broken = reason
        self._buffer = b""
        self._chunks = []
        self._have = self._want = 0
        return NetstringError(reason, frames)
