from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Made explicit for every test process (and the app servers and trainings they start): the app's
# access control is off (WSVIZ_AUTH=off) except in the tests of it (tests/test_auth*.py set their
# own), and folder: datasets may be read from the temporary folder the tests make them in.
os.environ.setdefault("WSVIZ_AUTH", "off")
os.environ.setdefault("WSVIZ_DATA_ROOTS", str(Path(tempfile.gettempdir()).resolve()))
# The prediction cache of the analyses goes to a fresh temporary folder, never the user's ~/.cache.
os.environ.setdefault("WSVIZ_CACHE_DIR", tempfile.mkdtemp(prefix="wsviz-test-cache-"))

warnings.filterwarnings("ignore", category=UserWarning, module="e2cnn")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# ------------------------------------------------------------------ the suite proves it ran
# On a developer's laptop a test whose system dependency is missing (Debian's chromium, the
# Fashion-MNIST package) skips with its reason. In CI (CI=true, as .ci/run runs) a skip is a
# failure: a green CI must mean every test ran. A test may opt out with
# @pytest.mark.may_skip_in_ci("why"), for what a CI machine may legitimately lack. Every skip is
# listed at the end of the run, and so is every browser (e2e) test that ran, by name.


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


_SKIPPED: list[tuple[str, str]] = []
_E2E_RAN: list[tuple[str, str]] = []


def _skip_reason(rep) -> str:
    lr = rep.longrepr
    return str(lr[2] if isinstance(lr, tuple) and len(lr) == 3 else lr).removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    skipped = rep.skipped
    if skipped and not hasattr(rep, "wasxfail"):
        reason = _skip_reason(rep)
        _SKIPPED.append((item.nodeid, reason))
        if in_ci() and item.get_closest_marker("may_skip_in_ci") is None:
            rep.outcome = "failed"
            rep.longrepr = (f"skipped in CI (CI=true): {reason}\nCI must run every test: install what it needs "
                            "(see .ci/run), or mark it @pytest.mark.may_skip_in_ci(reason) if a CI machine "
                            "may legitimately lack it.")
    if item.get_closest_marker("e2e") is not None and (rep.when == "call" or rep.outcome != "passed"):
        if rep.when == "call" or not any(n == item.nodeid for n, _ in _E2E_RAN):
            _E2E_RAN.append((item.nodeid, "skipped" if skipped else rep.outcome))


def pytest_collectreport(report):
    if report.skipped:
        _SKIPPED.append((report.nodeid, _skip_reason(report)))
        if in_ci():
            report.outcome = "failed"
            report.longrepr = f"module skipped in CI (CI=true): {_skip_reason(report)}"


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    ran = [(n, o) for n, o in _E2E_RAN if o != "skipped"]
    if _E2E_RAN:
        tr.write_sep("=", f"browser (e2e) tests that ran: {len(ran)} of {len(_E2E_RAN)}", bold=True)
        for nodeid, out in _E2E_RAN:
            tr.write_line(f"e2e {out.upper():8} {nodeid}")
    if _SKIPPED:
        tr.write_sep("!", f"{len(_SKIPPED)} SKIPPED TEST(S): these did NOT run", red=True, bold=True)
        for nodeid, reason in _SKIPPED:
            tr.write_line(f"SKIPPED {nodeid}: {reason}", red=True)
        if in_ci():
            tr.write_line("In CI (CI=true) each of these counts as a failure unless marked may_skip_in_ci.", red=True)


@pytest.fixture(scope="session")
def c8_tutorial():
    """e2cnn's tutorial model takes ~12 s to build (basis construction): build it once."""
    from wsviz.models import create_model

    return create_model("e2cnn_c8_tutorial")


