"""The app's gate: nothing of wsviz is drawn (no page, no sidebar) before the session has signed in.

Called by app.py before ``st.navigation``. The rules live in :mod:`wsviz.auth` (no Streamlit);
here they meet the browser: the token from the address (``?token=...``, removed from it once
used so shared links never carry it) or from the sign-in form, and the session's user, kept in
``st.session_state`` so it survives moving between pages, with what it signed in with, checked
again on every run (a revoked token or password, or a changed role, ends the session).
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import asynccontextmanager

import streamlit as st

from wsviz import auth
from wsviz.errors import WsvizError

_KEY = "_wsviz_actor"
_TICKET = "_wsviz_ticket"  # what signed the session in (auth.session_ticket), checked again on every run
_ON = "_wsviz_access_on"


def access_on() -> bool:
    """Whether this session went through a sign-in (access control on): the sidebar offers Sign out."""
    return bool(st.session_state.get(_ON))


def _secrets() -> dict:
    try:
        return {"wsviz": st.secrets["wsviz"].to_dict()} if "wsviz" in st.secrets else {}
    except (FileNotFoundError, KeyError, AttributeError):  # no secrets file
        return {}
    except Exception as exc:  # noqa: BLE001 - a secrets file that does not parse
        raise WsvizError(f"The secrets file cannot be read ({exc}): fix .streamlit/secrets.toml.") from exc


def halt_server() -> None:
    """Stop the Streamlit server (all sessions); the process then exits."""
    from streamlit.runtime import Runtime

    Runtime.instance().stop()


def _stop_server(message: str) -> None:
    """Refuse to serve: the message on the console and in the browser, and the server stops."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    st.error(message, icon=":material/lock:")
    halt_server()
    st.stop()


def _secrets_file() -> dict:
    """The ``[wsviz]`` table of the secrets file(s), read without a session (at server start)."""
    import tomllib
    from pathlib import Path

    found: dict = {}
    for path in st.get_option("secrets.files") or []:
        path = Path(path)
        if path.is_file():
            try:
                found.update(tomllib.loads(path.read_text()).get("wsviz", {}))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise WsvizError(f"The secrets file {path} cannot be read ({exc}): fix it.") from exc
    return {"wsviz": found} if found else {}


def serves_tls() -> bool:
    """Whether Streamlit itself serves https (``server.sslCertFile``)."""
    return bool(st.get_option("server.sslCertFile"))


def server_address() -> tuple[str | None, str]:
    """(the address the server binds to, the base URL a browser on this machine opens)."""
    address = st.get_option("server.address")
    return address, f"{'https' if serves_tls() else 'http'}://{address or 'localhost'}:{st.get_option('server.port')}"


def check_server_start() -> auth.AuthConfig:
    """What the server checks before it takes a connection: access control on a non-loopback
    address (WsvizError if none the owner set), then the sign-in address or the warning printed."""
    address, base = server_address()
    cfg = auth.load_config(secrets=_secrets_file())
    auth.check_bind(address, cfg)
    auth.session_hours()  # WSVIZ_SESSION_HOURS: a finite, positive number, or the server does not start
    auth.announce(cfg, base, address=address, tls=serves_tls())
    return cfg


@asynccontextmanager
async def server_lifespan(_app):
    """``st.App`` lifespan (app.py): runs once when ``streamlit run app.py`` starts the server."""
    try:
        check_server_start()
    except WsvizError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        # Nothing runs yet (no session, no training): leave at once with the message alone, not the
        # lifespan traceback that raising here would have the server print under it.
        os._exit(2)
    yield {}


SIGN_OUT = "wsviz-sign-out"
_PAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a page's address: one plain path segment


def base_path() -> str:
    """The server's ``baseUrlPath`` as ``/base`` ("" when served at the root)."""
    base = (st.get_option("server.baseUrlPath") or "").strip("/")
    return f"/{base}" if base else ""


def sign_out_path() -> str:
    return f"{base_path()}/{SIGN_OUT}"


