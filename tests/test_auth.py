"""Access control: tokens and users, roles enforced where runs start, slowed wrong tries, where it may listen.

The browser side (a server on 127.0.0.2) is in test_auth_e2e.py.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import kill_active_runs
from streamlit.testing.v1 import AppTest

from wsviz import auth
from wsviz.errors import WsvizError
from wsviz.training.jobs import cancel, launch, resume
from wsviz.training.loop import TrainConfig
from wsviz.training.quotas import Quotas
from wsviz.training.runstore import RunStore

ROOT = Path(__file__).resolve().parents[1]
TRAINER, VIEWER = "t" * 8 + "-trainer-token-0123", "v" * 8 + "-viewer-token-0123"
ENV = {"WSVIZ_TOKEN": TRAINER, "WSVIZ_VIEWER_TOKEN": VIEWER}
CFG = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_batches=2)
SMALL = {"base_width": 4, "depth": 8}


def test_tokens_and_users_sign_in_with_their_role():
    secrets = {"wsviz": {"users": {"alice": {"password_hash": auth.hash_password("s3cret", iterations=1000),
                                             "role": "trainer"},
                                   "bob": {"password_hash": auth.hash_password("hunter2", iterations=1000)}}}}
    cfg = auth.load_config(ENV, secrets)
    assert cfg.mode == "configured"
    assert auth.verify(cfg, TRAINER).role == "trainer"
    assert auth.verify(cfg, VIEWER) == auth.Actor("viewer", "viewer")
    assert auth.verify(cfg, TRAINER[:-1]) is None and auth.verify(cfg, "") is None
    assert auth.verify(cfg, "s3cret", "alice") == auth.Actor("alice", "trainer")
    assert auth.verify(cfg, "hunter2", "bob") == auth.Actor("bob", "viewer")  # role defaults to viewer
    assert auth.verify(cfg, "s3cret", "bob") is None and auth.verify(cfg, "s3cret", "mallory") is None
    assert auth.verify(cfg, "s3cret") is None  # a password is not a token
    with pytest.raises(WsvizError, match="shorter than 16"):
        auth.load_config({"WSVIZ_TOKEN": "short"})


def test_generated_token_is_private_and_kept(tmp_path):
    env = {"WSVIZ_TOKEN_FILE": str(tmp_path / "home" / "token")}
    cfg = auth.load_config(env)
    assert cfg.mode == "generated"
    path = Path(env["WSVIZ_TOKEN_FILE"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (token,) = cfg.tokens
    assert len(token) >= 32 and auth.load_config(env).tokens.keys() == {token}  # the same on the next start
    assert auth.sign_in_url(cfg) == f"http://localhost:8501/?token={token}"
    os.chmod(path, 0o644)  # readable by other users: refused, not used
    with pytest.raises(WsvizError, match="chmod 600"):
        auth.load_config(env)


def test_wrong_tries_are_slowed_and_a_lockout_refuses_even_the_right_token():
    now = [0.0]
    throttle = auth.Throttle(free=3, base=1.0, cap=30.0, clock=lambda: now[0])
    cfg = auth.load_config(ENV)
    waits = []
    for _ in range(6):
        try:
            auth.attempt(cfg, "wrong-token-0123456789", "10.0.0.9", throttle=throttle)
        except WsvizError:
            waits.append(throttle.wait_left("10.0.0.9"))
            now[0] += throttle.wait_left("10.0.0.9")  # the attacker waits exactly as long as told
    assert waits == [0, 0, 0, 1, 2, 4]  # three free tries, then a delay that doubles
    for _ in range(10):
        throttle.failed("10.0.0.9")
    assert throttle.wait_left("10.0.0.9") == 30  # capped
    with pytest.raises(WsvizError, match="wait 30 s"):
        auth.attempt(cfg, TRAINER, "10.0.0.9", throttle=throttle)  # refused without being checked
    assert throttle.wait_left("10.0.0.8") == 0  # another client is not slowed by it (below the total's limit)
    assert auth.attempt(cfg, TRAINER, "10.0.0.8", throttle=throttle).role == "trainer"
    now[0] += 30
    assert auth.attempt(cfg, TRAINER, "10.0.0.9", throttle=throttle).role == "trainer"


@pytest.mark.parametrize("address", ["0.0.0.0", "192.168.1.20", "::", "lab-server.example.org", ""])
def test_non_loopback_bind_without_configured_access_control_refuses(address, tmp_path):
    for cfg in (auth.AuthConfig("off"), auth.load_config({"WSVIZ_TOKEN_FILE": str(tmp_path / "t")})):
        with pytest.raises(WsvizError, match="WSVIZ_TOKEN.*secrets.toml.*SSH tunnel"):
            auth.check_bind(address, cfg)
    auth.check_bind(address, auth.load_config(ENV))  # tokens the owner set: allowed
    for loopback in ("localhost", "127.0.0.1", "127.0.0.2", "::1"):
        auth.check_bind(loopback, auth.AuthConfig("off"))


def test_app_bound_off_loopback_without_access_control_stops_the_server(monkeypatch):
    """app.py on 0.0.0.0 with WSVIZ_AUTH=off: the refusal only, nothing of the app, and the server stops
    (recorded here rather than done: AppTest has no server to stop; the browser test stops a real one)."""
    from streamlit import config

    import pages._access as access

    halted = []
    monkeypatch.setattr(access, "halt_server", lambda: halted.append(True))
    monkeypatch.setenv("WSVIZ_AUTH", "off")
    old = config.get_option("server.address")
    config.set_option("server.address", "0.0.0.0")
    try:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.run()
        assert [e.value for e in at.error] and "refuses to serve on '0.0.0.0'" in at.error[0].value
        assert len(at.sidebar.multiselect) == 0 and not at.title  # no page, no sidebar
        assert halted == [True]
    finally:
        config.set_option("server.address", old)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(address: str, env_extra: dict, tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """``streamlit run app.py`` exactly as the README starts it, on a free port of ``address``."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSVIZ_") or k == "WSVIZ_DATA_ROOTS"}
    env.update(WSVIZ_TOKEN_FILE=str(tmp_path / "token"), WSVIZ_RUNS=str(tmp_path / "runs"), **env_extra)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                                 "--server.address", address, "--server.headless", "true"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, port, log


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_server_refuses_to_start_off_loopback_without_access_control(address, tmp_path):
    """The README's command on a non-loopback address with WSVIZ_AUTH=off: the server stops before it
    takes a single connection (no browser involved), exit status 2, and says how to set access control."""
    proc, port, log = _start(address, {"WSVIZ_AUTH": "off"}, tmp_path)
    try:
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == 2, text
    assert f"error: wsviz refuses to serve on {address!r}" in text and "WSVIZ_TOKEN" in text, text
    assert "Traceback" not in text, text  # the message alone


