"""
Tests for SMTP session reuse (connection caching) in
L{mtasts_twisted.delivery.Deliverer} and for L{mtasts_twisted.delivery.sessions}.

The delivery tests run against real loopback SMTP servers (the world of
L{tests.test_delivery}); the idle timers run on a L{Clock} where the test
is about them (L{_ClockedReactor}: the real reactor for I/O, a fake clock
for time).
"""

from __future__ import annotations

import io
import random
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from mtasts_twisted.delivery import (
    Deliverer,
    DeliveryResult,
    DeliverySettings,
    Status,
    deliver,
)
from mtasts_twisted.results import ResultType
from mtasts_twisted.delivery.sessions import SessionPool
from mtasts_twisted.testing.smtp import Behaviour, Reply, SMTPTestServer, Stage
from mtasts_twisted.tlsrpt.aggregate import merge_results
from tests.test_delivery import (
    _CERTS,
    _PKI,
    _VALID2,
    BOB,
    DOMAIN,
    MESSAGE,
    MX1,
    MX2,
    SENDER,
    DeliveryWorld,
    policy_text,
)

OTHER = "example.net"


class _ClockedReactor:
    """The real reactor for I/O, a L{Clock} for every timer and C{seconds}."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(*args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


def live(server: SMTPTestServer) -> Any:
    """The server side of the one open connection of C{server}."""
    [proto] = list(server._live)
    return proto


async def until(predicate: Any, what: str, timeout: float = 5.0) -> None:
    """Wait (real time, bounded) until C{predicate()} is true."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


def verbs(server: SMTPTestServer, index: int = 0) -> list[str]:
    return [c.verb for c in server.sessions[index].commands]


class ReuseWorld(DeliveryWorld):
    """The loopback world with a reusing deliverer, closed at cleanup."""

    def reusing(self, clock: Clock | None = None, **settings: Any) -> Deliverer:
        values: dict[str, Any] = dict(
            port=1, port_for=self.ports, connect_timeout=3, reply_timeout=3, session_timeout=30,
            reuse_idle_time=5.0,
        )
        values.update(settings)
        deliverer = Deliverer(
            _ClockedReactor(clock) if clock is not None else reactor,
            self.resolver,
            self.cache,
            trust_root=_PKI.ca_pem,
            sink=self.sink,
            settings=DeliverySettings(**values),
            rng=random.Random(1),
        )
        self.addCleanup(deliverer.close)
        return deliverer

    async def send(self, deliverer: Deliverer, recipient: str = BOB) -> DeliveryResult:
        return await deliverer.deliver(SENDER, [recipient], io.BytesIO(MESSAGE))

    def policy(self, mode: str | None, *mx: str) -> None:
        """As in L{DeliveryWorld}, with a TXT TTL of 0: every lookup asks DNS."""
        if mode is not None:
            self.set_policy(mode, "1", *mx)

    def set_policy(self, mode: str, record_id: str, *mx: str) -> None:
        """Publish a new policy (new TXT id) and make the next lookup see it."""
        self.dns.remove("_mta-sts." + DOMAIN, "TXT")
        self.dns.add_txt("_mta-sts." + DOMAIN, f"v=STSv1; id={record_id}", ttl=0)
        self.fetcher.policies[DOMAIN] = policy_text(mode, *(mx or (MX1, MX2)))
        self.resolver.clear_cache()

    def assertDelivered(self, result: DeliveryResult, verified: bool = True) -> None:
        [outcome] = result.outcomes
        self.assertEqual((outcome.status, outcome.code, outcome.verified), (Status.DELIVERED, 250, verified), outcome)


