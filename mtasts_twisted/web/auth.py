"""
Who may read the status page: L{requires_auth} says whether an endpoint
reaches beyond this host, and L{protect} puts the pages behind twisted.cred
with the schemes the operator enabled:

  - HTTP basic authentication (RFC 7617) with the users of a
    C{--web-password-file} (L{read_password_file}: C{USER:PASSWORD} lines);
  - bearer tokens (RFC 6750 §2.1, C{Authorization: Bearer TOKEN}) from a
    C{--web-token-file} (L{read_token_file}: one token a line, at least
    L{MIN_TOKEN} characters, the file readable by its owner only).  A token
    is accepted only in the C{Authorization} header, never in the URL
    (RFC 6750 §2.3 would let it leak into logs, history and the
    C{Referer}).

Both files are read once, at start (before C{twistd -u} drops privileges,
so they may be readable by root only), and every secret is compared in
constant time (L{hmac.compare_digest}).  A request without valid
credentials is answered C{401} with one C{WWW-Authenticate} challenge per
enabled scheme (RFC 7235 §4.1).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Sequence
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.web.guard import BasicCredentialFactory, HTTPAuthSessionWrapper
from twisted.web.iweb import ICredentialFactory, IRequest
from twisted.web.resource import IResource
from zope.interface import Attribute, implementer

__all__ = [
    "MIN_TOKEN",
    "REALM",
    "BearerCredentialFactory",
    "IBearerToken",
    "PasswordFile",
    "TokenFile",
    "protect",
    "read_password_file",
    "read_token_file",
    "requires_auth",
]

#: The realm of both challenges.
REALM = b"mtasts status"

#: The fewest characters of a token (a guessable one is no protection).
MIN_TOKEN = 16

#: RFC 6750 §2.1: C{b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="}.
_B64TOKEN = re.compile(rb"[A-Za-z0-9._~+/-]+=*")


def _ignore(*args: object) -> None:
    return None


@implementer(IRealm)
class _Realm:
    def __init__(self, resource: IResource) -> None:
        self._resource = resource

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, IResource, Callable[[], None]]:
        if IResource in interfaces:
            return IResource, self._resource, _ignore
        raise NotImplementedError()


@implementer(ICredentialsChecker)
class PasswordFile:
    """
    The users of a C{--web-password-file}, read once (before C{twistd -u}
    drops privileges, so the file may be readable by root only); passwords
    are compared in constant time.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict[bytes, bytes]) -> None:
        """
        @param users: password by user name.
        """
        self._users = users

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes | tuple[()]]:
        """The user name, or a failure with L{UnauthorizedLogin}."""
        expected = self._users.get(credentials.username)
        password = credentials.password
        if expected is not None and hmac.compare_digest(expected, password):
            return succeed(credentials.username)
        return fail(UnauthorizedLogin())


def _read_lines(path: str) -> list[bytes]:
    try:
        with open(path, "rb") as f:
            return [line.strip() for line in f.read().splitlines()]
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror}") from None


def read_password_file(path: str) -> PasswordFile:
    """
    The checker of a C{--web-password-file}: lines C{USER:PASSWORD}
    (C{#} starts a comment line).

    @raise ValueError: the file cannot be read or names no user (one line).
    """
    users = {}
    for line in _read_lines(path):
        if not line or line.startswith(b"#"):
            continue
        user, colon, password = line.partition(b":")
        if not colon or not user or not password:
            raise ValueError("expected lines USER:PASSWORD")
        users[user] = password
    if not users:
        raise ValueError("expected lines USER:PASSWORD")
    return PasswordFile(users)


class IBearerToken(ICredentials):
    """The token of an C{Authorization: Bearer} header (RFC 6750 §2.1)."""

    token = Attribute("The token, as bytes.")


@implementer(IBearerToken)
class _BearerToken:
    def __init__(self, token: bytes) -> None:
        self.token = token


@implementer(ICredentialFactory)
class BearerCredentialFactory:
    """
    The C{Bearer} scheme (RFC 6750 §2.1) for twisted.web's
    L{HTTPAuthSessionWrapper}: its challenge (RFC 6750 §3) and the
    credentials of an C{Authorization: Bearer TOKEN} header.
    """

    #: Lower case: twisted.web matches the header's scheme lower-cased.
    scheme = b"bearer"

    def __init__(self, realm: bytes = REALM) -> None:
        """
        @param realm: the realm of the challenge.
        """
        self.realm = realm

    def getChallenge(self, request: IRequest) -> dict[str, bytes]:
        """The challenge's parameters: the realm."""
        return {"realm": self.realm}

    def decode(self, response: bytes, request: IRequest) -> IBearerToken:
        """
        The token after C{Bearer }.

        @raise LoginFailed: it is not an RFC 6750 C{b64token}.
        """
        token = response.strip()
        if not _B64TOKEN.fullmatch(token):
            raise LoginFailed("not a bearer token")
        return _BearerToken(token)


