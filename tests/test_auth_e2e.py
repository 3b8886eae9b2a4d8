"""The access control in a browser, against a real server bound to 127.0.0.2 (loopback only).

Without the token: the sign-in prompt and nothing else (no page, no sidebar, no Launch), even for a
page's address on a fresh server; signing in (token link or form) then opens the page the address named. A wrong token: refused, and slowed after repeated tries. The
token: every page works, moving between pages keeps the session signed in, and XSRF stays on.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import CHROMIUM
from test_e2e import PAGES, _check, _settle, streamlit_server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "e2e-trainer-token-" + "x" * 16
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with streamlit_server(tmp_path_factory, address="127.0.0.2", unset=("WSVIZ_VIEWER_TOKEN",), WSVIZ_AUTH="on",
                          WSVIZ_TOKEN=TOKEN, WSVIZ_SIGNIN_DELAY="60") as (url, _):  # a lockout that outlasts the next try
        yield url


def _signed_out(page) -> None:
    page.wait_for_selector("text=wsviz: sign in", timeout=180_000)
    page.wait_for_timeout(1500)  # anything that would follow the prompt has had time to come
    text = page.evaluate("() => document.body.innerText")
    assert page.locator("[data-testid=stSidebarNav]").count() == 0, text
    assert page.locator("[data-testid=stSidebar]").count() == 0, text
    assert page.get_by_role("button", name="Launch").count() == 0, text
    assert "Variants to compare" not in text and "Model zoo" not in text, text
    assert page.get_by_role("heading").all_inner_texts() == ["wsviz: sign in"], text


def test_without_the_token_only_the_sign_in_prompt(server, browser):
    page = browser.new_page()
    page.goto(f"{server}/train")  # a page's own address, first request of a fresh server
    _signed_out(page)
    page.goto(f"{server}/")
    _signed_out(page)
    page.close()


def test_with_the_token_every_page_works_and_xsrf_stays_on(server, browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.goto(f"{server}/?token={TOKEN}")
    _settle(page)
    assert "token" not in page.url  # used once, then removed from the address
    assert page.get_by_text("Signed in as").count() >= 1
    for path in PAGES[1:] + [""]:  # through the sidebar: the same session, still signed in
        page.locator(f"[data-testid=stSidebarNav] a[href$='/{path}']").first.click()
        page.wait_for_url(lambda url, p=path: urlparse(url).path.rstrip("/").endswith(f"/{p}".rstrip("/") or ""),
                          timeout=60_000)
        _settle(page)
        assert page.get_by_text("wsviz: sign in").count() == 0
        _check(page, f"auth-{path or 'models'}")
    assert page.get_by_role("heading").count() >= 1
    # XSRF: the server hands out its cookie, and refuses an upload without the matching token.
    assert "_streamlit_xsrf" in {c["name"] for c in ctx.cookies()}
    req = urllib.request.Request(f"{server}/_stcore/upload_file/some-session/some-file", data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 403
    ctx.close()


def _on_page(page, path: str, heading: str) -> None:
    page.wait_for_url(lambda url: urlparse(url).path.rstrip("/").endswith(f"/{path}"), timeout=60_000)
    _settle(page)
    assert "token" not in page.url
    assert page.get_by_text("wsviz: sign in").count() == 0
    assert heading in page.get_by_role("heading").all_inner_texts()


def test_a_link_to_a_page_with_the_token_opens_that_page(server, browser):
    """As Jupyter's ``/lab/tree/x?token=``: the link names a page, and signing in lands there, not on Models."""
    page = browser.new_page()
    page.goto(f"{server}/share?token={TOKEN}")
    _on_page(page, "share", "Share weights")
    page.close()


def test_signing_in_by_the_form_opens_the_page_the_address_asked_for(server, browser):
    page = browser.new_page()
    page.goto(f"{server}/kernels")
    _signed_out(page)
    page.get_by_label("Token or password").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    _on_page(page, "kernels", "Kernels")
    page.close()


def test_a_token_link_keeps_the_browser_signed_in_until_it_signs_out(server, browser):
    """Jupyter's model: the link's token becomes a session cookie the server signed (HttpOnly: page scripts
    cannot read it), so a reload and a new tab stay signed in; a tampered cookie signs nobody in; Sign out
    forgets it."""
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(f"{server}/kernels?token={TOKEN}")
    _on_page(page, "kernels", "Kernels")
    cookie = next(c for c in ctx.cookies() if c["name"] == "wsviz_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    assert "wsviz_session" not in page.evaluate("() => document.cookie")
    page.reload()  # a new Streamlit session: signed in by the cookie, on the same page
    _on_page(page, "kernels", "Kernels")
    other = ctx.new_page()  # a new tab
    other.goto(f"{server}/train")
    _on_page(other, "train", "Train")
    other.close()

    tampered = browser.new_context()
    data, signature = cookie["value"].split(".")
    forged = data[:-2] + ("AA" if data[-2:] != "AA" else "BB")
    tampered.add_cookies([{**cookie, "value": f"{forged}.{signature}"}])
    t = tampered.new_page()
    t.goto(f"{server}/")
    _signed_out(t)
    tampered.close()

    page.get_by_role("link", name="Sign out").click()
    _signed_out(page)
    assert "wsviz_session" not in {c["name"] for c in ctx.cookies()}
    page.goto(f"{server}/")
    _signed_out(page)
    ctx.close()


def _refusal(page) -> str:
    """The sign-in page's refusal message, once shown."""
    page.wait_for_function("() => /Wrong token|Too many wrong tries/.test(document.body.innerText)",
                           timeout=120_000)
    return next(line for line in page.evaluate("() => document.body.innerText").splitlines()
                if "Wrong token" in line or "Too many wrong tries" in line)


def test_a_wrong_token_is_refused_and_repeated_tries_are_slowed(server, browser):
    page = browser.new_page()
    seen = []
    for i in range(4):
        page.goto(f"{server}/?token=wrong-{i}-{'y' * 20}")
        seen.append(_refusal(page))
        _signed_out(page)
    assert all(s.startswith("Wrong token or password.") for s in seen[:3]), seen
    assert "Too many wrong tries: wait" in seen[3], seen
    page.goto(f"{server}/?token={TOKEN}")  # while slowed, even the right token is refused
    assert _refusal(page).startswith("Too many wrong tries: wait"), seen
    _signed_out(page)
    page.close()
