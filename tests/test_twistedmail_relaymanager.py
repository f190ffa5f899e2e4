"""
C{twisted.mail.relaymanager} on Python 3 (Twisted 26.10): its smart host
managers cannot relay a message, so there is no hook for them; README.rst
("Adding MTA-STS to a twisted.mail relay") says how to move to
L{MTASTSSender<mtasts_twisted.twistedmail.MTASTSSender>}.

Each test shows one place where upstream code still speaks Python 2.  They
are canaries: when one starts failing, upstream has changed, and a hook
for C{SmartHostESMTPRelayingManager} may have become possible.
"""

from __future__ import annotations

import os
import pickle

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.mail import relay, relaymanager, smtp
from twisted.trial.unittest import SynchronousTestCase

CANARY = "twisted.mail.relaymanager changed upstream: revisit the relaymanager hook (issue 15, item 3)"


class _NoMX:
    """An MX calculator that must never be reached."""

    def getMX(self, domain: str) -> None:
        raise AssertionError("the manager got as far as the MX lookup")


class _Peer:
    """What DomainQueuer asks of the SMTP server protocol: a loopback peer."""

    class transport:
        @staticmethod
        def getPeer() -> IPv4Address:
            return IPv4Address("TCP", "127.0.0.1", 2525)


class RelayManagerTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.queue = relaymanager.Queue(directory)
        self.queue.noisy = False
        self.message = self.enqueue("alice@example.org", "bob@example.com")

    def enqueue(self, sender: str, recipient: str) -> str:
        """Queue a message the way twisted.mail's DomainQueuer.startMessage does."""
        envelope, message = self.queue.createNewMessage()
        with envelope:
            pickle.dump([sender, recipient], envelope)
        for line in (b"Subject: hi", b"", b"body"):
            message.lineReceived(line)
        message.eomReceived()
        self.queue.readDirectory()
        [name] = self.queue.getWaiting()
        return str(name)

    def manager(self) -> relaymanager.SmartHostESMTPRelayingManager:
        manager = relaymanager.SmartHostESMTPRelayingManager(self.queue)
        manager.mxcalc = _NoMX()
        return manager

    def test_check_state_crashes(self) -> None:
        """checkState, the manager's only entry point, fails on a waiting message: dict_keys has no reverse()."""
        manager = self.manager()
        for _ in range(2):
            # Every periodic call (RelayStateHelper) fails the same way.
            with self.assertRaises(AttributeError, msg=CANARY) as caught:
                manager.checkState()
            self.assertIn("'dict_keys' object has no attribute 'reverse'", str(caught.exception))
        self.assertEqual((list(self.queue.waiting), list(self.queue.relayed)), ([self.message], []))

    def test_check_state_crashes_later_too(self) -> None:
        """With getWaiting giving a list, it fails at the next line that needs Python 2: dict.iteritems()."""
        self.queue.getWaiting = lambda: list(self.queue.waiting)  # type: ignore[method-assign]
        with self.assertRaises(AttributeError, msg=CANARY) as caught:
            self.manager().checkState()
        self.assertIn("'dict' object has no attribute 'iteritems'", str(caught.exception))
        # The message was marked as being relayed first: it is stuck there.
        self.assertEqual((list(self.queue.waiting), list(self.queue.relayed)), ([], [self.message]))

    def test_back_off_never_requeues(self) -> None:
        """After a failed connection, map() is lazy on Python 3: the messages never become waiting again."""
        clock = Clock()
        manager = self.manager()
        attempt = relaymanager._AttemptManager(manager, noisy=False, reactor=clock)
        relayer = object()
        self.queue.setRelaying(self.message)
        manager.managed[relayer] = [self.message]
        attempt.notifyNoConnection(relayer)
        clock.advance(31)
        self.assertEqual(list(self.queue.waiting), [], CANARY)
        self.assertEqual(list(self.queue.relayed), [self.message])

    def test_domain_queuer_refuses_everything(self) -> None:
        """twisted.mail's relay domain cannot even accept a message: filter() has no len()."""
        class Service:
            queue = self.queue

        user = smtp.User(b"bob@example.com", None, _Peer(), b"alice@example.org")
        with self.assertRaises(TypeError, msg=CANARY) as caught:
            relay.DomainQueuer(Service()).exists(user)
        self.assertIn("object of type 'filter' has no len()", str(caught.exception))

    def test_relayer_sends_text(self) -> None:
        """The managed relayer opens the message in text mode; its DATA encoding needs bytes."""
        path = self.queue.getPath(self.message)
        relayer = relaymanager.ESMTPManagedRelayer([path], None, None, None, b"relay.test")
        data = relayer.getMailData()
        try:
            chunk = data.read()
            self.assertIsInstance(chunk, str, CANARY)
            self.assertRaises(TypeError, relayer.transformChunk, chunk)
        finally:
            data.close()
