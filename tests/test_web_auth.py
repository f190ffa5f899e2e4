"""
Who may read the status page (L{mtasts_twisted.web.auth}): the token file
(C{--web-token-file}) and the password file, bearer tokens and basic
authentication alone and together, the C{WWW-Authenticate} challenges,
the options' one-line errors, and one service over a real loopback socket.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtasts_twisted import service
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.web import StatusResource, WebSite, WebSources, protect, read_token_file
from mtasts_twisted.web.auth import MIN_TOKEN

from .clients import RawClient
from .test_metrics_http import settle
from .test_web_service import OptionsMixin

TOKEN = "tok-0123456789abcdef"
OTHER = "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg="


def secret_file(case: SynchronousTestCase, text: str, mode: int = 0o600) -> str:
    """A file holding C{text} with C{mode}."""
    path = case.mktemp()
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class TokenFileTests(SynchronousTestCase):
    """C{read_token_file}: one token a line, comments and blank lines skipped, refusals in one line."""

    def refused(self, text: str, mode: int = 0o600) -> str:
        error = self.assertRaises(ValueError, read_token_file, secret_file(self, text, mode))
        self.assertNotIn("\n", str(error))
        return str(error)

    def test_tokens(self) -> None:
        """Every token line counts; comments, blank lines and surrounding blanks do not."""
        checker = read_token_file(secret_file(self, f"# status page\n\n  {TOKEN}  \n{OTHER}\n# {'x' * 20}\n"))
        self.assertEqual(checker._tokens, (TOKEN.encode(), OTHER.encode()))

    def test_refusals(self) -> None:
        """An empty file, a short token, a token with blanks, and a missing file are refused."""
        self.assertIn("no token in it", self.refused(""))
        self.assertIn("no token in it", self.refused("# only a comment\n\n"))
        self.assertEqual(self.refused(f"{TOKEN}\nshort-token\n"),
                         f"line 2: a token needs at least {MIN_TOKEN} characters")
        self.assertIn("line 1: not a token", self.refused(f"{TOKEN} # inline comment\n"))
        self.assertIn("line 1: not a token", self.refused("<script>alert(1)</script>\n"))
        error = self.assertRaises(ValueError, read_token_file, "/nonexistent/tokens")
        self.assertEqual(str(error), "cannot read it: No such file or directory")

    def test_open_to_others(self) -> None:
        """A file readable or writable by group or others is refused, saying its mode."""
        for mode in (0o644, 0o640, 0o604, 0o620, 0o602):
            self.assertEqual(self.refused(f"{TOKEN}\n", mode),
                             f"readable or writable by group or others (mode {mode:04o}); chmod 600 it")
        read_token_file(secret_file(self, f"{TOKEN}\n", 0o400))


class ProtectTests(SynchronousTestCase):
    """The pages behind L{protect}: 401 with a challenge per scheme enabled, the page with good credentials."""

    def site(self, password: str | None = None, token: str | None = None) -> WebSite:
        clock = Clock()
        resource = protect(StatusResource(WebSources(clock=clock, stats=None)),
                           None if password is None else secret_file(self, password),
                           None if token is None else secret_file(self, token))
        return WebSite(resource, clock)

    def status(self, site: WebSite, authorization: str | None = None, path: str = "/nothing") -> tuple[int, bytes]:
        """The status code of one request (404: let through to the pages, which have no C{/nothing})."""
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        header = "" if authorization is None else f"Authorization: {authorization}\r\n"
        channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: h\r\n{header}\r\n".encode())
        head = transport.value().partition(b"\r\n\r\n")[0]
        channel.connectionLost(None)
        return int(head.split(b" ")[1]), head

    def test_tokens(self) -> None:
        """Only a listed token passes, only as C{Authorization: Bearer}; the challenge is Bearer alone."""
        site = self.site(token=f"{TOKEN}\n{OTHER}\n")
        for authorization, expected in [
            (None, 401),
            (f"Bearer {TOKEN}", 404),
            (f"bearer {OTHER}", 404),  # RFC 7235 §2.1: the scheme is case-insensitive
            (f"Bearer {TOKEN[:-1]}", 401),
            (f"Bearer {TOKEN}x", 401),
            ("Bearer ", 401),
            (f"Bearer {TOKEN} {TOKEN}", 401),
            (basic("admin", TOKEN), 401),  # basic is not enabled
            (f"Token {TOKEN}", 401),
        ]:
            status, head = self.status(site, authorization)
            self.assertEqual(status, expected, authorization)
            if status == 401:
                self.assertIn(b'WWW-Authenticate: bearer realm="mtasts status"', head)
                self.assertNotIn(b"basic realm", head)
        # RFC 6750 §2.3's URI query parameter is not accepted (it would leak into logs and Referer).
        self.assertEqual(self.status(site, None, f"/nothing?access_token={TOKEN}")[0], 401)

    def test_both_schemes(self) -> None:
        """With both files either credential passes, and a 401 offers both schemes."""
        site = self.site(password="admin:s3cret\n", token=f"{TOKEN}\n")
        for authorization, expected in [
            (None, 401),
            (basic("admin", "s3cret"), 404),
            (f"Bearer {TOKEN}", 404),
            (basic("admin", TOKEN), 401),
            ("Bearer s3cret-s3cret-s3cret", 401),
        ]:
            status, head = self.status(site, authorization)
            self.assertEqual(status, expected, authorization)
            if status == 401:
                self.assertIn(b'WWW-Authenticate: basic realm="mtasts status"', head)
                self.assertIn(b'WWW-Authenticate: bearer realm="mtasts status"', head)

    def test_password_only(self) -> None:
        """With the password file alone a bearer token is not a way in; the challenge is basic alone."""
        site = self.site(password="admin:s3cret\n")
        self.assertEqual(self.status(site, basic("admin", "s3cret"))[0], 404)
        status, head = self.status(site, "Bearer s3cret-s3cret-s3cret")
        self.assertEqual(status, 401)
        self.assertNotIn(b"bearer realm", head)

    def test_nothing_to_check(self) -> None:
        self.assertRaises(ValueError, protect, StatusResource(WebSources(clock=Clock(), stats=None)))


class TokenOptionsTests(OptionsMixin, SynchronousTestCase):
    """C{--web-token-file}: a way off loopback, checked at start with one-line errors."""

    def test_token_file_opens_other_addresses(self) -> None:
        path = secret_file(self, f"{TOKEN}\n")
        settings = self.parse("--web", "tcp:8080", "--web-token-file", path).settings
        self.assertEqual((settings.web_token_file, settings.web_password_file), (path, None))
        self.assertUsage("--web 'tcp:8080': not a loopback address; give --web-password-file or --web-token-file "
                         "(or bind interface=127.0.0.1)", "--web", "tcp:8080")

    def test_bad_token_files(self) -> None:
        self.assertUsage("--web-token-file /nonexistent: cannot read it", "--web", "tcp:8080",
                         "--web-token-file", "/nonexistent")
        path = secret_file(self, f"{TOKEN}\n", 0o644)
        self.assertUsage(f"--web-token-file {path}: readable or writable by group or others (mode 0644)",
                         "--web", "tcp:8080", "--web-token-file", path)
        path = secret_file(self, "too-short\n")
        self.assertUsage(f"--web-token-file {path}: line 1: a token needs at least 16 characters",
                         "--web", "tcp:8080:interface=127.0.0.1", "--web-token-file", path)

    def test_config_file(self) -> None:
        """C{web-token-file} is a setting of the config file too."""
        tokens, config = secret_file(self, f"{TOKEN}\n"), self.mktemp()
        with open(config, "w") as f:
            f.write(f'web = "tcp:8080"\nweb-token-file = "{tokens}"\n')
        self.assertEqual(self.parse("--config", config).settings.web_token_file, tokens)


class TokenServiceTests(TestCase):
    """A service with C{--web-token-file} and C{--web-password-file}, asked over a real loopback socket."""

    timeout = 60

    async def test_bearer_and_basic(self) -> None:
        dns = DNSTestServer()
        dns.start(reactor)
        self.addCleanup(dns.stop)
        tokens = secret_file(self, f"# the dashboard's token\n{TOKEN}\n")
        passwords = secret_file(self, "admin:s3cret\n")
        options = service.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--nameserver", dns.nameserver, "--socketmap", "none",
                              "--smtp", "none", "--no-reports", "--web", "tcp:0:interface=127.0.0.1",
                              "--web-token-file", tokens, "--web-password-file", passwords])
        svc = service.makeService(options, reactor, fatal=lambda code: None)
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        self.assertTrue(await svc.ready)
        os.remove(tokens)  # read once at start, like the password file
        port = svc.listeners["web"].port.getHost().port

        async def get(authorization: str | None) -> tuple[int, bytes, bytes]:
            client = RawClient()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
            header = "" if authorization is None else f"Authorization: {authorization}\r\n"
            client.send(f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{header}\r\n".encode())
            await settle(lambda: client.closed.called)
            head, _, body = client.data.partition(b"\r\n\r\n")
            return int(head.split(b" ")[1]), head, body

        results: dict[Any, Any] = {}
        for authorization in (None, f"Bearer {TOKEN}", f"Bearer {OTHER}", basic("admin", "s3cret")):
            results[authorization] = await get(authorization)
        status, head, body = results[None]
        self.assertEqual(status, 401)
        self.assertIn(b'WWW-Authenticate: basic realm="mtasts status"', head)
        self.assertIn(b'WWW-Authenticate: bearer realm="mtasts status"', head)
        self.assertNotIn(b"<svg", body)
        self.assertEqual(results[f"Bearer {OTHER}"][0], 401)
        for good in (f"Bearer {TOKEN}", basic("admin", "s3cret")):
            status, _, body = results[good]
            self.assertEqual(status, 200, good)
            self.assertIn(b"<title>mtasts: Overview</title>", body)