@implementer(ICredentialsChecker)
class TokenFile:
    """
    The tokens of a C{--web-token-file}, read once; a presented token is
    compared in constant time with every one of them (so neither the match
    nor its position shows in the time taken).
    """

    credentialInterfaces = (IBearerToken,)

    def __init__(self, tokens: Sequence[bytes]) -> None:
        """
        @param tokens: the accepted tokens.
        """
        self._tokens = tuple(tokens)

    def requestAvatarId(self, credentials: IBearerToken) -> Deferred[bytes | tuple[()]]:
        """C{b"token"}, or a failure with L{UnauthorizedLogin}."""
        presented = credentials.token
        matches = [hmac.compare_digest(token, presented) for token in self._tokens]
        if any(matches):
            return succeed(b"token")
        return fail(UnauthorizedLogin())


def read_token_file(path: str) -> TokenFile:
    """
    The checker of a C{--web-token-file}: one token a line (RFC 6750
    C{b64token} characters, at least L{MIN_TOKEN} of them); blank lines and
    lines starting with C{#} are skipped.  The file must not be readable or
    writable by group or others (it holds secrets, like an SSH key).

    @raise ValueError: the file cannot be read, is open to others, holds
        no token, or a line is not a token (one line, naming the line).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"readable or writable by group or others (mode {stat.S_IMODE(mode):04o}); "
                         "chmod 600 it")
    tokens = []
    for number, line in enumerate(_read_lines(path), 1):
        if not line or line.startswith(b"#"):
            continue
        if not _B64TOKEN.fullmatch(line):
            raise ValueError(f"line {number}: not a token (letters, digits and -._~+/, then any =)")
        if len(line) < MIN_TOKEN:
            raise ValueError(f"line {number}: a token needs at least {MIN_TOKEN} characters")
        tokens.append(line)
    if not tokens:
        raise ValueError(f"no token in it (one a line, at least {MIN_TOKEN} characters)")
    return TokenFile(tokens)


def protect(resource: IResource, password_file: str | None = None, token_file: str | None = None) -> IResource:
    """
    C{resource} behind the schemes given: HTTP basic authentication
    (RFC 7617) with the users of C{password_file}, bearer tokens (RFC 6750)
    from C{token_file}, or both (either credential is enough).

    @raise ValueError: neither file is given, or one cannot be used (see
        L{read_password_file}, L{read_token_file}).
    """
    checkers: list[ICredentialsChecker] = []
    factories: list[ICredentialFactory] = []
    if password_file is not None:
        checkers.append(read_password_file(password_file))
        factories.append(BasicCredentialFactory(REALM))
    if token_file is not None:
        checkers.append(read_token_file(token_file))
        factories.append(BearerCredentialFactory(REALM))
    if not checkers:
        raise ValueError("protect: give a password file, a token file or both")
    return HTTPAuthSessionWrapper(Portal(_Realm(resource), checkers), factories)


def _split_endpoint(description: str) -> list[str]:
    """Split an endpoint description at unescaped colons, unescaping."""
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def requires_auth(description: str) -> bool:
    """
    Whether a server endpoint description may be reached from beyond this
    host, so the status page must ask for credentials: every C{tcp},
    C{tcp6} or C{ssl} endpoint except one whose C{interface=} is a loopback
    address (C{127.0.0.0/8}, C{::1}), and every other kind except C{unix}.
    A host name as the interface counts as not loopback.

    @param description: e.g. C{tcp:8080:interface=127.0.0.1}.
    """
    kind, *args = _split_endpoint(description)
    kind = kind.strip().lower()
    if kind == "unix":
        return False
    if kind not in ("tcp", "tcp6", "ssl"):
        return True
    for arg in args:
        name, equals, value = arg.partition("=")
        if equals and name.strip() == "interface":
            try:
                return not ipaddress.ip_address(value.strip().strip("[]")).is_loopback
            except ValueError:
                return True
    return True