class ReuseTests(ReuseWorld):
    """When a parked session is reused, and when it is not."""

    async def test_back_to_back_one_session(self) -> None:
        """
        Enforce: N messages to one domain, back to back: one connection, one
        TLS handshake, N transactions, each after an RSET; all over TLS.
        """
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        deliverer = self.reusing()
        for _ in range(4):
            self.assertDelivered(await self.send(deliverer))
        self.assertEqual(len(server.sessions), 1)
        self.assertEqual(len(server.messages), 4)
        self.assertTrue(all(m.tls and m.tls_at_mail and m.accepted for m in server.messages))
        self.assertEqual(server.plaintext_transactions(), [])
        commands = verbs(server)
        self.assertEqual(commands.count("STARTTLS"), 1)
        self.assertEqual(commands.count("MAIL"), 4)
        self.assertEqual(commands.count("RSET"), 3)
        # RFC 5321 §4.1.1.5: the probe comes right before each reused MAIL.
        for i, verb in enumerate(commands):
            if verb == "RSET":
                self.assertEqual(commands[i + 1], "MAIL")
        self.assertFalse(server.sessions[0].closed)
        await deliverer.close()
        await until(lambda: server.sessions[0].closed, "the session to close")
        self.assertEqual(verbs(server)[-1], "QUIT")

    async def test_tlsrpt_counts_one_session(self) -> None:
        """
        RFC 8460 §4: one successful-session count per TLS negotiation, not
        per message: the reused session adds no result.
        """
        self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        deliverer = self.reusing()
        results = [await self.send(deliverer) for _ in range(3)]
        self.assertEqual([len(r.results) for r in results], [2, 1, 1])
        [merged] = merge_results(self.sink.results)
        self.assertEqual((merged.success_count, merged.failure_count), (1, 0))

    async def test_tlsrpt_testing_failure_counted_once(self) -> None:
        """Testing and an untrusted certificate: delivered N times, one failed session reported."""
        server = self.server(Behaviour(certificate=_CERTS["untrusted"]))
        self.policy("testing")
        deliverer = self.reusing()
        for _ in range(3):
            self.assertDelivered(await self.send(deliverer), verified=False)
        self.assertEqual(len(server.sessions), 1)
        [merged] = merge_results(self.sink.results)
        self.assertEqual((merged.success_count, merged.failure_count), (0, 1))
        [detail] = merged.failures
        self.assertEqual(detail.result_type, ResultType.CERTIFICATE_NOT_TRUSTED)

    async def test_no_policy_reused(self) -> None:
        """No policy: a TLS session is reused too, and counted once."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        deliverer = self.reusing()
        for _ in range(3):
            await self.send(deliverer)
        self.assertEqual((len(server.sessions), len(server.messages)), (1, 3))
        [merged] = merge_results(self.sink.results)
        self.assertEqual(merged.success_count, 1)

    async def test_plaintext_never_kept(self) -> None:
        """A session without TLS is closed with QUIT, never parked."""
        server = self.server(Behaviour())  # STARTTLS not offered
        deliverer = self.reusing()
        for _ in range(2):
            await self.send(deliverer)
        self.assertEqual(len(server.sessions), 2)
        self.assertEqual(len(deliverer._pool), 0)  # type: ignore[arg-type]

    async def test_not_across_domains(self) -> None:
        """Two domains on the same MX host and port: a session each."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.dns.add_mx(OTHER, 10, MX1 + ".")
        deliverer = self.reusing()
        await self.send(deliverer, BOB)
        await self.send(deliverer, "carol@" + OTHER)
        self.assertEqual(len(server.sessions), 2)
        await self.send(deliverer, "dave@" + OTHER)
        self.assertEqual(len(server.sessions), 2)

    async def test_not_after_policy_change(self) -> None:
        """A new policy (id and text) never inherits a session made under the old one."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        deliverer = self.reusing()
        self.assertDelivered(await self.send(deliverer))
        self.set_policy("enforce", "2", MX1)
        result = await self.send(deliverer)
        self.assertDelivered(result)
        self.assertEqual(len(server.sessions), 2)
        # The new session is reported (a new negotiation under the new policy).
        self.assertEqual([r.success_count for r in result.results], [0, 1])
        self.assertIn("mx: " + MX1, "\n".join(result.results[1].policy.policy_strings))

    async def test_same_text_new_id_not_reused(self) -> None:
        """Only the record id changes: still a new session (the key has the id)."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        deliverer = self.reusing()
        await self.send(deliverer)
        self.set_policy("enforce", "2")
        await self.send(deliverer)
        self.assertEqual(len(server.sessions), 2)

    async def test_testing_session_never_carries_enforce_mail(self) -> None:
        """
        A session made (and verified) under testing is not reused once the
        domain enforces: enforce gets a session of its own.
        """
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("testing")
        deliverer = self.reusing()
        await self.send(deliverer)
        self.set_policy("enforce", "2")
        self.assertDelivered(await self.send(deliverer))
        self.assertEqual(len(server.sessions), 2)

    async def test_unverified_testing_session_not_reused_for_enforce(self) -> None:
        """
        Testing over an untrusted certificate parks an unverified session;
        when the policy turns to enforce, nothing is sent over it (and the
        new session's handshake is refused).
        """
        server = self.server(Behaviour(certificate=_CERTS["untrusted"]))
        self.policy("testing")
        deliverer = self.reusing()
        self.assertDelivered(await self.send(deliverer), verified=False)
        self.set_policy("enforce", "2")
        result = await self.send(deliverer)
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertEqual(len(server.messages), 1)
        self.assertEqual(verbs(server, 0).count("MAIL"), 1)
        self.assertEqual(len(server.sessions), 2)
        self.assertNotIn("MAIL", verbs(server, 1))

    async def test_host_must_still_be_an_mx(self) -> None:
        """A parked session to a host no longer in the MX list is not used."""
        first = self.server(Behaviour(certificate=_CERTS["valid"]))
        second = self.server(Behaviour(certificate=_VALID2), host=MX2, preference=20)
        self.policy("enforce")
        deliverer = self.reusing()
        await self.send(deliverer)
        self.assertEqual((len(first.messages), len(second.messages)), (1, 0))
        self.dns.remove(DOMAIN, "MX")
        self.dns.add_mx(DOMAIN, 20, MX2 + ".")
        self.resolver.clear_cache()
        self.assertDelivered(await self.send(deliverer))
        self.assertEqual((len(first.messages), len(second.messages)), (1, 1))
        self.assertEqual(verbs(first).count("RSET"), 0)

    async def test_preference_order_kept(self) -> None:
        """
        A parked session to a less preferred host does not win over a more
        preferred host that is back (RFC 5321 §5.1).
        """
        first = self.server(Behaviour(certificate=_CERTS["valid"], replies={Stage.GREETING: Reply(421)}))
        second = self.server(Behaviour(certificate=_VALID2), host=MX2, preference=20)
        self.policy("enforce")
        deliverer = self.reusing()
        self.assertEqual((await self.send(deliverer)).outcomes[0].mx_host, MX2)
        first.behaviour = Behaviour(certificate=_CERTS["valid"])
        self.assertEqual((await self.send(deliverer)).outcomes[0].mx_host, MX1)
        self.assertEqual((len(second.sessions), len(second.messages)), (1, 1))

    async def test_equal_preference_prefers_parked(self) -> None:
        """Among hosts of equal preference, the one with a parked session is used."""
        first = self.server(Behaviour(certificate=_CERTS["valid"]))
        second = self.server(Behaviour(certificate=_VALID2), host=MX2, preference=10)
        self.policy("enforce")
        deliverer = self.reusing()
        for _ in range(6):
            self.assertDelivered(await self.send(deliverer))
        self.assertEqual(len(first.sessions) + len(second.sessions), 1)

    async def test_max_transactions(self) -> None:
        """After C{reuse_max_transactions} the session is closed with QUIT."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        deliverer = self.reusing(reuse_max_transactions=2)
        for _ in range(3):
            self.assertDelivered(await self.send(deliverer))
        self.assertEqual(len(server.sessions), 2)
        await until(lambda: server.sessions[0].closed, "the first session to close")
        self.assertEqual(verbs(server, 0).count("MAIL"), 2)
        self.assertEqual(verbs(server, 0)[-1], "QUIT")
        self.assertEqual(len(server.sessions[1].messages), 1)

    async def test_max_idle_sessions(self) -> None:
        """Beyond C{reuse_max_idle_sessions} parked sessions, the oldest is closed."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.dns.add_mx(OTHER, 10, MX1 + ".")
        deliverer = self.reusing(reuse_max_idle_sessions=1)
        await self.send(deliverer, BOB)
        await self.send(deliverer, "carol@" + OTHER)
        await until(lambda: server.sessions[0].closed, "the oldest session to close")
        self.assertEqual(verbs(server, 0)[-1], "QUIT")
        self.assertFalse(server.sessions[1].closed)
        self.assertEqual(len(deliverer._pool), 1)  # type: ignore[arg-type]

    async def test_off_by_default(self) -> None:
        """Without C{reuse_idle_time} (and with the one-off deliver()), every session ends with QUIT."""
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        await self.deliver()
        await deliver(
            reactor, self.resolver, self.cache, SENDER, [BOB], io.BytesIO(MESSAGE), trust_root=_PKI.ca_pem,
            settings=DeliverySettings(port=1, port_for=self.ports, reuse_idle_time=10.0),
        )
        self.assertEqual(len(server.sessions), 2)
        await until(lambda: all(s.closed for s in server.sessions), "both sessions to close")
        self.assertEqual([verbs(server, i)[-1] for i in (0, 1)], ["QUIT", "QUIT"])


