"""
Server-side TLS of the loopback test servers: L{ServerTLS} (a certificate
chosen by the client's SNI name, TLS 1.2 or newer) and L{TLS11OnlyServer}
(a server that speaks nothing newer than TLS 1.1, for downgrade tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from mtasts_twisted.testing.pki import IssuedCertificate

__all__ = ["ServerTLS", "TLS11OnlyServer"]


def _server_context(issued: IssuedCertificate) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    leaf, *chain = issued.certificates()
    context.use_certificate(leaf)
    for extra in chain:
        context.add_extra_chain_cert(extra)
    context.use_privatekey(issued.private_key())
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Server TLS (TLS >= 1.2) presenting a certificate chosen by the client's
    SNI name, or a default one.
    """

    def __init__(
        self,
        default: IssuedCertificate,
        by_name: Mapping[str, IssuedCertificate] | None = None,
        *,
        max_version: int | None = None,
    ) -> None:
        """
        @param default: the certificate for unknown or absent SNI names.
        @param by_name: certificates by SNI name (case-insensitive).
        @param max_version: the highest TLS version, e.g.
            C{OpenSSL.SSL.TLS1_2_VERSION}; default: OpenSSL's.
        """
        self._max_version = max_version
        self._by_name: dict[str, SSL.Context] = {}
        for name, issued in (by_name or {}).items():
            self._by_name[name.lower()] = self._configure(_server_context(issued))
        self.context = self._configure(_server_context(default))
        # Set before any Connection uses it: pyOpenSSL forbids changing a
        # used Context.
        self.context.set_tlsext_servername_callback(self._select)

    def _configure(self, context: SSL.Context) -> SSL.Context:
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        if self._max_version is not None:
            context.set_max_proto_version(self._max_version)
        return context

    def _select(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        context = self._by_name.get(name.decode("ascii").lower()) if name else None
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """Make the server side of one TLS connection."""
        return SSL.Connection(self.context, None)


@implementer(IOpenSSLServerConnectionCreator)
class TLS11OnlyServer:
    """
    Server TLS that speaks TLS 1.1 and nothing else (OpenSSL security level
    0, which TLS 1.1 needs nowadays): a client requiring TLS >= 1.2
    receives a protocol_version alert.

    Twisted's C{CertificateOptions} with C{lowerMaximumSecurityTo=TLSv1_1}
    does not make this server: without C{@SECLEVEL=0}, OpenSSL has no
    protocol left and fails with "no protocols available", sometimes
    without a well-formed alert.
    """

    def __init__(self, issued: IssuedCertificate) -> None:
        """@param issued: the certificate to present."""
        context = _server_context(issued)
        context.set_min_proto_version(SSL.TLS1_1_VERSION)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """Make the server side of one TLS connection."""
        return SSL.Connection(self.context, None)
