"""Access control for the app, Jupyter's model: a token by default, roles, slowed wrong tries.

Where the credentials come from, first match wins:

* ``WSVIZ_AUTH=off``: no access control (a single-user laptop); a warning is printed on start,
  and the app refuses to serve on a non-loopback address.
* ``WSVIZ_TOKEN`` (trainer) and ``WSVIZ_VIEWER_TOKEN`` (viewer) from the environment, and/or
  users with a password hash and a role in the secrets file (``.streamlit/secrets.toml``)::

      [wsviz.users.alice]
      password_hash = "pbkdf2_sha256$600000$..."   # python -m wsviz.auth hash
      role = "trainer"                            # or "viewer"

* otherwise a random token, generated on first start and kept in ``WSVIZ_TOKEN_FILE``
  (default ``~/.wsviz/token``, mode 0600); the app prints the address that carries it
  (``?token=...``) and ``python -m wsviz.auth url`` prints it again.

Comparisons are constant-time (:func:`hmac.compare_digest`); after a few wrong tries from one
address every further try is refused for a delay that doubles, up to 30 s, and while more than 20
wrong tries from all addresses fell in the last minute, every try waits (:class:`Throttle`).
Viewers use every analysis page; only trainers launch, cancel or resume runs, and that is
enforced where the action happens (:func:`require_trainer` in :mod:`wsviz.training.jobs`).

Nothing here imports Streamlit: the app's gate (``pages/_access.py``) hands in the secrets
and the server address.
"""

from __future__ import annotations

import base64
import errno
import getpass
import hashlib
import hmac
import ipaddress
import json
import math
import os
import secrets as _secrets
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsviz.errors import WsvizError

ROLES = ("viewer", "trainer")
HASH_SCHEME = "pbkdf2_sha256"
HASH_ITERATIONS = 600_000  # OWASP's 2023 figure for PBKDF2-HMAC-SHA256
TOKEN_BYTES = 24
SECRET_ENV = ("WSVIZ_TOKEN", "WSVIZ_VIEWER_TOKEN")  # the secrets wsviz reads from the environment


@dataclass(frozen=True)
class Actor:
    """Who acts: a user name and a role (``viewer`` or ``trainer``)."""

    name: str
    role: str

    @property
    def can_train(self) -> bool:
        return self.role == "trainer"


def local_actor() -> Actor:
    """The account running this process: the CLI's and the library's user (a trainer)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = f"uid{os.getuid()}"
    return Actor(name, "trainer")


def require_trainer(actor: Actor | None, what: str) -> Actor:
    """``actor`` (or the local account when None) if it may ``what``; a WsvizError for a viewer."""
    actor = actor or local_actor()
    if actor.role not in ROLES:
        raise WsvizError(f"Unknown role {actor.role!r} for user {actor.name!r}: use one of {ROLES}.")
    if not actor.can_train:
        raise WsvizError(f"User {actor.name!r} is a viewer: only a trainer may {what}. Ask the server's owner for "
                         "a trainer token or account.")
    return actor


# ------------------------------------------------------------------------ password hashes
def hash_password(password: str, *, iterations: int = HASH_ITERATIONS, salt: bytes | None = None) -> str:
    """``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (base64) for the secrets file."""
    if not password:
        raise WsvizError("The password is empty: choose one.")
    salt = salt or _secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{HASH_SCHEME}${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a hash made by :func:`hash_password` (constant-time comparison)."""
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != HASH_SCHEME:
            return False
        want = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


# What an unknown user's password is checked against: a hash of nothing (random), as slow as a real one.
_NOBODY = (f"{HASH_SCHEME}${HASH_ITERATIONS}${base64.b64encode(_secrets.token_bytes(16)).decode()}$"
           f"{base64.b64encode(_secrets.token_bytes(32)).decode()}")


# ------------------------------------------------------------------------ configuration
@dataclass
class AuthConfig:
    """The access control in force: ``mode`` is ``off``, ``configured`` (tokens or users set by
    the owner) or ``generated`` (the token made on first start)."""

    mode: str
    tokens: dict[str, Actor] = field(default_factory=dict)  # token -> who it signs in
    users: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (password hash, role)
    token_file: Path | None = None

    @property
    def off(self) -> bool:
        return self.mode == "off"


def token_file_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("WSVIZ_TOKEN_FILE") or Path.home() / ".wsviz" / "token")