class IdleTests(ReuseWorld):
    """Idle expiry and shutdown, on a fake clock."""

    async def test_idle_expiry_quits(self) -> None:
        """A parked session is closed with QUIT after C{reuse_idle_time}, and no timer is left."""
        clock = Clock()
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        deliverer = self.reusing(clock, reuse_idle_time=2.0)
        self.assertDelivered(await self.send(deliverer))
        clock.advance(1.9)
        self.assertEqual(len(deliverer._pool), 1)  # type: ignore[arg-type]
        self.assertFalse(server.sessions[0].closed)
        clock.advance(0.1)
        self.assertEqual(len(deliverer._pool), 0)  # type: ignore[arg-type]
        await deliverer.wait_closed()
        await until(lambda: server.sessions[0].closed, "the session to close")
        self.assertEqual(verbs(server)[-1], "QUIT")
        self.assertEqual(clock.getDelayedCalls(), [])
        # The next message gets a new session.
        self.assertDelivered(await self.send(deliverer))
        self.assertEqual(len(server.sessions), 2)

    async def test_max_age(self) -> None:
        """A session older than C{reuse_max_age} is not reused."""
        clock = Clock()
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        deliverer = self.reusing(clock, reuse_idle_time=100.0, reuse_max_age=50.0, session_timeout=1000)
        await self.send(deliverer)
        clock.advance(30)
        await self.send(deliverer)
        self.assertEqual(len(server.sessions), 1)
        clock.advance(30)
        await self.send(deliverer)
        self.assertEqual(len(server.sessions), 2)
        await until(lambda: server.sessions[0].closed, "the old session to close")
        self.assertEqual(verbs(server, 0)[-1], "QUIT")

    async def test_close_quits_parked_and_stops_parking(self) -> None:
        """L{Deliverer.close}: QUIT to parked sessions now; later sessions are not parked."""
        clock = Clock()
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        deliverer = self.reusing(clock)
        await self.send(deliverer)
        await deliverer.close()
        await until(lambda: server.sessions[0].closed, "the session to close")
        self.assertEqual(verbs(server)[-1], "QUIT")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertDelivered(await self.send(deliverer))
        await deliverer.wait_closed()
        self.assertEqual(len(server.sessions), 2)
        self.assertEqual(len(deliverer._pool), 0)  # type: ignore[arg-type]
        await until(lambda: server.sessions[1].closed, "the second session to close")
        self.assertEqual(clock.getDelayedCalls(), [])


