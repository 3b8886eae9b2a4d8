"""Access control under an attacker's hand: sessions outlive nothing the owner revoked, wrong tries are
slowed without locking the owner out, secrets stay out of the run folders, and the token file cannot
be swapped under the server.

The rest of the access control is tested in test_auth.py (rules) and test_auth_e2e.py (a browser).
"""

from __future__ import annotations

import os

import pytest
from streamlit.testing.v1 import AppTest

from wsviz import auth
from wsviz.errors import WsvizError

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


# ------------------------------------------------------------------ finding 2: the total of wrong tries is a window
def _try(cfg, secret, client, throttle) -> str:
    try:
        return auth.attempt(cfg, secret, client, throttle=throttle).role
    except WsvizError as exc:
        return str(exc)


def test_a_trickle_of_wrong_tries_never_locks_the_owner_out_and_a_flood_only_while_it_lasts():
    cfg = auth.load_config({"WSVIZ_TOKEN": TRAINER})
    now = [0.0]
    throttle = auth.Throttle(clock=lambda: now[0])
    for i in range(21):  # 21 wrong tries from 21 addresses (each within its 3 free ones), at once: a flood
        _try(cfg, "x" * 20, f"10.0.0.{i}", throttle)
    assert _try(cfg, TRAINER, "unknown", throttle).startswith("Too many wrong tries")  # everyone waits...
    assert throttle.wait_left("unknown") <= throttle.window
    now[0] += throttle.window  # ...only until the flood has left the window
    assert _try(cfg, TRAINER, "unknown", throttle) == "trainer"
    for minute in range(10):  # then one wrong try every 30 s, from ever new addresses: never a lockout
        now[0] += 30
        _try(cfg, "x" * 20, f"10.0.1.{minute}", throttle)
        now[0] += 1
        assert _try(cfg, TRAINER, "unknown", throttle) == "trainer", now[0]
    for _ in range(6):  # one address is still slowed on its own, whatever the total
        _try(cfg, "x" * 20, "10.0.2.1", throttle)
    assert throttle.wait_left("10.0.2.1") > 0 and throttle.wait_left("10.0.2.2") == 0


# ------------------------------------------------------------------ finding 4: a try is counted before it is checked
def test_tries_at_the_same_time_from_one_address_get_no_more_checks_than_tries_one_by_one(monkeypatch):
    import threading
    import time

    cfg = auth.load_config({"WSVIZ_TOKEN": TRAINER})
    checked = []

    def slow_verify(cfg, secret, user=""):  # a password check takes ~0.3 s (PBKDF2): every try overlaps
        checked.append(secret)
        time.sleep(0.3)
        return auth.Actor("root", "trainer") if secret == TRAINER else None

    monkeypatch.setattr(auth, "verify", slow_verify)
    throttle = auth.Throttle()
    start = threading.Barrier(24)
    results = []

    def guess(i):
        start.wait()
        results.append(_try(cfg, f"guess-{i:02d}-0123456789", "10.1.2.3", throttle))

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(24)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(checked) == 4, len(checked)  # as one by one: 3 free tries and the one that starts the delay
    assert sum(r.startswith("Too many wrong tries") for r in results) == 20
    # a right try takes its reservation back: right sign-ins, however many, never slow anyone
    monkeypatch.setattr(auth, "verify", lambda cfg, secret, user="": auth.Actor("root", "trainer"))
    throttle = auth.Throttle()
    for i in range(50):
        assert _try(cfg, TRAINER, f"10.0.3.{i % 3}", throttle) == "trainer"
    assert throttle.wait_left("10.0.3.9") == 0


# ------------------------------------------------------------------ finding 3: no secret goes to a training
def test_a_training_job_gets_no_access_secret_in_its_environment(monkeypatch):
    """submitit pickles a job's environment into runs/<id>/submitit/ (readable by every account): the
    tokens must not be in it. The worker never signs anyone in."""
    from wsviz.training.jobs import child_environment

    monkeypatch.setenv("WSVIZ_TOKEN", TRAINER)
    monkeypatch.setenv("WSVIZ_VIEWER_TOKEN", VIEWER)
    monkeypatch.setenv("WSVIZ_QUOTA_RUNS", "2")  # anything else is kept
    env, _ = child_environment()
    assert {"WSVIZ_TOKEN", "WSVIZ_VIEWER_TOKEN"} <= set(auth.SECRET_ENV)
    assert not set(auth.SECRET_ENV) & set(env), sorted(set(auth.SECRET_ENV) & set(env))
    assert TRAINER not in repr(env) and VIEWER not in repr(env)
    assert env["WSVIZ_QUOTA_RUNS"] == "2" and env["PATH"] == os.environ["PATH"]