def generated_token(path: Path) -> str:
    """The token in ``path``, made (random, mode 0600, its folder 0700) if there is none yet.

    A file that others can read or write is refused: anyone who can read it can sign in; so is a
    file in a folder others can write (they could put their own token in its place). The file is
    opened without following a link and checked through the open file, so what is checked is what
    is read.
    """
    cannot = (f"The access token file {path} cannot be created ({{}}): set WSVIZ_TOKEN, or WSVIZ_TOKEN_FILE to a "
              "file in a folder you can write.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder = path.parent.stat().st_mode
    except OSError as exc:
        raise WsvizError(cannot.format(exc.strerror or exc)) from exc
    if folder & 0o022:
        raise WsvizError(f"The access token file {path} is in a folder other users can write (mode {folder & 0o7777:o}), "
                         f"so they could replace it: run `chmod go-w {path.parent}` or set WSVIZ_TOKEN_FILE to a file "
                         "in a private folder.")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise WsvizError(cannot.format(exc.strerror or exc)) from exc
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(_secrets.token_urlsafe(TOKEN_BYTES) + "\n")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link: refused, never followed
            raise WsvizError(f"The access token file {path} is not a plain file: remove it (a new token is made).") \
                from exc
        raise WsvizError(f"The access token file {path} cannot be read ({exc.strerror or exc}): remove it (a new token "
                         "is made) or set WSVIZ_TOKEN_FILE.") from exc
    with os.fdopen(fd, "rb") as fh:  # every check on the open file: nothing can be swapped in before the read
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise WsvizError(f"The access token file {path} is not a plain file: remove it (a new token is made).")
        if st.st_mode & 0o077:
            raise WsvizError(f"The access token file {path} can be read or written by other users (mode "
                             f"{st.st_mode & 0o777:o}): run `chmod 600 {path}` or remove it (a new token is made).")
        if st.st_uid != os.getuid():
            raise WsvizError(f"The access token file {path} belongs to another user: remove it or set "
                             "WSVIZ_TOKEN_FILE.")
        token = fh.read(4096).decode(errors="replace").strip()
    if len(token) < 16:
        raise WsvizError(f"The access token in {path} is shorter than 16 characters: remove the file (a new token "
                         "is made) or write a longer one.")
    return token


def load_config(env: Mapping[str, str] | None = None, secrets: Mapping[str, Any] | None = None) -> AuthConfig:
    """The access control configured by the environment and the secrets file's ``[wsviz]`` table."""
    env = os.environ if env is None else env
    switch = env.get("WSVIZ_AUTH", "on").strip().lower()
    if switch in ("off", "0", "false", "no"):
        return AuthConfig("off")
    if switch not in ("on", "1", "true", "yes", ""):
        raise WsvizError(f"WSVIZ_AUTH must be 'on' or 'off', got {switch!r}.")
    owner = local_actor().name
    tokens: dict[str, Actor] = {}
    for var, actor in zip(SECRET_ENV, (Actor(owner, "trainer"), Actor("viewer", "viewer")), strict=True):
        value = env.get(var, "").strip()
        if value:
            if len(value) < 16:
                raise WsvizError(f"{var} is shorter than 16 characters: use a random one, e.g. "
                                 "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`.")
            tokens[value] = actor
    users: dict[str, tuple[str, str]] = {}
    table = (secrets or {}).get("wsviz") or {}
    for name, entry in dict(table.get("users") or {}).items():
        entry = dict(entry)
        role = entry.get("role", "viewer")
        if role not in ROLES:
            raise WsvizError(f"User {name!r} in the secrets file has role {role!r}: use one of {ROLES}.")
        if not str(entry.get("password_hash", "")).startswith(HASH_SCHEME + "$"):
            raise WsvizError(f"User {name!r} in the secrets file needs a password_hash made by "
                             "`python -m wsviz.auth hash`.")
        users[str(name)] = (str(entry["password_hash"]), role)
    if tokens or users:
        return AuthConfig("configured", tokens, users)
    path = token_file_path(env)
    return AuthConfig("generated", {generated_token(path): Actor(owner, "trainer")}, token_file=path)


def verify(cfg: AuthConfig, secret: str, user: str = "") -> Actor | None:
    """Who ``secret`` signs in (a token, or ``user``'s password), or None. Every token is compared,
    constant-time, whatever matched first."""
    if cfg.off:
        return local_actor()
    if not secret:
        return None
    if user:
        stored = cfg.users.get(user)
        if stored is None:
            check_password(secret, _NOBODY)  # the same work as for a real user: the time tells no user names
            return None
        return Actor(user, stored[1]) if check_password(secret, stored[0]) else None
    found = None
    for token, actor in cfg.tokens.items():
        if hmac.compare_digest(secret.encode(), token.encode()):
            found = actor
    return found


# ------------------------------------------------------------------------ where the server listens
def is_loopback(address: str | None) -> bool:
    """Whether a server bound to ``address`` is reachable from this machine only."""
    if address is None or address.strip() == "":
        return False  # Streamlit's default when unset: every interface
    address = address.strip().strip("[]")
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface


def check_bind(address: str | None, cfg: AuthConfig) -> None:
    """Refuse (WsvizError) to serve on a non-loopback address without access control the owner set."""
    if is_loopback(address) or cfg.mode == "configured":
        return
    what = "WSVIZ_AUTH=off turns access control off" if cfg.off else "only a generated token protects it"
    raise WsvizError(
        f"wsviz refuses to serve on {address or 'every interface'!r}: other machines can reach that address and "
        f"{what}. Set WSVIZ_TOKEN (trainer) and WSVIZ_VIEWER_TOKEN (viewer) to random strings, or add users with "
        "password hashes to .streamlit/secrets.toml (`python -m wsviz.auth hash`), or bind to localhost and reach "
        "the server through an SSH tunnel (`ssh -L 8501:localhost:8501 server`).")


def sign_in_url(cfg: AuthConfig, base: str = "http://localhost:8501") -> str | None:
    """The address that signs in with the generated or trainer token (None without one)."""
    token = next((t for t, a in cfg.tokens.items() if a.can_train), None)
    return f"{base.rstrip('/')}/?token={token}" if token else None


_ANNOUNCED = threading.Event()


def plain_http_warning(address: str | None, cfg: AuthConfig, tls: bool) -> str | None:
    """The warning for tokens or passwords sent over plain http to an address other machines reach (None
    when there is nothing to warn of). Only a warning, as Jupyter's: TLS may be done in front of wsviz."""
    if cfg.off or tls or is_loopback(address):
        return None
    return (f"WARNING: wsviz serves plain http on {address or 'every interface'!r}: its traffic, the token or "
            "password included (the sign-in address, the form, the session cookie), crosses the network unencrypted. "
            "Put it behind TLS (a reverse proxy serving https, e.g. nginx or Caddy, or Streamlit's server.sslCertFile "
            "and server.sslKeyFile), or bind to localhost and reach it through an SSH tunnel.")


def announce(cfg: AuthConfig, base: str, out: Callable[[str], None] | None = None, *, address: str | None = "localhost",
             tls: bool = False) -> None:
    """Once per process: the sign-in address, or the warning that access control is off; and the warning
    that the server speaks plain http to other machines (:func:`plain_http_warning`)."""
    if _ANNOUNCED.is_set():
        return
    _ANNOUNCED.set()
    out = out or (lambda s: print(s, file=sys.stderr, flush=True))
    if cfg.off:
        out("WARNING: wsviz runs WITHOUT access control (WSVIZ_AUTH=off): anyone who can open this address can "
            "launch trainings as this account and read its files. Only do this on a single-user machine.")
    elif cfg.mode == "generated":
        out(f"wsviz: open {sign_in_url(cfg, base)} to sign in (the token is kept in {cfg.token_file}, mode 0600).")
    else:
        out("wsviz: access control from WSVIZ_TOKEN / WSVIZ_VIEWER_TOKEN / the secrets file; "
            f"{len(cfg.tokens)} token(s), {len(cfg.users)} user(s).")
    warning = plain_http_warning(address, cfg, tls)
    if warning:
        out(warning)


# ------------------------------------------------------------------------ slowed wrong tries
class Throttle:
    """Wrong sign-in tries per client (its address) and in all. Per client: after ``free`` wrong tries,
    every try is refused for a delay that doubles with each further wrong try, up to ``cap`` seconds.
    In all: while more than ``total_free`` wrong tries (from any clients) fell in the last ``window``
    seconds, every try is refused until enough of them have left the window; a trickle below that
    rate never refuses anyone, and a flood only while it lasts (and ``window`` seconds after).

    Clients behind one address (an SSH tunnel: every tunnelled user is 127.0.0.1) share it; the
    cap keeps that from locking the owner out for long.
    """

    def __init__(self, free: int = 3, base: float = 1.0, cap: float = 30.0, total_free: int = 20,
                 window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base, self.cap, self.total_free, self.window = free, base, cap, total_free, window
        self.clock = clock
        self._fails: dict[str, tuple[int, float]] = {}  # client -> (wrong tries, refused until)
        self._recent: deque[float] = deque()  # when the wrong tries of all clients in the last window were
        self._lock = threading.Lock()

    def _wait(self, client: str, now: float) -> float:
        while self._recent and self._recent[0] <= now - self.window:
            self._recent.popleft()
        until = self._fails.get(client, (0, 0.0))[1]
        if len(self._recent) > self.total_free:  # until the window holds total_free of them again
            until = max(until, self._recent[-self.total_free - 1] + self.window)
        return max(0.0, until - now)

    def wait_left(self, client: str) -> float:
        """Seconds before ``client`` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            return self._wait(client, now)

    def _record(self, client: str, now: float) -> None:
        n = self._fails.get(client, (0, 0.0))[0] + 1
        self._fails[client] = (n, now + min(self.cap, self.base * 2 ** (n - self.free - 1)) if n > self.free else 0.0)
        self._recent.append(now)

    def failed(self, client: str) -> float:
        """Record a wrong try; returns the seconds the client must now wait."""
        now = self.clock()
        with self._lock:
            self._record(client, now)
            return self._wait(client, now)

    def reserve(self, client: str) -> tuple[float, float]:
        """Before a try is checked: (0, when) with the try already counted as wrong, so tries checked at the
        same time see it (:meth:`succeeded` takes it back), or (seconds left to wait, 0) and nothing counted."""
        now = self.clock()
        with self._lock:
            left = self._wait(client, now)
            if left > 0:
                return left, 0.0
            self._record(client, now)
            return 0.0, now

    def succeeded(self, client: str, reserved: float | None = None) -> None:
        """A right try: the client's wrong tries are forgotten, and its reservation (:meth:`reserve`) taken back."""
        with self._lock:
            self._fails.pop(client, None)
            if reserved is not None and reserved in self._recent:
                self._recent.remove(reserved)


def _delay() -> float:
    from wsviz.envsettings import positive_number

    return positive_number(os.environ, "WSVIZ_SIGNIN_DELAY", float, default=1.0)


# The first delay after the free wrong tries (WSVIZ_SIGNIN_DELAY seconds, default 1), doubling, up to 30 s
# (or the first delay, if longer).
THROTTLE = Throttle(base=_delay(), cap=max(30.0, _delay()))


def attempt(cfg: AuthConfig, secret: str, client: str, user: str = "", throttle: Throttle = THROTTLE) -> Actor:
    """Sign in with ``secret`` (and ``user`` for a password) from ``client``: the Actor, or a WsvizError
    (wrong, or too many wrong tries: the message says how long to wait)."""
    left, reserved = throttle.reserve(client)  # counted as wrong until it proves right: no check runs unseen
    if left > 0:
        raise WsvizError(f"Too many wrong tries: wait {left:.0f} s before trying again.")
    actor = verify(cfg, secret, user)
    if actor is None:
        left = throttle.wait_left(client)
        raise WsvizError("Wrong token or password." + (f" Too many wrong tries: wait {left:.0f} s before trying again."
                                                        if left > 0 else ""))
    throttle.succeeded(client, reserved)
    return actor


# ------------------------------------------------------------------------ staying signed in
# As Jupyter does: a link carrying the token signs the browser in with a cookie the server signs, so a
# reload or a new tab stays signed in. The cookie is HttpOnly (page scripts cannot read it), names who
# and which token, and is refused once the token is no longer in force, after WSVIZ_SESSION_HOURS
# (default 24), or after a server restart (the key below lives in the server process only).
# A signed-in session keeps the same signed value (its ticket: for a password, it names the user's
# password hash) and the gate checks it again on every run, so a session, too, ends when what
# signed it in is changed or removed, when its user's role changes, or after WSVIZ_SESSION_HOURS.
SESSION_COOKIE = "wsviz_session"
_COOKIE_KEY = _secrets.token_bytes(32)
_REFUSALS: dict[str, str] = {}  # one-use keys -> a refusal for the sign-in prompt to show
_REFUSALS_LOCK = threading.Lock()


def session_hours(env: Mapping[str, str] | None = None) -> float:
    from wsviz.envsettings import positive_number

    hours = positive_number(os.environ if env is None else env, "WSVIZ_SESSION_HOURS", float, default=24.0)
    if not math.isfinite(hours):
        raise WsvizError(f"WSVIZ_SESSION_HOURS must be a finite number of hours, got {hours!r}.")
    return hours


def _mark(token: str, key: bytes) -> str:
    """Which token signed a cookie in, without the token: keyed by this server's secret, so a leaked
    cookie gives nothing to test token guesses against offline."""
    return hmac.new(key, b"wsviz-session:" + token.encode(), hashlib.sha256).hexdigest()[:32]


def client_key(host: str | None) -> str:
    """The throttle's name for a client, as the app's sign-in form names it (Streamlit reports no
    address for 127.0.0.1 and ::1), so the link and the form share one count of wrong tries."""
    return "unknown" if host in (None, "", "127.0.0.1", "::1") else str(host)


def session_cookie(actor: Actor, token: str, now: float | None = None, key: bytes | None = None) -> str:
    """The cookie value that signs ``actor`` in, as signed in by ``token``: data.signature (HMAC-SHA256)."""
    key = key or _COOKIE_KEY
    body = json.dumps([actor.name, actor.role, int(time.time() if now is None else now), _mark(token, key)])
    data = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
    return f"{data}.{hmac.new(key, data.encode(), hashlib.sha256).hexdigest()}"


def _user_credential(name: str, password_hash: str) -> str:
    """What stands for a user's password in a session's ticket: it changes with the password's hash.
    (No token can equal it: an environment variable holds no NUL.)"""
    return f"\0user\0{name}\0{password_hash}"


def session_ticket(cfg: AuthConfig, actor: Actor, secret: str, user: str = "") -> str:
    """What a session keeps once ``actor`` signed in with ``secret`` (``user``'s password, or a token): a
    value :func:`cookie_actor` checks again on every run, never the secret itself."""
    return session_cookie(actor, _user_credential(user, cfg.users[user][0]) if user else secret)


def cookie_actor(cfg: AuthConfig, value: str | None, now: float | None = None, key: bytes | None = None,
                 hours: float | None = None) -> Actor | None:
    """Who a session cookie (or a session's ticket) signs in, or None: not signed by this server,
    expired, or its token or password no longer in force (changed, removed) or no longer signing in
    the same user and role."""
    if cfg.off or not value or not value.isascii() or value.count(".") != 1:  # a planted odd cookie: nobody
        return None
    key = key or _COOKIE_KEY
    data, signature = value.split(".")
    if not hmac.compare_digest(signature.encode(), hmac.new(key, data.encode(), hashlib.sha256).hexdigest().encode()):
        return None
    try:
        name, role, issued, mark = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
        age = (time.time() if now is None else now) - float(issued)
    except (ValueError, TypeError):
        return None
    if not 0 <= age <= 3600 * (session_hours() if hours is None else hours):
        return None
    found = None
    users = {_user_credential(n, stored): Actor(n, r) for n, (stored, r) in cfg.users.items()}
    for token, actor in (cfg.tokens | users).items():  # every one compared, constant-time
        if hmac.compare_digest(_mark(token, key).encode(), str(mark).encode()) and actor == Actor(str(name), str(role)):
            found = actor
    return found


def keep_refusal(message: str) -> str:
    """Keep a refusal for the sign-in prompt under a one-use key (the address carries the key, not
    the message: a link cannot make the prompt say something else)."""
    key = _secrets.token_urlsafe(12)
    with _REFUSALS_LOCK:
        while len(_REFUSALS) >= 1000:
            _REFUSALS.pop(next(iter(_REFUSALS)))
        _REFUSALS[key] = message
    return key


def take_refusal(key: str) -> str | None:
    with _REFUSALS_LOCK:
        return _REFUSALS.pop(key, None)


def main(argv: list[str] | None = None) -> int:
    """``python -m wsviz.auth hash`` (a password hash for the secrets file) or ``url`` (the sign-in address)."""
    from wsviz.cli_errors import CliParser

    p = CliParser(prog="python -m wsviz.auth", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("hash", help="read a password (twice) and print its hash for .streamlit/secrets.toml")
    u = sub.add_parser("url", help="print the sign-in address carrying the token")
    u.add_argument("--base", default="http://localhost:8501")
    args = p.parse_args(argv)
    if args.cmd == "hash":
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise WsvizError("The two passwords differ: run it again.")
        print(hash_password(first))
        return 0
    cfg = load_config()
    url = sign_in_url(cfg, args.base)
    if url is None:
        raise WsvizError("No trainer token is in force (access control is off, or only users with passwords are "
                         "configured): nothing to print.")
    print(url)
    return 0


if __name__ == "__main__":
    from wsviz.cli_errors import run_cli

    sys.exit(run_cli(main))