class DeadSessionTests(ReuseWorld):
    """A parked session that died: a new connection, transparently; nothing lost or doubled."""

    async def parked(self, **settings: Any) -> tuple[SMTPTestServer, Deliverer]:
        server = self.server(Behaviour(certificate=_CERTS["valid"]))
        self.policy("enforce")
        deliverer = self.reusing(**settings)
        self.assertDelivered(await self.send(deliverer))
        self.assertEqual(len(deliverer._pool), 1)  # type: ignore[arg-type]
        return server, deliverer

    async def fresh(self, server: SMTPTestServer, deliverer: Deliverer, messages: int = 2) -> DeliveryResult:
        """The next delivery goes over a new session, reported like any new one."""
        result = await self.send(deliverer)
        self.assertDelivered(result)
        self.assertEqual(len(server.sessions), 2)
        self.assertEqual(len([m for m in server.messages if m.accepted]), messages)
        self.assertEqual(len(server.sessions[1].messages), 1)
        self.assertEqual([(r.success_count, r.failures) for r in result.results], [(0, ()), (1, ())])
        return result

    async def test_closed_by_server_while_parked(self) -> None:
        server, deliverer = await self.parked()
        live(server).transport.loseConnection()
        await until(lambda: len(deliverer._pool) == 0, "the client to notice")  # type: ignore[arg-type]
        await self.fresh(server, deliverer)

    async def test_421_while_parked(self) -> None:
        """RFC 5321 §3.8: a 421 while idle; the session is dropped at once."""
        server, deliverer = await self.parked()
        live(server).sendCode(421, b"4.4.2 idle too long")
        await until(lambda: len(deliverer._pool) == 0, "the client to notice")  # type: ignore[arg-type]
        await until(lambda: server.sessions[0].closed, "the connection to close")
        self.assertNotIn("RSET", verbs(server))
        await self.fresh(server, deliverer)

    async def test_garbage_while_parked(self) -> None:
        server, deliverer = await self.parked()
        live(server).transport.write(b"25")  # not even a whole line
        await until(lambda: len(deliverer._pool) == 0, "the client to notice")  # type: ignore[arg-type]
        await self.fresh(server, deliverer)

    async def test_rset_421(self) -> None:
        """The RSET probe gets 421 (the server is closing): a new connection."""
        server, deliverer = await self.parked()
        proto = live(server)

        def do_RSET(rest: bytes) -> None:
            proto.sendCode(421, b"4.3.2 shutting down")
            proto.transport.loseConnection()

        proto.do_RSET = do_RSET
        await self.fresh(server, deliverer)
        self.assertEqual(verbs(server, 0)[-1], "RSET")

    async def test_rset_unanswered(self) -> None:
        """A silently dead peer: the RSET times out, then a new connection."""
        server, deliverer = await self.parked(reply_timeout=0.5)
        proto = live(server)
        proto.do_RSET = lambda rest: None
        await self.fresh(server, deliverer)

    async def test_mail_421_after_rset(self) -> None:
        """421 to MAIL on the reused session, before any recipient: a new connection."""
        server, deliverer = await self.parked()
        proto = live(server)
        proto.behaviour = attrs.evolve(proto.behaviour, replies={Stage.MAIL: Reply(421, "4.3.2 closing")})
        await self.fresh(server, deliverer)

    async def test_lost_at_rcpt(self) -> None:
        """Lost before any recipient was accepted: a new connection delivers the message once."""
        server, deliverer = await self.parked()
        proto = live(server)
        proto.do_RCPT = lambda rest: proto.transport.abortConnection()
        await self.fresh(server, deliverer)
        self.assertEqual(verbs(server, 0)[-2:], ["MAIL", "RCPT"])

    async def test_lost_during_data(self) -> None:
        """
        Lost once the (small) message and its final dot are out: as on a new
        session, transient and not sent again in this call (RFC 1047).
        """
        server, deliverer = await self.parked()
        proto = live(server)
        proto.behaviour = attrs.evolve(proto.behaviour, drop_during_data=True)
        result = await self.send(deliverer)
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertEqual(len(server.sessions), 1)
        self.assertEqual([m.accepted for m in server.messages], [True, False])

    async def test_no_reply_after_end_of_data(self) -> None:
        """
        The final dot was sent on the reused session and no reply came: the
        message may have been delivered (RFC 1047), so it is not sent again
        in this call, and the session is not parked again.
        """
        server, deliverer = await self.parked(reply_timeout=0.5)
        proto = live(server)
        proto.behaviour = attrs.evolve(proto.behaviour, stall_at=Stage.END_OF_DATA)
        result = await self.send(deliverer)
        [outcome] = result.outcomes
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertIn("4.4.2", outcome.message)
        self.assertEqual(len(server.sessions), 1)
        self.assertEqual(len(deliverer._pool), 0)  # type: ignore[arg-type]