def kill_active_runs(runs_dir: str | Path) -> None:
    """SIGKILL the process of every still-active run in the run store at ``runs_dir`` (test
    cleanup: no training a test started outlives it, whatever the test did)."""
    from wsviz.training.runstore import RunStore

    if not (Path(runs_dir) / "wsviz.db").exists():
        return
    for run in RunStore(runs_dir).list():
        if run.pid and run.active and run.pid != os.getpid():
            try:
                os.kill(run.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------ uploads the tests make
def digit_png(label: int, nth: int = 1) -> tuple[str, bytes]:
    """(file name, PNG bytes) of the ``nth`` mnist5k test image of class ``label``; the app's
    built-in samples are the 0th of each class, so an upload of nth >= 1 is never a sample."""
    import io

    import numpy as np
    from PIL import Image

    from wsviz.data.datasets import load_split

    te = load_split("mnist5k", "test")
    i = int((te.labels == label).nonzero()[nth, 0])
    buf = io.BytesIO()
    Image.fromarray((te.images[i, 0].numpy() * 255).astype(np.uint8)).save(buf, "PNG")
    return f"my-digit-{label}.png", buf.getvalue()


def expected_predictions(checkpoints: Path, variants: list[str], name: str, data: bytes) -> dict[str, tuple[int, float]]:
    """{variant: (predicted class, confidence)} for these uploaded bytes, computed without the app."""
    from wsviz.analysis.sweeps import predict
    from wsviz.data.uploads import load_upload
    from wsviz.models import input_shape
    from wsviz.training.checkpoint import load_checkpoint

    out = {}
    for v in variants:
        model, _ = load_checkpoint(Path(checkpoints) / v)
        c, size, _ = input_shape(model)
        pred, prob = predict(model, load_upload(data, name, c, size).unsqueeze(0))
        out[v] = (int(pred[0]), float(prob[0, int(pred[0])]))
    return out


# ------------------------------------------------------------------------ leak measurements
# What could leak from a repeated analysis, each measured directly: Python-level memory
# (tracemalloc, which also sees numpy's buffers), torch tensors still alive (their count and the
# bytes of their distinct storages), nn.Module instances, and hooks left on modules. RSS is not
# used: the allocator keeps freed pages, so it neither shows a leak reliably nor proves there is none.


def live_tensors() -> tuple[int, int]:
    """(count, bytes of distinct storages) of the torch tensors alive now, after a full collection."""
    count, nbytes, seen = 0, 0, set()
    for obj in _live(torch.Tensor):
        count += 1
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (meta, sparse...)
            continue
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            nbytes += storage.nbytes()
    return count, nbytes


def live_modules() -> int:
    return len(_live(torch.nn.Module))


def _live(kind: type) -> list:
    """Every object of ``kind`` the garbage collector knows, after a full collection."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, kind)]


def hook_count(model: torch.nn.Module | None = None) -> int:
    """Hooks registered globally on nn.Module, plus those on ``model``'s modules."""
    from torch.nn.modules import module as m

    total = sum(len(getattr(m, name)) for name in dir(m) if name.startswith("_global_") and name.endswith("hooks"))
    for mod in model.modules() if model is not None else ():
        total += sum(len(v) for k, v in vars(mod).items() if k.endswith("hooks") and isinstance(v, dict))
    return total


@dataclass
class Growth:
    """What ``calls`` more calls of a function left behind, against one call's working set."""

    calls: int
    python_growth: int  # bytes still allocated (tracemalloc) after the calls, beyond before
    one_call_peak: int  # bytes one call allocated at its peak (its Python working set)
    tensors: tuple[int, int]  # live tensors before, after
    tensor_bytes: tuple[int, int]
    modules: tuple[int, int]
    hooks: tuple[int, int]

    def check(self, tensor_slack_bytes: int = 0) -> None:
        """No per-call growth: together, the calls keep less than one call's Python working set,
        not one more tensor, module or hook, and at most ``tensor_slack_bytes`` more tensor memory."""
        assert self.python_growth < self.one_call_peak, self
        assert self.tensors[1] <= self.tensors[0], self
        assert self.tensor_bytes[1] <= self.tensor_bytes[0] + tensor_slack_bytes, self
        assert self.modules[1] <= self.modules[0], self
        assert self.hooks[1] <= self.hooks[0], self


def measure_growth(fn, *, warmup: int = 2, calls: int = 8, model: torch.nn.Module | None = None) -> Growth:
    """Call ``fn`` ``warmup`` times (caches, lazy imports), then ``calls`` times under measurement."""
    import tracemalloc

    for _ in range(warmup):
        fn()
    tensors0, bytes0 = live_tensors()
    modules0, hooks0 = live_modules(), hook_count(model)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fn()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        one_call_peak = peak - before
        base = current
        for _ in range(calls):
            fn()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        if started:
            tracemalloc.stop()
    tensors1, bytes1 = live_tensors()
    return Growth(calls, after - base, one_call_peak, (tensors0, tensors1), (bytes0, bytes1),
                  (modules0, live_modules()), (hooks0, hook_count(model)))


def open_app(page: str | None = None, variants: list[str] | None = None, url_variants: str | None = None):
    """An AppTest of ``app.py`` after its first run (and, with ``page``, switched to that page),
    with the sidebar's ``variants`` set in session state or carried by the URL (``?variants=``).
    No exception on either run. Set ``WSVIZ_RUNS`` before the pages are first imported."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=300)
    if variants is not None:
        at.session_state["variants"] = variants
    if url_variants is not None:
        at.query_params["variants"] = url_variants
    at.run()
    assert not at.exception, at.exception
    if page:
        at.switch_page(page)
        at.run()
        assert not at.exception, at.exception
    return at


# Browser tests: Debian's chromium driven by Playwright (no browser download).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def damage(db: Path, how: str) -> bytes:
    """Damage a closed SQLite file ``db`` the way disks and copies do: "not a database" (text over it),
    "truncated" (cut mid-page) or, otherwise, every page after the first zeroed (the header still
    says SQLite; quick_check finds the damage). Returns the bytes written."""
    data = db.read_bytes()
    for side in ("-wal", "-shm"):
        assert not Path(f"{db}{side}").exists()  # every connection is closed: the file holds everything
    if how == "not a database":
        bad = b"this is not a database, it is a text file copied over it\n" * 64
    elif how == "truncated":
        bad = data[: len(data) // 2 + 1234]  # cut short mid-page, as a full disk or an interrupted copy leaves it
    else:  # pages zeroed after the first (the header still says SQLite)
        bad = data[:4096] + bytes(len(data) - 4096)
    db.write_bytes(bad)
    return bad


@contextmanager
def read_only(folder: Path):
    """Make ``folder`` (already filled) unwritable for real: a read-only tmpfs as root, chmod otherwise."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield folder
        finally:
            os.chmod(folder, 0o755)
        return
    mnt = folder.parent / f"{folder.name}-ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs to make a folder read-only")
    try:
        shutil.copytree(folder, mnt / folder.name)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)
        yield mnt / folder.name
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        mnt.rmdir()  # so that one test may make the same folder read-only again


