"""The dashboard's signed session cookie: it round-trips, refuses tampering, and stays small."""

from datetime import UTC, datetime, timedelta

from agent_gateway.dashboard.sessions import Session, SessionCodec

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=12)


def test_a_signed_session_round_trips_and_a_tampered_one_is_refused():
    codec = SessionCodec("s" * 32)
    session = Session.signed_in("dses_1", LATER)
    cookie = codec.encode(session)
    back = codec.decode(cookie, NOW)
    assert back is not None and back.session_id == "dses_1" and back.csrf == session.csrf
    assert codec.decode(cookie[:-2] + ("A" if cookie[-2] != "A" else "B") + cookie[-1], NOW) is None
    assert SessionCodec("t" * 32).decode(cookie, NOW) is None


def test_errors_echoing_huge_form_values_keep_the_cookie_under_the_browser_limit():
    # A browser drops a cookie over 4 KB, and the error message would vanish with it.
    codec = SessionCodec("s" * 32)
    session = Session.signed_in("dses_1", LATER)
    for _ in range(5):
        session.flash("error", "No subscription '" + "x" * 10_000 + "'.")
    assert len(codec.encode(session)) < 3500
    flashes = codec.decode(codec.encode(session), NOW).take_flashes()
    assert len(flashes) == 3 and all(text.startswith("No subscription 'xxx") for _, text in flashes)