class SessionPoolTests(unittest.SynchronousTestCase):
    """L{SessionPool} on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.closed: list[str] = []
        self.pool: SessionPool[str] = SessionPool(self.clock, 2.0, 3, self.closed.append)

    def test_take_newest_first(self) -> None:
        self.pool.park("k", "a")
        self.pool.park("k", "b")
        self.pool.park("j", "c")
        self.assertIn("k", self.pool)
        self.assertEqual(self.pool.take("k"), "b")
        self.assertEqual(self.pool.take("k"), "a")
        self.assertIsNone(self.pool.take("k"))
        self.assertNotIn("k", self.pool)
        self.assertEqual(len(self.pool), 1)
        self.assertEqual(self.closed, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_idle_expiry(self) -> None:
        self.pool.park("k", "a")
        self.clock.advance(1)
        self.pool.park("k", "b")
        self.clock.advance(1)
        self.assertEqual(self.closed, ["a"])
        self.assertEqual(self.pool.take("k"), "b")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_full_closes_oldest(self) -> None:
        for name in "abcd":
            self.pool.park(name, name)
        self.assertEqual(self.closed, ["a"])
        self.assertEqual(len(self.pool), 3)
        self.assertEqual(len(self.clock.getDelayedCalls()), 3)

    def test_discard_and_clear(self) -> None:
        self.pool.park("k", "a")
        self.pool.park("k", "b")
        self.assertTrue(self.pool.discard("a"))
        self.assertFalse(self.pool.discard("a"))
        self.assertEqual(self.pool.clear(), ["b"])
        self.assertEqual((len(self.pool), self.closed, self.clock.getDelayedCalls()), (0, [], []))