def page_address(path: str, base: str = "") -> bool:
    """Whether ``path`` is an address a page could have (``/``, ``/share``, under ``base``): the only
    requests TokenLinks handles. Anything else, Streamlit's own routes, odd or protocol-relative
    paths (``//host``), passes through untouched, so a redirect can only go to the same path here."""
    if base:
        if not (path == base or path.startswith(base + "/")):
            return False
        path = path[len(base):] or "/"
    rest = path.strip("/") if path.startswith("/") and not path.startswith("//") else None
    return rest is not None and (rest == "" or (_PAGE.fullmatch(rest) is not None and rest != SIGN_OUT))


class TokenLinks:
    """ASGI middleware (app.py's ``st.App``): a page address carrying ``?token=`` signs the browser in
    the way Jupyter does. The token is checked (and a wrong one counted, as by the sign-in form); the
    browser is sent on to the same address without it, with a session cookie when it was right, so
    a reload or a new tab stays signed in; when it was wrong, with a one-use key under which the
    sign-in prompt finds the refusal. Only page addresses are handled; Streamlit's own routes and
    every other request pass through untouched, and the session gate (:func:`require_access`) still
    decides who is signed in."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        from urllib.parse import parse_qsl, urlencode

        path = scope.get("path", "/") if scope["type"] == "http" else ""
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        token = [v for k, v in pairs if k == "token"]
        if (scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD") or not token
                or not page_address(path, base_path())):
            return await self.app(scope, receive, send)
        try:
            cfg, hours = auth.load_config(secrets=_secrets_file()), auth.session_hours()
        except WsvizError:  # the gate says what is wrong with the configuration
            return await self.app(scope, receive, send)
        if cfg.off:
            return await self.app(scope, receive, send)
        rest = [(k, v) for k, v in pairs if k not in ("token", "signin")]
        headers = [(b"cache-control", b"no-store")]
        try:
            actor = auth.attempt(cfg, token[-1], auth.client_key((scope.get("client") or (None,))[0]))
        except WsvizError as exc:
            rest.append(("signin", auth.keep_refusal(str(exc))))
        else:
            secure = "; Secure" if scope.get("scheme") == "https" else ""
            cookie = (f"{auth.SESSION_COOKIE}={auth.session_cookie(actor, token[-1])}; Path=/; HttpOnly; "
                      f"SameSite=Strict; Max-Age={int(3600 * hours)}{secure}")
            headers.append((b"set-cookie", cookie.encode("latin-1")))
        location = path + ("?" + urlencode(rest) if rest else "")
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode("latin-1")), *headers]})
        await send({"type": "http.response.body", "body": b""})


async def sign_out(_request):
    """``/wsviz-sign-out`` (under the server's base path): forget this browser's session cookie and go to the sign-in prompt."""
    from starlette.responses import RedirectResponse

    response = RedirectResponse(f"{base_path()}/", status_code=303, headers={"cache-control": "no-store"})
    response.delete_cookie(auth.SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def current_actor() -> auth.Actor:
    """The signed-in user of this session (the local account when access control is off)."""
    actor = st.session_state.get(_KEY)
    if isinstance(actor, auth.Actor):
        return actor
    # Not signed in (the gate did not run for this session): the local account only without access
    # control, else a viewer, who cannot start anything.
    return auth.local_actor() if auth.load_config(secrets=_secrets()).off else auth.Actor("anonymous", "viewer")


def require_access(paths: list[str] | tuple[str, ...] = ()) -> auth.Actor:
    """The session's user, or stop the script after drawing the sign-in prompt (and nothing else).

    ``paths``: the app's page addresses (``kernels``, ``share``, ...). While signed out each of them
    shows the same prompt, so a link to a page neither says "Page not found" nor loses the page:
    once signed in, the session is on the page the address named (Streamlit knows a page by its
    address), as Jupyter's login returns to ``/lab/tree/...``."""
    # Checked at server start already (app.py); again here for a server that did not start through
    # app.py's st.App (AppTest, an embedding host), and because the secrets file may have changed.
    address, base = server_address()
    try:
        cfg = auth.load_config(secrets=_secrets())
        auth.check_bind(address, cfg)
        auth.session_hours()  # a bad WSVIZ_SESSION_HOURS is said here, not as a crash at the first cookie
    except WsvizError as exc:
        _stop_server(str(exc))
    auth.announce(cfg, base, address=address, tls=serves_tls())
    st.session_state[_ON] = not cfg.off
    if cfg.off:
        st.session_state[_KEY] = auth.local_actor()
        return st.session_state[_KEY]
    error = None
    if isinstance(st.session_state.get(_KEY), auth.Actor):
        # Checked again on every run, so revoking takes effect at the session's next run: the token or
        # password it signed in with may have been changed or removed, the user's role changed, or
        # WSVIZ_SESSION_HOURS passed since it signed in.
        actor = auth.cookie_actor(cfg, st.session_state.get(_TICKET))
        if actor is not None:
            return actor
        del st.session_state[_KEY]
        st.session_state.pop(_TICKET, None)
        error = ("Signed out: the token or password this session signed in with is no longer in force (changed or "
                 "removed, or its user's role changed), or the session is older than WSVIZ_SESSION_HOURS. Sign in "
                 "again.")
    client = auth.client_key(st.context.ip_address)
    refusal = st.query_params.get("signin")  # a wrong token link, refused by TokenLinks: say why here
    if refusal is not None:
        del st.query_params["signin"]
        error = auth.take_refusal(refusal)
        if error:
            st.session_state["_signin_error"] = error
    cookie = st.context.cookies.get(auth.SESSION_COOKIE)
    actor = auth.cookie_actor(cfg, cookie)
    if actor is not None:  # signed in by a token link earlier in this browser (a reload, a new tab)
        st.session_state[_KEY], st.session_state[_TICKET] = actor, cookie
        return actor
    token = st.query_params.get("token")
    if token is not None:
        del st.query_params["token"]  # used once; the address can then be shared without it
        try:
            actor = auth.attempt(cfg, token, client)
        except WsvizError as exc:
            error = st.session_state["_signin_error"] = str(exc)  # kept: removing the token may rerun the page
    if actor is None:
        # The only page while signed out: replaces every page and the sidebar's list of them.
        prompt = lambda: _sign_in(cfg, client, error)  # noqa: E731
        st.navigation([st.Page(prompt, title="Sign in", url_path="sign-in", default=True)]
                      + [st.Page(prompt, title="Sign in", url_path=p) for p in dict.fromkeys(paths) if p
                         and p != "sign-in"], position="hidden").run()
        st.stop()
    st.session_state[_KEY], st.session_state[_TICKET] = actor, auth.session_ticket(cfg, actor, token)
    st.session_state.pop("_signin_error", None)
    # Signed in by the address's token: nothing is drawn yet, so the app draws in this very run, on
    # the page the address names (a rerun here could lose it to the address losing its token).
    return actor


def _sign_in(cfg: auth.AuthConfig, client: str, error: str | None) -> None:
    actor, secret, user = None, "", ""
    st.title("wsviz: sign in")
    where = (f" It is printed where wsviz was started, and `python -m wsviz.auth url` prints it again "
             f"(it is kept in {cfg.token_file})." if cfg.mode == "generated" else "")
    st.caption("This server is protected. Open the address with the token (…/?token=…), or enter the token, "
               f"or a user name and password, below.{where}")
    with st.form("sign-in"):
        user = st.text_input("User (leave empty for a token)", key="_signin_user").strip()
        secret = st.text_input("Token or password", type="password", key="_signin_secret")
        if st.form_submit_button("Sign in", type="primary"):
            try:
                actor = auth.attempt(cfg, secret, client, user=user)
            except WsvizError as exc:
                error = st.session_state["_signin_error"] = str(exc)
    if actor is None:
        error = error or st.session_state.get("_signin_error")
        if error:
            st.error(error, icon=":material/lock:")
        return
    st.session_state[_KEY], st.session_state[_TICKET] = actor, auth.session_ticket(cfg, actor, secret, user)
    st.rerun()  # draw the app without the form
