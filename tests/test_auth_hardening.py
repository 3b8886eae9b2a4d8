"""Access control under an attacker's hand: sessions outlive nothing the owner revoked, wrong tries are
slowed without locking the owner out, secrets stay out of the run folders, and the token file cannot
be swapped under the server.

The rest of the access control is tested in test_auth.py (rules) and test_auth_e2e.py (a browser).
"""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from wsviz import auth

TRAINER, VIEWER = "t" * 8 + "-trainer-token-0123", "v" * 8 + "-viewer-token-0123"


def _gate():
    """The app's gate and a line saying who is in: app.py without its pages."""
    import streamlit as st

    from pages._access import require_access

    actor = require_access()
    st.title(f"in as {actor.name} ({actor.role})")


def _who(at: AppTest) -> str:
    return " ".join(t.value for t in at.title)


# ------------------------------------------------------------------ finding 1: a session re-checked on every run
def test_a_signed_in_session_ends_when_its_token_changes_or_its_time_is_up(monkeypatch):
    monkeypatch.setenv("WSVIZ_AUTH", "on")
    monkeypatch.setenv("WSVIZ_TOKEN", TRAINER)
    monkeypatch.delenv("WSVIZ_VIEWER_TOKEN", raising=False)
    monkeypatch.delenv("WSVIZ_SESSION_HOURS", raising=False)
    at = AppTest.from_function(_gate, default_timeout=60)
    at.query_params["token"] = TRAINER
    at.run()
    assert "(trainer)" in _who(at)
    at.run()
    assert "(trainer)" in _who(at)  # the same token: still in
    monkeypatch.setenv("WSVIZ_TOKEN", "n" * 8 + "-new-token-0123456789")  # the owner rotates the token
    at.run()
    assert _who(at) == "wsviz: sign in", _who(at)
    assert any("no longer in force" in e.value for e in at.error), [e.value for e in at.error]

    monkeypatch.setenv("WSVIZ_TOKEN", TRAINER)  # a new session, then WSVIZ_SESSION_HOURS ends it
    at = AppTest.from_function(_gate, default_timeout=60)
    at.query_params["token"] = TRAINER
    at.run()
    assert "(trainer)" in _who(at)
    monkeypatch.setenv("WSVIZ_SESSION_HOURS", "0.0000001")
    at.run()
    assert _who(at) == "wsviz: sign in", _who(at)


def test_a_password_change_or_a_new_role_takes_effect_on_the_next_run(monkeypatch):
    monkeypatch.setenv("WSVIZ_AUTH", "on")
    for var in ("WSVIZ_TOKEN", "WSVIZ_VIEWER_TOKEN", "WSVIZ_SESSION_HOURS"):
        monkeypatch.delenv(var, raising=False)
    alice = {"password_hash": auth.hash_password("s3cret-pw", iterations=1000), "role": "trainer"}
    at = AppTest.from_function(_gate, default_timeout=60)
    at.secrets["wsviz"] = {"users": {"alice": alice}}
    at.run()
    at.text_input(key="_signin_user").set_value("alice")
    at.text_input(key="_signin_secret").set_value("s3cret-pw")
    at.button[0].click().run()
    assert _who(at) == "in as alice (trainer)", _who(at)
    at.secrets["wsviz"] = {"users": {"alice": {**alice, "role": "viewer"}}}  # demoted
    at.run()
    assert _who(at) == "wsviz: sign in", _who(at)
    at.text_input(key="_signin_user").set_value("alice")
    at.text_input(key="_signin_secret").set_value("s3cret-pw")
    at.button[0].click().run()
    assert _who(at) == "in as alice (viewer)", _who(at)
    at.secrets["wsviz"] = {"users": {"alice": {**alice, "role": "viewer",
                                               "password_hash": auth.hash_password("new-pw", iterations=1000)}}}
    at.run()
    assert _who(at) == "wsviz: sign in", _who(at)
    at.secrets["wsviz"] = {"users": {"bob": alice}}  # removed
    at.run()
    assert _who(at) == "wsviz: sign in", _who(at)