def test_server_prints_the_sign_in_address_at_start_before_any_connection(tmp_path):
    """Jupyter's model: the generated token's address is on the console once the server is up, with no
    browser having connected; without the token a page has nothing of the app (the gate is in the script)."""
    proc, port, log = _start("127.0.0.2", {}, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "?token=" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        token = (tmp_path / "token").read_text().strip()
        assert f"open http://127.0.0.2:{port}/?token={token} to sign in" in text, text
        assert urllib.request.urlopen(f"http://127.0.0.2:{port}/_stcore/health", timeout=10).read() == b"ok"
        assert "?token=" not in text.split("to sign in", 1)[1], text  # printed once
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _train_page(tmp_path, monkeypatch, actor: auth.Actor) -> tuple[AppTest, RunStore]:
    import pages._shared as shared

    monkeypatch.setattr(shared, "RUNS", tmp_path / "runs")
    at = AppTest.from_file(str(ROOT / "pages" / "train.py"), default_timeout=300)
    at.session_state["_wsviz_actor"] = actor
    return at, RunStore(tmp_path / "runs")


def _press_launch(at: AppTest) -> AppTest:
    at.run()
    at.selectbox[0].set_value("resnet_digits")
    at.selectbox[1].set_value("mnist5k")
    at.number_input[0].set_value(1)
    at.number_input[3].set_value(2)  # max batches per epoch
    at.text_input[1].set_value('{"base_width": 4, "depth": 8}')
    return at.button[0].click().run()


def test_a_viewer_pressing_launch_on_the_train_page_is_refused(tmp_path, monkeypatch):
    """A forged launch: a viewer's session submits the Train page's form; launch() refuses it."""
    at, store = _train_page(tmp_path, monkeypatch, auth.Actor("viewer", "viewer"))
    _press_launch(at)
    assert not at.exception, at.exception
    assert any("is a viewer: only a trainer may launch" in e.value for e in at.error), [e.value for e in at.error]
    assert store.list() == []
    assert any("viewer (viewer): usage and limits" in x.label for x in at.expander)


def test_a_trainer_over_quota_is_refused_with_usage_on_the_page(tmp_path, monkeypatch):
    monkeypatch.setenv("WSVIZ_QUOTA_RUNS", "1")
    at, store = _train_page(tmp_path, monkeypatch, auth.Actor("alice", "trainer"))
    spec = {"model": "resnet_digits", "dataset": "mnist5k", "train_config": CFG.to_dict(), "overrides": SMALL,
            "data_root": None, "device": None, "data_seed": 0}
    store.create("resnet_digits", "mnist5k", spec, "queued-one", user="alice", role="trainer")  # queued, not started
    try:
        _press_launch(at)
        assert not at.exception, at.exception
        assert any("'alice' has 1 queued or running run(s), the limit is 1" in e.value for e in at.error), \
            [e.value for e in at.error]
        assert len(store.list()) == 1
        shown = at.dataframe[0].value
        assert shown.iloc[0].tolist() == ["queued + running runs", "1", "1"]
    finally:
        kill_active_runs(tmp_path / "runs")


def test_viewer_calls_and_other_users_runs_are_refused_and_the_audit_names_everyone(tmp_path, monkeypatch):
    """launch/cancel/resume as called by the page: a viewer is refused each; a trainer acts on its own runs;
    the audit trail names the user of every launch, cancel and resume."""
    store = RunStore(tmp_path / "runs")
    viewer, alice, bob = auth.Actor("viewer", "viewer"), auth.Actor("alice", "trainer"), auth.Actor("bob", "trainer")
    try:
        with pytest.raises(WsvizError, match="viewer: only a trainer may launch"):
            launch(store, "resnet_digits", "mnist5k", CFG, overrides=SMALL, actor=viewer, quotas=Quotas())
        assert store.list() == []
        run_a = launch(store, "resnet_digits", "mnist5k", CFG, overrides=SMALL, actor=alice, quotas=Quotas())
        run_b = launch(store, "resnet_digits", "mnist5k", CFG, overrides=SMALL, actor=bob, quotas=Quotas())
        with pytest.raises(WsvizError, match="viewer: only a trainer may cancel"):
            cancel(store, run_a.id, actor=viewer)
        with pytest.raises(WsvizError, match="launched by 'alice': only they can cancel"):
            cancel(store, run_a.id, actor=bob)
        cancel(store, run_a.id, actor=alice)
        cancel(store, run_b.id, actor=bob)
        with pytest.raises(WsvizError, match="viewer: only a trainer may resume"):
            resume(store, run_a.id, actor=viewer)
        with pytest.raises(WsvizError, match="launched by 'bob': only they can resume"):
            resume(store, run_b.id, actor=alice)
        trail = store.audit_trail()
        assert [(t["run_id"], t["action"], t["user"], t["role"]) for t in trail] == [
            (run_a.id, "launched", "alice", "trainer"), (run_b.id, "launched", "bob", "trainer"),
            (run_a.id, "cancelled", "alice", "trainer"), (run_b.id, "cancelled", "bob", "trainer")]
        assert all(t["time"] > 0 for t in trail)
        assert {r.id: r.user for r in store.list()} == {run_a.id: "alice", run_b.id: "bob"}
    finally:
        kill_active_runs(tmp_path / "runs")


# ------------------------------------------------------------------ staying signed in (the session cookie)
def test_a_session_cookie_signs_in_only_who_its_token_still_signs_in():
    cfg = auth.load_config(ENV)
    trainer = auth.verify(cfg, TRAINER)
    key, now = b"k" * 32, 1_000_000.0
    value = auth.session_cookie(trainer, TRAINER, now=now, key=key)
    assert TRAINER not in value and auth.cookie_actor(cfg, value, now=now + 60, key=key, hours=24) == trainer
    viewer = auth.session_cookie(auth.verify(cfg, VIEWER), VIEWER, now=now, key=key)
    assert auth.cookie_actor(cfg, viewer, now=now, key=key, hours=24) == auth.Actor("viewer", "viewer")
    data, signature = value.split(".")
    refused = {
        "another server (or a restart)": (value, b"o" * 32, now),
        "expired": (value, key, now + 24 * 3600 + 1),
        "issued in the future": (value, key, now - 1),
        "tampered data": (data[:-1] + ("A" if data[-1] != "A" else "B") + "." + signature, key, now),
        "tampered signature": (data + "." + signature[::-1], key, now),
        "no signature": (data, key, now),
        "empty": ("", key, now),
        "two dots": (value + ".x", key, now),
    }
    for why, (v, k, t) in refused.items():
        assert auth.cookie_actor(cfg, v, now=t, key=k, hours=24) is None, why
    # the token changed (rotated, removed) or now signs in someone else: the cookie no longer counts
    rotated = auth.load_config({**ENV, "WSVIZ_TOKEN": "n" * 20})
    assert auth.cookie_actor(rotated, value, now=now, key=key, hours=24) is None
    swapped = auth.load_config({"WSVIZ_TOKEN": VIEWER, "WSVIZ_VIEWER_TOKEN": TRAINER})
    assert auth.cookie_actor(swapped, value, now=now, key=key, hours=24) is None
    assert auth.cookie_actor(auth.load_config({"WSVIZ_AUTH": "off"}), value, now=now, key=key, hours=24) is None
    # planted cookies with characters no server-made cookie has: nobody, not a crash (compare_digest on
    # non-ASCII str raises TypeError)
    for odd in ("x.\u00e9", "\u00e9.abc", data + "." + signature[:-1] + "\u00e9"):
        assert auth.cookie_actor(cfg, odd, now=now, key=key, hours=24) is None
    # the cookie names its token by a mark keyed with the server's secret: not a hash anyone can test guesses on
    import base64
    import hashlib
    import json

    mark = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))[3]
    assert mark != hashlib.sha256(b"wsviz-session:" + TRAINER.encode()).hexdigest()[:32]
    assert mark not in auth.session_cookie(trainer, TRAINER, now=now, key=b"o" * 32)
    # a forged body with a valid-looking shape but signed with another key
    forged = auth.session_cookie(auth.Actor(trainer.name, "trainer"), "guess" * 4, now=now, key=key)
    assert auth.cookie_actor(cfg, forged, now=now, key=key, hours=24) is None  # right signature, wrong token


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "many"])
def test_session_hours_must_be_a_finite_positive_number(value):
    with pytest.raises(WsvizError, match="WSVIZ_SESSION_HOURS"):
        auth.session_hours({"WSVIZ_SESSION_HOURS": value})
    assert auth.session_hours({}) == 24.0 and auth.session_hours({"WSVIZ_SESSION_HOURS": "0.5"}) == 0.5