def make_checkpoint(tmp_path: Path, name: str, *, src: str = "scale-msws-shared", edit=None, weights: bytes | None = None,
                    card_text: str | bytes | None = None) -> Path:
    """A copy of a shipped checkpoint, with its card edited or replaced and/or its weights replaced."""
    folder = tmp_path / name
    shutil.copytree(Path(__file__).resolve().parents[1] / "checkpoints" / src, folder)
    if edit is not None:
        card = json.loads((folder / "card.json").read_text())
        edit(card)
        (folder / "card.json").write_text(json.dumps(card))
    if card_text is not None:
        target = folder / "card.json"
        target.write_bytes(card_text) if isinstance(card_text, bytes) else target.write_text(card_text)
    if weights is not None:
        (folder / "weights.safetensors").write_bytes(weights)
    return folder


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """The pages' checkpoint folder moved to an empty temporary folder (tests copy checkpoints into it
    with :func:`copy_checkpoint`); the pages' scan cache is cleared before and after."""
    import pages._shared as shared

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    monkeypatch.setattr(shared, "CHECKPOINTS", folder)
    shared.scan_checkpoints.clear()
    yield folder
    shared.scan_checkpoints.clear()


def copy_checkpoint(src: str, dst: Path) -> Path:
    """The shipped checkpoint ``src`` (card and weights) copied to the new folder ``dst``."""
    root = Path(__file__).resolve().parents[1] / "checkpoints" / src
    dst.mkdir(parents=True)
    for f in ("card.json", "weights.safetensors"):
        shutil.copy2(root / f, dst / f)
    return dst


def wait_for(at, pred, what: str, timeout: float = 240) -> None:
    """Rerun the AppTest ``at`` every half second until ``pred(at)`` holds (background work finished),
    failing on a page exception or after ``timeout`` seconds, naming ``what`` was awaited."""
    import time

    t0 = time.time()
    while not pred(at) and time.time() - t0 < timeout:
        time.sleep(0.5)
        at.run()
        assert not at.exception, at.exception
    assert pred(at), f"{what} did not happen in time"


def needs(*names: str) -> list[str]:
    """``names`` as a list, or skip the test when one of them is not a shipped checkpoint (a checkout
    without the zoo's weights)."""
    shipped = Path(__file__).resolve().parents[1] / "checkpoints"
    missing = [n for n in names if not (shipped / n / "card.json").is_file()]
    if missing:
        pytest.skip(f"needs shipped checkpoints {missing}")
    return list(names)
