"""
A real Postfix for end-to-end tests: a throwaway instance configured in a
directory of its own, listening on a loopback port, with STARTTLS from a
test certificate and virtual(8) delivery to Maildirs in that directory.

It needs the Debian C{postfix} package (or any Postfix 3.x with the same
layout) and root: Postfix's master runs as root and its daemons as the
C{postfix} user.  Installing the package must not start the system
instance (a C{/usr/sbin/policy-rc.d} that exits 101; see docs/design.rst); this
instance never touches C{/etc/postfix} beyond reading C{postfix-files}
(its C{meta_directory}) and runs with C{-c} on generated files.

Usage in a trial test::

    reason = PostfixServer.unavailable()
    if reason:
        raise SkipTest(reason)
    server = PostfixServer(self.mktemp(), domain="example.test",
                           hostname="mx.example.test",
                           certificate=pki.valid("mx.example.test"))
    server.start()                    # blocks until it accepts, bounded
    self.addCleanup(server.stop)
    ...  # deliver to 127.0.0.1:server.port
    data = await server.wait_for_message(reactor, "bob", timeout=30)

L{PostfixServer.start} and L{PostfixServer.stop} run the C{postfix}
command synchronously (each bounded by a timeout); the wait for delivered
mail polls through the reactor.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mtasts_twisted.testing.pki import IssuedCertificate

__all__ = ["PostfixError", "PostfixServer", "free_loopback_port"]

#: Where the Debian package puts the daemons and commands.
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"
COMMAND_DIRECTORY = "/usr/sbin"
META_DIRECTORY = "/etc/postfix"

# master.cf: no chroot (the instance has no chroot tree), one smtpd on the
# loopback port, and the services a local delivery needs.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_MAIN_CF = """\
compatibility_level = 3.6
config_directory = {conf}
queue_directory = {queue}
data_directory = {data}
daemon_directory = {daemon_directory}
command_directory = {command_directory}
meta_directory = {meta_directory}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {log}
maillog_file_prefixes = {base}
syslog_name = postfix-test
myhostname = {hostname}
mydomain = {domain}
myorigin = {hostname}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP test
biff = no
alias_maps =
alias_database =
local_recipient_maps =
relayhost =
smtp_dns_support_level = disabled
smtputf8_enable = yes
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = texthash:{vmailbox}
virtual_minimum_uid = 1
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
smtpd_tls_session_cache_database =
"""


class PostfixError(Exception):
    """Postfix could not be configured, started or stopped."""


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostfixServer:
    """
    One Postfix instance in C{directory}.

    @ivar port: the loopback SMTP port.
    @ivar directory: the instance's directory (config, queue, mail, log).
    """

    def __init__(
        self,
        directory: str,
        *,
        domain: str,
        hostname: str,
        certificate: IssuedCertificate,
        mailboxes: tuple[str, ...] = ("bob",),
        port: int | None = None,
        postfix: str | None = None,
    ) -> None:
        """
        @param directory: a path for the instance (made if missing).
        @param domain: the mail domain it accepts mail for.
        @param hostname: its name (greeting, C{Received:}); the
            certificate should be valid for it.
        @param certificate: the STARTTLS certificate chain and key.
        @param mailboxes: local parts with a Maildir each.
        @param port: the SMTP port; a free one by default.
        @param postfix: the C{postfix} command; found on C{PATH} or in
            C{/usr/sbin} by default.
        """
        self.directory = os.path.abspath(directory)
        self.domain = domain
        self.hostname = hostname
        self.certificate = certificate
        self.mailboxes = mailboxes
        self.port = port if port is not None else free_loopback_port()
        self._postfix = postfix or _find_postfix() or "postfix"
        self._conf = os.path.join(self.directory, "conf")
        self._mail = os.path.join(self.directory, "mail")
        self._queue = os.path.join(self.directory, "queue")
        self._log = os.path.join(self.directory, "maillog")
        self._started = False

    @staticmethod
    def unavailable() -> str | None:
        """
        Why a Postfix cannot be run here, or L{None} when it can.
        """
        if _find_postfix() is None:
            return "Postfix is not installed (apt-get install postfix)"
        if not os.path.isdir(DAEMON_DIRECTORY):
            return f"no Postfix daemon directory {DAEMON_DIRECTORY}"
        if os.geteuid() != 0:
            return "running a Postfix instance needs root"
        try:
            pwd.getpwnam("postfix")
            grp.getgrnam("postdrop")
        except KeyError:
            return "the postfix user or postdrop group is missing"
        return None

    def _write(self, path: str, text: str | bytes, mode: int = 0o644) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else text
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

    def configure(self) -> None:
        """
        Write main.cf, master.cf, the certificate and the mailbox map.

        @raise PostfixError: when a parent of C{directory} is not searchable
            by other users (e.g. a C{mkdtemp} directory: make it 0755).
        """
        for path in (self.directory, self._conf, self._mail, self._queue):
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o755)
        parent = os.path.dirname(self.directory)
        while True:
            # Postfix's daemons (user postfix) and virtual(8) (user nobody)
            # must reach the instance's directories.
            if not os.stat(parent).st_mode & 0o001:
                raise PostfixError(f"{parent} is not searchable by other users; Postfix cannot reach its files")
            if parent == os.path.dirname(parent):
                break
            parent = os.path.dirname(parent)
        nobody = pwd.getpwnam("nobody")
        os.chown(self._mail, nobody.pw_uid, nobody.pw_gid)
        cert = os.path.join(self._conf, "cert.pem")
        key = os.path.join(self._conf, "key.pem")
        self._write(cert, self.certificate.chain_pem)
        self._write(key, self.certificate.key_pem, 0o600)
        vmailbox = os.path.join(self._conf, "vmailbox")
        # A trailing slash: Maildir delivery (virtual(8)).
        self._write(vmailbox, "".join(f"{m}@{self.domain} {m}/\n" for m in self.mailboxes))
        self._write(
            os.path.join(self._conf, "main.cf"),
            _MAIN_CF.format(
                conf=self._conf,
                queue=self._queue,
                data=os.path.join(self.directory, "data"),
                daemon_directory=DAEMON_DIRECTORY,
                command_directory=COMMAND_DIRECTORY,
                meta_directory=META_DIRECTORY,
                log=self._log,
                base=self.directory,
                hostname=self.hostname,
                domain=self.domain,
                mail=self._mail,
                vmailbox=vmailbox,
                uid=nobody.pw_uid,
                gid=nobody.pw_gid,
                cert=cert,
                key=key,
            ),
        )
        self._write(os.path.join(self._conf, "master.cf"), MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self._postfix, "-c", self._conf, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": f"{COMMAND_DIRECTORY}:/usr/bin:/bin", "LANG": "C"},
        )

    def start(self, timeout: float = 30.0) -> None:
        """
        Configure and start the instance; return once it accepts
        connections on L{port}.

        @raise PostfixError: when it does not start within C{timeout} s.
        """
        self.configure()
        deadline = time.monotonic() + timeout
        try:
            done = self._run("start", timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PostfixError(f"postfix start did not finish within {timeout:g} s\n{self.log_text()}")
        if done.returncode != 0:
            raise PostfixError(f"postfix start failed ({done.returncode}): {done.stderr}{done.stdout}\n{self.log_text()}")
        self._started = True
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise PostfixError(f"Postfix does not accept on port {self.port}\n{self.log_text()}")
                time.sleep(0.1)

    def master_pid(self) -> int | None:
        """The master process id, while it runs."""
        try:
            with open(os.path.join(self._queue, "pid", "master.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return pid

    def stop(self, timeout: float = 30.0) -> None:
        """
        Stop the instance (C{postfix stop}, then C{abort}, then SIGKILL to
        its master process), each step bounded.
        """
        if not self._started:
            return
        self._started = False
        deadline = time.monotonic() + timeout
        for command in ("stop", "abort"):
            try:
                self._run(command, timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            while self.master_pid() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.master_pid() is None:
                return
        pid = self.master_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    def log_text(self) -> str:
        """The instance's mail log so far."""
        try:
            with open(self._log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def messages(self, mailbox: str) -> list[bytes]:
        """The messages delivered to C{mailbox}, oldest first."""
        new = os.path.join(self._mail, mailbox, "new")
        try:
            names = sorted(os.listdir(new), key=lambda n: os.stat(os.path.join(new, n)).st_mtime)
        except OSError:
            return []
        out = []
        for name in names:
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def wait_for_message(self, reactor: IReactorTime, mailbox: str, timeout: float = 30.0) -> Deferred[bytes]:
        """
        Poll (through C{reactor}) until C{mailbox} has a message; fire with
        the first one, or fail with L{PostfixError} after C{timeout} s.
        """

        async def poll() -> bytes:
            deadline = reactor.seconds() + timeout
            while True:
                found = self.messages(mailbox)
                if found:
                    return found[0]
                if reactor.seconds() > deadline:
                    raise PostfixError(f"no message for {mailbox} within {timeout:g} s\n{self.log_text()}")
                await task.deferLater(reactor, 0.1, lambda: None)

        return Deferred.fromCoroutine(poll())


def _find_postfix() -> str | None:
    found = shutil.which("postfix")
    if found:
        return found
    candidate = os.path.join(COMMAND_DIRECTORY, "postfix")
    return candidate if os.access(candidate, os.X_OK) else None