def test_a_refusal_is_kept_for_one_use_and_clients_are_named_as_the_form_names_them():
    key = auth.keep_refusal("Wrong token or password.")
    assert auth.take_refusal(key) == "Wrong token or password." and auth.take_refusal(key) is None
    assert auth.take_refusal("made-up") is None
    assert [auth.client_key(h) for h in (None, "", "127.0.0.1", "::1", "127.0.0.2", "10.0.0.5")] == \
        ["unknown"] * 4 + ["127.0.0.2", "10.0.0.5"]


def _asgi(middleware, path: str, query: str, method: str = "GET", kind: str = "http", host: str = "10.9.9.9"):
    """Run one request through ``middleware`` around an app that answers 200: (status, headers, app called)."""
    import asyncio

    called, sent = [], []

    async def app(scope, receive, send):
        called.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"page"})

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": kind, "method": method, "path": path, "query_string": query.encode(), "client": (host, 1),
             "scheme": "http", "headers": []}
    asyncio.run(middleware(app)(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, bool(called)


def test_a_token_link_becomes_a_cookie_and_leaves_the_address(monkeypatch):
    from pages._access import TokenLinks

    monkeypatch.setenv("WSVIZ_AUTH", "on")
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    status, headers, passed = _asgi(TokenLinks, "/share", f"variants=a%2Cb&token={TRAINER}")
    assert (status, passed) == (303, False) and headers["location"] == "/share?variants=a%2Cb"
    cookie = headers["set-cookie"]
    assert cookie.startswith("wsviz_session=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert TRAINER not in cookie and "Secure" not in cookie  # plain http here: a Secure cookie would be dropped
    value = cookie.split(";")[0].split("=", 1)[1]
    assert auth.cookie_actor(auth.load_config(ENV), value) == auth.verify(auth.load_config(ENV), TRAINER)

    status, headers, passed = _asgi(TokenLinks, "/", "token=wrong-token-0123456789", host="10.9.9.8")
    assert status == 303 and "set-cookie" not in headers and headers["location"].startswith("/?signin=")
    assert auth.take_refusal(headers["location"].split("=", 1)[1]) == "Wrong token or password."
    for path, query, method, kind in [("/", "variants=a", "GET", "http"),  # no token: untouched
                                      ("/_stcore/health", f"token={TRAINER}", "GET", "http"),
                                      ("/share", f"token={TRAINER}", "POST", "http")]:
        status, headers, passed = _asgi(TokenLinks, path, query, method, kind)
        assert (status, passed) == (200, True), (path, method)
    # only a page's address is handled: a protocol-relative or odd path is Streamlit's to refuse, so the
    # redirect can never leave this server (an open redirect) nor fail to encode
    for path in ("//evil.example/x", "/\\evil.example", "/%E9", "/\u00e9", "/a/b", "/_stcore/health", "/wsviz-sign-out",
                 "/share\r\nX-Injected: 1"):
        assert _asgi(TokenLinks, path, f"token={TRAINER}")[::2] == (200, True), path
    from pages._access import page_address

    assert page_address("/") and page_address("/share") and page_address("/share/")
    assert page_address("/wsviz/kernels", "/wsviz") and page_address("/wsviz", "/wsviz")
    assert not page_address("/kernels", "/wsviz") and not page_address("/wsvizzy/kernels", "/wsviz")
    assert not page_address("/wsviz/_stcore", "/wsviz")
    monkeypatch.setenv("WSVIZ_AUTH", "off")  # no access control: nothing to sign in
    assert _asgi(TokenLinks, "/", f"token={TRAINER}")[::2] == (200, True)
