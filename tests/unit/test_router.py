"""Router: failover along a chain of providers, recipient by recipient."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailrelay.outbound.results import (
    FailureClass,
    IProvider,
    Kind,
    OutboundMessage,
    Progress,
    RecipientResult,
    all_results,
)
from mailrelay.outbound.router import RoutedResult, Router
from tests.unit.fakes import (
    FakeProvider,
    answer_all,
    answer_by_recipient,
    has_fired,
    message,
    result_of,
)

A, B, C = "a@example.test", "b@example.test", "c@example.test"


def summary(routed: list[RoutedResult]) -> list[tuple[str, Kind, str]]:
    return [(r.result.recipient, r.result.kind, r.provider) for r in routed]


def test_fake_provider_provides_iprovider() -> None:
    assert verifyObject(IProvider, FakeProvider("p"))


def test_empty_chain_is_refused() -> None:
    with pytest.raises(ValueError):
        Router([])


def test_first_provider_delivers_and_the_rest_are_not_asked() -> None:
    p1, p2 = FakeProvider("p1"), FakeProvider("p2")
    routed = result_of(Router([p1, p2]).deliver(message(A, B)))
    assert summary(routed) == [(A, Kind.DELIVERED, "p1"), (B, Kind.DELIVERED, "p1")]
    assert p2.delivered == []


def test_temporary_on_the_first_provider_moves_the_message_to_the_second() -> None:
    p1 = FakeProvider("p1", answer_all(Kind.TEMPORARY, "421 4.3.2 p1 down"))
    p2 = FakeProvider("p2", answer_all(Kind.DELIVERED, "250 2.0.0 queued at p2"))
    msg = message(A, B)
    routed = result_of(Router([p1, p2]).deliver(msg))
    assert [m.recipients for m in p2.delivered] == [(A, B)]
    assert p2.delivered[0].body == msg.body and p2.delivered[0].sender == msg.sender
    assert [(r.result.reply, r.provider) for r in routed] == [("250 2.0.0 queued at p2", "p2")] * 2


def test_permanent_failure_is_never_retried_on_the_next_provider() -> None:
    p1 = FakeProvider("p1", answer_all(Kind.PERMANENT, "550 5.1.1 unknown user"))
    p2 = FakeProvider("p2")
    routed = result_of(Router([p1, p2]).deliver(message(A)))
    assert summary(routed) == [(A, Kind.PERMANENT, "p1")]
    assert routed[0].result.reply == "550 5.1.1 unknown user"
    assert p2.delivered == []


def test_partial_result_sends_only_the_unsettled_recipients_on() -> None:
    p1 = FakeProvider("p1", answer_by_recipient({A: Kind.DELIVERED, B: Kind.TEMPORARY}))
    p2 = FakeProvider("p2")
    routed = result_of(Router([p1, p2]).deliver(message(A, B)))
    assert [m.recipients for m in p2.delivered] == [(B,)]
    assert summary(routed) == [(A, Kind.DELIVERED, "p1"), (B, Kind.DELIVERED, "p2")]


def test_mixed_outcomes_across_three_providers_keep_recipient_order() -> None:
    p1 = FakeProvider(
        "p1", answer_by_recipient({A: Kind.TEMPORARY, B: Kind.PERMANENT, C: Kind.TEMPORARY})
    )
    p2 = FakeProvider("p2", answer_by_recipient({A: Kind.TEMPORARY, C: Kind.TEMPORARY}))
    p3 = FakeProvider("p3", answer_by_recipient({C: Kind.PERMANENT}))
    routed = result_of(Router([p1, p2, p3]).deliver(message(A, B, C)))
    assert [m.recipients for m in p2.delivered] == [(A, C)]
    assert [m.recipients for m in p3.delivered] == [(A, C)]
    assert summary(routed) == [
        (A, Kind.DELIVERED, "p3"),
        (B, Kind.PERMANENT, "p1"),
        (C, Kind.PERMANENT, "p3"),
    ]


def test_chain_exhausted_returns_the_last_providers_temporary_results() -> None:
    p1 = FakeProvider("p1", answer_all(Kind.TEMPORARY, "451 p1 busy"))
    p2 = FakeProvider("p2", answer_all(Kind.TEMPORARY, "421 p2 unavailable"))
    routed = result_of(Router([p1, p2]).deliver(message(A, B)))
    assert [(r.result, r.provider) for r in routed] == [
        (RecipientResult(A, Kind.TEMPORARY, "421 p2 unavailable"), "p2"),
        (RecipientResult(B, Kind.TEMPORARY, "421 p2 unavailable"), "p2"),
    ]


def test_uncertain_flag_survives_routing() -> None:
    def lost_after_dot(m):  # type: ignore[no-untyped-def]
        return [RecipientResult(r, Kind.TEMPORARY, "lost", uncertain=True) for r in m.recipients]

    routed = result_of(Router([FakeProvider("p1", lost_after_dot)]).deliver(message(A)))
    assert routed[0].result.uncertain is True


def test_waits_for_a_slow_provider_before_trying_the_next() -> None:
    p1 = FakeProvider("p1", answer_all(Kind.TEMPORARY), hold=True)
    p2 = FakeProvider("p2")
    d = Router([p1, p2]).deliver(message(A))
    assert not has_fired(d)
    assert p2.delivered == []
    p1.release()
    assert summary(result_of(d)) == [(A, Kind.DELIVERED, "p2")]


def test_close_closes_every_provider() -> None:
    providers = [FakeProvider("p1"), FakeProvider("p2")]
    result_of(Router(providers).close())
    assert all(p.closed for p in providers)


# -- policy by failure class ------------------------------------------------------------------


def rcpt_4xx(m: OutboundMessage) -> list[RecipientResult]:
    return all_results(
        m, Kind.TEMPORARY, "451 4.3.0 try later", failure=FailureClass.RCPT, code=451
    )


@pytest.mark.parametrize("failure", [FailureClass.MAIL, FailureClass.RCPT, FailureClass.DATA])
def test_a_provider_set_to_defer_keeps_its_4xx_recipients(failure: FailureClass) -> None:
    def answer(m: OutboundMessage) -> list[RecipientResult]:
        return all_results(m, Kind.TEMPORARY, "421 4.4.2 bye", failure=failure, code=421)

    p1 = FakeProvider("p1", answer, on_temporary="defer")
    p2 = FakeProvider("p2")
    routed = result_of(Router([p1, p2]).deliver(message(A, B)))
    assert summary(routed) == [(A, Kind.TEMPORARY, "p1"), (B, Kind.TEMPORARY, "p1")]
    assert p2.delivered == []


@pytest.mark.parametrize(
    "failure", [f for f in FailureClass if f.is_session], ids=lambda f: str(f.value)
)
def test_session_failures_move_on_even_from_a_provider_set_to_defer(failure: FailureClass) -> None:
    def answer(m: OutboundMessage) -> list[RecipientResult]:
        return all_results(m, Kind.TEMPORARY, "provider unavailable", failure=failure)

    p1 = FakeProvider("p1", answer, on_temporary="defer")
    p2 = FakeProvider("p2")
    routed = result_of(Router([p1, p2]).deliver(message(A)))
    assert summary(routed) == [(A, Kind.DELIVERED, "p2")]


def test_4xx_moves_on_by_default() -> None:
    p1, p2 = FakeProvider("p1", rcpt_4xx), FakeProvider("p2")
    routed = result_of(Router([p1, p2]).deliver(message(A)))
    assert summary(routed) == [(A, Kind.DELIVERED, "p2")]


def test_on_permanent_next_tries_the_next_provider_and_the_last_5xx_is_final() -> None:
    p1 = FakeProvider("p1", answer_all(Kind.PERMANENT, "550 p1 says no"), on_permanent="next")
    p2 = FakeProvider("p2", answer_all(Kind.PERMANENT, "550 p2 says no"), on_permanent="next")
    routed = result_of(Router([p1, p2]).deliver(message(A)))
    assert [m.recipients for m in p2.delivered] == [(A,)]
    assert [(r.result.kind, r.result.reply, r.provider) for r in routed] == [
        (Kind.PERMANENT, "550 p2 says no", "p2")
    ]


def test_settled_recipients_are_recorded_before_the_rest_move_on() -> None:
    p1 = FakeProvider("p1", answer_by_recipient({A: Kind.DELIVERED, B: Kind.TEMPORARY}))
    p2 = FakeProvider("p2", hold=True)
    recorded: list[list[str]] = []

    async def record(settled: list[RoutedResult]) -> None:
        recorded.append([r.result.recipient for r in settled])

    d = Router([p1, p2]).deliver(message(A, B), record)
    assert recorded == [[A]] and not has_fired(d)
    p2.release()
    assert summary(result_of(d)) == [(A, Kind.DELIVERED, "p1"), (B, Kind.DELIVERED, "p2")]


# -- chains by sender domain --------------------------------------------------------------------


def test_sender_domain_picks_its_own_chain_case_insensitively() -> None:
    default, special = FakeProvider("default"), FakeProvider("special")
    router = Router([default], {"Brand.Example": [special]})
    routed = result_of(router.deliver(attrs.evolve(message(A), sender="news@BRAND.example")))
    assert summary(routed) == [(A, Kind.DELIVERED, "special")]
    assert default.delivered == []


@pytest.mark.parametrize("sender", ["", "someone@other.example", "someone@sub.brand.example"])
def test_other_senders_and_the_null_sender_use_the_default_chain(sender: str) -> None:
    default, special = FakeProvider("default"), FakeProvider("special")
    router = Router([default], {"brand.example": [special]})
    routed = result_of(router.deliver(attrs.evolve(message(A), sender=sender)))
    assert summary(routed) == [(A, Kind.DELIVERED, "default")]


def test_close_closes_a_provider_shared_by_chains_once() -> None:
    shared = FakeProvider("shared")
    closes = 0
    original = shared.close

    def counting_close() -> defer.Deferred[None]:
        nonlocal closes
        closes += 1
        return original()

    shared.close = counting_close  # type: ignore[method-assign]
    result_of(Router([shared], {"a.example": [shared], "b.example": [shared]}).close())
    assert closes == 1


def test_batch_progress_is_journalled_once_and_before_the_provider_finishes() -> None:
    """A provider sending in batches reports each finished batch: its settled recipients are
    recorded at once (a crash later must not resend them), and never recorded twice."""

    class Batching(FakeProvider):
        def deliver(
            self, message: OutboundMessage, progress: Progress | None = None
        ) -> defer.Deferred[list[RecipientResult]]:
            first = [
                RecipientResult(A, Kind.DELIVERED, "250 ok"),
                RecipientResult(B, Kind.PERMANENT, "550 no"),
            ]
            assert progress is not None
            d = defer.Deferred.fromCoroutine(progress(first))
            self.finish: defer.Deferred[list[RecipientResult]] = defer.Deferred()
            d.addCallback(lambda _: self.finish)
            rest = [RecipientResult(C, Kind.TEMPORARY, "451 later", failure=FailureClass.RCPT)]
            return d.addCallback(lambda _: first + rest)

    p1, p2 = Batching("p1"), FakeProvider("p2")
    recorded: list[list[str]] = []

    async def record(settled: list[RoutedResult]) -> None:
        recorded.append([r.result.recipient for r in settled])

    d = Router([p1, p2]).deliver(message(A, B, C), record)
    assert recorded == [[A, B]] and not has_fired(d)
    p1.finish.callback([])
    routed = result_of(d)
    assert recorded == [[A, B]]  # C moved on; A and B are not recorded a second time
    assert summary(routed) == [
        (A, Kind.DELIVERED, "p1"),
        (B, Kind.PERMANENT, "p1"),
        (C, Kind.DELIVERED, "p2"),
    ]