# ------------------------------------------------------------------ finding 5: no user name told by the time taken
def test_an_unknown_user_costs_the_same_password_hashing_as_a_known_one(monkeypatch):
    import hashlib

    cfg = auth.load_config({}, {"wsviz": {"users": {"alice": {"password_hash": auth.hash_password("s3cret-pw"),
                                                              "role": "trainer"}}}})
    rounds = []
    real = hashlib.pbkdf2_hmac
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", lambda *a: rounds.append(a[3]) or real(*a))
    assert auth.verify(cfg, "guess", "alice") is None
    known, rounds[:] = list(rounds), []
    assert auth.verify(cfg, "guess", "mallory") is None
    assert known == rounds == [auth.HASH_ITERATIONS], (known, rounds)


# ------------------------------------------------------------------ finding 6: the token file checked is the one read
def test_a_token_file_swapped_for_a_link_after_its_checks_is_never_read_through_the_link(tmp_path, monkeypatch):
    folder = tmp_path / "home"
    token = folder / "token"
    real = auth.generated_token(token)
    evil = tmp_path / "evil"
    evil.write_text("ATTACKER-CHOSEN-TOKEN-0123456789\n")
    evil.chmod(0o600)
    getuid = os.getuid

    def swap_then_getuid():  # the race, planted: the file is swapped for a link while its owner is checked
        if not token.is_symlink():
            token.rename(folder / "real")
            token.symlink_to(evil)
        return getuid()

    monkeypatch.setattr(os, "getuid", swap_then_getuid)
    assert auth.generated_token(token) == real  # what was checked is what is read
    monkeypatch.setattr(os, "getuid", getuid)
    with pytest.raises(WsvizError, match="is not a plain file: remove it"):  # a link already there: refused
        auth.generated_token(token)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_token_file_in_a_folder_others_can_write_is_refused(tmp_path, mode):
    folder = tmp_path / "shared"
    auth.generated_token(folder / "token")
    folder.chmod(mode)
    with pytest.raises(WsvizError) as info:
        auth.generated_token(folder / "token")
    msg = str(info.value)
    assert "\n" not in msg and f"chmod go-w {folder}" in msg and "WSVIZ_TOKEN_FILE" in msg, msg
    with pytest.raises(WsvizError, match="chmod go-w"):  # nor is a token made there
        auth.generated_token(folder / "other")
    assert not (folder / "other").exists()


# ------------------------------------------------------------------ finding 7: a refusal names no link's target
def test_a_refused_folder_does_not_tell_where_its_links_lead(tmp_path, monkeypatch):
    """Any signed-in user (a viewer too) can type a folder; the refusal must not map the server's files."""
    from PIL import Image

    from wsviz.data.datasets import check_in_roots, folder_path

    root, secret = tmp_path / "data", tmp_path / "private-lab-notes"
    (secret / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(secret / "a" / "0.png")
    (root / "set" / "a").mkdir(parents=True)
    monkeypatch.setenv("WSVIZ_DATA_ROOTS", str(root))
    (root / "sneaky").symlink_to(secret)
    (root / "set" / "a" / "1.png").symlink_to(secret / "a" / "0.png")
    with pytest.raises(WsvizError) as folder:
        folder_path(root / "sneaky")
    with pytest.raises(WsvizError) as image:
        check_in_roots(root / "set" / "a" / "1.png")
    for info in (folder, image):
        msg = str(info.value)
        assert "private-lab-notes" not in msg, msg
        assert f"(WSVIZ_DATA_ROOTS): {root}" in msg and ("remove that link" in msg or "Move the dataset" in msg), msg


# ------------------------------------------------------------------ finding 8: plain http off this machine is said
@pytest.mark.parametrize("address, ssl, warned", [("0.0.0.0", False, True), ("lab-server.example.org", False, True),
                                                  ("0.0.0.0", True, False), ("127.0.0.1", False, False)])
def test_serving_tokens_over_plain_http_off_loopback_warns_at_start(monkeypatch, capsys, tmp_path, address, ssl,
                                                                    warned):
    import threading

    from streamlit import config

    import pages._access as access

    monkeypatch.setenv("WSVIZ_AUTH", "on")
    monkeypatch.setenv("WSVIZ_TOKEN", TRAINER)
    monkeypatch.setattr(auth, "_ANNOUNCED", threading.Event())  # a fresh process: its first announcement
    options = {"server.address": address, "server.sslCertFile": str(tmp_path / "c.pem") if ssl else None,
               "server.sslKeyFile": str(tmp_path / "k.pem") if ssl else None}
    old = {k: config.get_option(k) for k in options}
    try:
        for k, v in options.items():
            config.set_option(k, v)
        access.check_server_start()  # the server starts anyway: a warning, not a refusal
    finally:
        for k, v in old.items():
            config.set_option(k, v)
    err = capsys.readouterr().err
    line = next((x for x in err.splitlines() if "unencrypted" in x), None)
    assert (line is not None) == warned, err
    if warned:
        assert line.startswith("WARNING:") and "TLS" in line and "reverse proxy" in line and "token" in line, line
