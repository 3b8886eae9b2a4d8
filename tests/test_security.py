"""Security: hostile checkpoints, run names and paths, the server's settings, upload leftovers.

Each hostile input is real: the pickles carry a payload that writes a marker file when
unpickled (a control step proves it does), truncated files are cut from a shipped checkpoint,
mismatched weights are a shipped model's under an edited card. The app is driven headless
(streamlit.testing AppTest) in a fresh process, so pages/_shared.py reads WSVIZ_CHECKPOINTS
and WSVIZ_RUNS as a restarted app does, whatever else ran in this pytest process.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import kill_active_runs, make_checkpoint
from safetensors.torch import load_file, save_file
from test_uploads import upload_corpus

from wsviz import WsvizError
from wsviz.data.uploads import MAX_UPLOAD_BYTES
from wsviz.training.cards import read_card
from wsviz.training.checkpoint import load_checkpoint
from wsviz.training.runstore import RunStore, safe_run_name

ROOT = Path(__file__).resolve().parents[1]
CK = ROOT / "checkpoints"
GOOD = "scale-msws-shared"  # msws_resnet_digits, base_width 16
OTHER = "rot-cnn"  # another architecture
STEERABLE = "rot-steerable-c4"  # e2cnn: cannot be built on the meta device


# ------------------------------------------------------------------------------- payloads
class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('pwned')",)


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"weight": Payload(marker)})


def torch_save_payload(marker: Path, zip_format: bool = True) -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "extra": Payload(marker)}, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


PAYLOADS = {
    "pickle.dumps": pickle_payload,
    "torch.save (zip)": torch_save_payload,
    "torch.save (legacy)": lambda m: torch_save_payload(m, zip_format=False),
}


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_the_payloads_run_code_when_unpickled(tmp_path, kind):
    """Control: each payload really runs its code when loaded the unsafe way."""
    marker = tmp_path / "control-marker"
    data = PAYLOADS[kind](marker)
    if kind == "pickle.dumps":
        pickle.loads(data)
    else:
        torch.load(io.BytesIO(data), weights_only=False)
    assert marker.read_text() == "pwned"


def refused(folder: Path) -> str:
    with pytest.raises(WsvizError) as info:
        load_checkpoint(folder)
    return str(info.value)


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_a_pickle_saved_as_the_weights_is_refused_and_never_run(tmp_path, kind):
    marker = tmp_path / "marker"
    folder = make_checkpoint(tmp_path, "ck", weights=PAYLOADS[kind](marker))
    msg = refused(folder)
    assert "weights.safetensors" in msg and "not a safetensors file" in msg, msg
    assert ("ZIP archive" if kind == "torch.save (zip)" else "Python pickle") in msg, msg
    assert "never unpickles" in msg and "re-create the checkpoint" in msg, msg
    assert read_card(folder)["model"] == "msws_resnet_digits"  # only the weights are at fault
    assert not marker.exists()


def test_pickle_files_next_to_a_checkpoint_are_ignored(tmp_path):
    marker = tmp_path / "marker"
    folder = make_checkpoint(tmp_path, "ck")
    for name in ("model.pt", "weights.pth", "pytorch_model.bin", "optimizer.pkl"):
        (folder / name).write_bytes(torch_save_payload(marker) if name != "optimizer.pkl" else pickle_payload(marker))
    model, card = load_checkpoint(folder)
    reference, _ = load_checkpoint(CK / GOOD)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))  # the shipped weights, untouched by the extra files
    assert not marker.exists()


def _safetensors_bytes() -> bytes:
    return (CK / GOOD / "weights.safetensors").read_bytes()


TRUNCATIONS = {
    "half": (lambda b: b[: len(b) // 2], "is truncated: its header describes"),
    "one byte short": (lambda b: b[:-1], "is truncated: its header describes"),
    "header cut": (lambda b: b[:100], "announce a"),
    "ten bytes": (lambda b: b[:10], "announce a"),
    "three bytes": (lambda b: b[:3], "is only 3 bytes: it is truncated"),
    "zero bytes": (lambda b: b"", "is only 0 bytes: it is truncated"),
    "bytes appended": (lambda b: b + b"\0" * 64, "64 bytes after its last tensor"),
    "garbage header": (lambda b: (20).to_bytes(8, "little") + b"not json at all, no!" + b[8:], "damaged header"),
}


@pytest.mark.parametrize("case", list(TRUNCATIONS))
def test_truncated_or_damaged_weights_are_refused(tmp_path, case):
    cut, phrase = TRUNCATIONS[case]
    folder = make_checkpoint(tmp_path, "ck", weights=cut(_safetensors_bytes()))
    msg = refused(folder)
    assert phrase in msg and str(folder / "weights.safetensors") in msg, msg
    assert "Copy it again" in msg and "re-create" in msg, msg  # both remedies are offered


def test_a_safetensors_file_whose_header_length_looks_like_a_pickle_is_accepted(tmp_path):
    """A 640-byte header makes the file start 80 02, the opening bytes of a protocol-2 pickle."""
    from wsviz.training.cards import check_weights

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode().ljust(0x280)
    (tmp_path / "weights.safetensors").write_bytes((0x280).to_bytes(8, "little") + header + b"\0" * 8)
    assert (tmp_path / "weights.safetensors").read_bytes()[:2] == b"\x80\x02"
    assert load_file(str(tmp_path / "weights.safetensors"))["w"].tolist() == [0.0, 0.0]  # a valid file
    check_weights(tmp_path)


def _subset_of_weights(tmp_path: Path) -> bytes:
    state = load_file(str(CK / GOOD / "weights.safetensors"))
    state.pop("head.fc.weight")
    save_file(state, str(tmp_path / "subset.safetensors"))
    return (tmp_path / "subset.safetensors").read_bytes()


MISMATCHES = {
    "narrower card": (dict(edit=lambda c: c["config"].update(base_width=8)),
                      "wrong shape [('head.fc.weight', (10, 64), (10, 32))"),
    "fewer classes": (dict(edit=lambda c: c["config"].update(num_classes=5)), "wrong shape [('head.fc.bias', (10,), (5,))"),
    "deeper card": (dict(edit=lambda c: c["config"].update(depth=20)), "missing ['trunk.stages.0.2"),
    "another model's weights": (dict(weights=OTHER), "unexpected ["),
    "a tensor removed": (dict(weights="subset"), "missing ['head.fc.weight']"),
    "e2cnn, wider card": (dict(src=STEERABLE, edit=lambda c: c["config"].update(width=0.5)), "wrong shape"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_weights_that_do_not_fit_their_card_are_refused(tmp_path, case):
    kw, phrase = MISMATCHES[case]
    if kw.get("weights") == OTHER:
        kw = dict(weights=(CK / OTHER / "weights.safetensors").read_bytes())
    elif kw.get("weights") == "subset":
        kw = dict(weights=_subset_of_weights(tmp_path))
    folder = make_checkpoint(tmp_path, "ck", **kw)
    msg = refused(folder)
    assert "do not fit the model its card describes" in msg and phrase in msg, msg
    assert "re-create the checkpoint" in msg, msg


def test_a_card_describing_a_huge_model_is_refused_without_building_it(tmp_path, monkeypatch):
    """Without the meta-device check the loader would build a 10^12-parameter model (about 4 TB)."""
    import wsviz.models
    from wsviz.models import create_model

    with torch.device("meta"):
        huge = create_model("msws_resnet_digits", base_width=100_000)
    assert sum(p.numel() for p in huge.parameters()) > 10**12  # the control: what a real build would allocate
    folder = make_checkpoint(tmp_path, "ck", edit=lambda c: c["config"].update(base_width=100_000))
    built_on = []  # the device each model build allocates on

    def recording_create_model(*args, **kwargs):
        built_on.append(torch.empty(()).device.type)
        return create_model(*args, **kwargs)

    monkeypatch.setattr(wsviz.models, "create_model", recording_create_model)
    msg = refused(folder)
    assert built_on == ["meta"]  # refused after the shape check on the meta device, never built for real
    assert "do not fit the model its card describes" in msg and "(10, 64), (10, 400000)" in msg, msg
    folder = make_checkpoint(tmp_path, "ck2", edit=lambda c: c["config"].update(base_width=10**9))
    assert "cannot be built" in refused(folder)  # sizes that overflow even on the meta device


def test_every_model_but_e2cnn_builds_on_the_meta_device():
    """The loader checks weights against a meta-device build first: it must work for every model."""
    from wsviz.models import create_model, get_spec, list_models
    from wsviz.training.checkpoint import _NO_META_FAMILIES, _NoRandomFill

    specs = [s for s in map(get_spec, list_models()) if s.family not in _NO_META_FAMILIES]
    assert len(specs) > 20
    for spec in specs:
        with torch.device("meta"), _NoRandomFill():
            model = create_model(spec.name)
        assert all(t.is_meta for t in model.state_dict().values()), spec.name


def _card_bytes(text: str | bytes):
    return dict(card_text=text)


BAD_CARDS = {
    "unknown model": (dict(edit=lambda c: c.update(model="no_such_net")), "Unknown model 'no_such_net'"),
    "not JSON": (_card_bytes('{"model": "msws_resnet_digits", '), "is not valid JSON"),
    "not UTF-8": (_card_bytes(b"\xff\xfe{}"), "is not valid JSON"),
    "JSON list": (_card_bytes("[1, 2, 3]"), "holds a JSON array, not an object"),
    "JSON string": (_card_bytes('"msws_resnet_digits"'), "holds a JSON string, not an object"),
    "JSON null": (_card_bytes("null"), "holds a JSON null, not an object"),
    "model not a string": (dict(edit=lambda c: c.update(model=42)), "does not name a model"),
    "config a list": (dict(edit=lambda c: c.update(config=[16])), '"config" that is a JSON array, not an object'),
    "unknown option": (dict(edit=lambda c: c["config"].update(bogus=1)), "has no option 'bogus'"),
    "option of a wrong type": (dict(edit=lambda c: c["config"].update(base_width="sixteen")),
                               "base_width='sixteen', but it must be an integer"),
    "float for an integer": (dict(edit=lambda c: c["config"].update(depth=14.0)), "depth=14.0, but it must be an integer"),
    "bool for an integer": (dict(edit=lambda c: c["config"].update(depth=True)), "depth=True, but it must be an integer"),
    "negative data size": (dict(edit=lambda c: c["config"].update(num_classes=-3)), "must be a positive integer, got -3"),
    "list for an integer": (dict(edit=lambda c: c["config"].update(depth=[14])), "depth=[14], but it must be an integer"),
    "choice not offered": (dict(edit=lambda c: c["config"].update(sharing="half")), "sharing='half' is not valid"),
    "NaN for a float": (dict(src=OTHER, edit=lambda c: c["config"].update(width=float("nan"))),
                        "width=nan, but it must be a finite number"),
    "accuracy a string": (dict(edit=lambda c: c.update(test_accuracy="high")),
                          "test_accuracy='high', but it must be a number or null"),
    "params null": (dict(edit=lambda c: c.update(unique_params=None)), "unique_params=None, but it must be a number"),
    "dataset a dict": (dict(edit=lambda c: c.update(dataset={"x": 1})), "dataset={'x': 1}, but it must be a string"),
}
CARD_LEVEL = {"not JSON", "not UTF-8", "JSON list", "JSON string", "JSON null", "model not a string", "config a list",
              "accuracy a string", "params null", "dataset a dict"}  # read_card itself refuses these


@pytest.mark.parametrize("case", list(BAD_CARDS))
def test_bad_cards_are_refused_with_the_reason(tmp_path, case):
    kw, phrase = BAD_CARDS[case]
    if case == "NaN for a float":
        assert "width" in json.loads((CK / OTHER / "card.json").read_text())["config"]
    folder = make_checkpoint(tmp_path, "ck", **kw)
    msg = refused(folder)
    assert phrase in msg, msg
    assert str(folder / "card.json") in msg and "re-create the checkpoint" in msg.lower(), msg
    if case in CARD_LEVEL:
        with pytest.raises(WsvizError, match=re.escape(phrase)):
            read_card(folder)
    else:
        read_card(folder)  # readable: the app lists it, and says why when it is chosen


def test_a_missing_card_or_weights_file_is_refused(tmp_path):
    folder = make_checkpoint(tmp_path, "ck")
    (folder / "weights.safetensors").unlink()
    assert "weights.safetensors is missing" in refused(folder)
    folder = make_checkpoint(tmp_path, "ck2")
    (folder / "card.json").unlink()
    assert "No model card" in refused(folder)


# ------------------------------------------------------------------------------- run names
HOSTILE_NAMES = ["../x", "..", ".", "/etc/passwd", "a/b", "a\\b", ".hidden", "x\x00y", "a" * 65, "a" * 5000,
                 "a\nb", "\nab", "ab\r", "..／x", "․․/x", "~root", "-rf", "a b", "x..y", "\u202eevil", "name\t"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[ascii(n)[:30] for n in HOSTILE_NAMES])
def test_hostile_run_names_are_refused_and_create_nothing(tmp_path, name):
    root = tmp_path / "runs"
    store = RunStore(root)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(WsvizError, match="is not allowed"):
        safe_run_name(name)
    with pytest.raises(WsvizError, match="is not allowed"):
        store.create("resnet_digits", "mnist5k", {}, name)
    assert store.list() == []
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.name.startswith("wsviz.db"))
    assert after == [p for p in before if not p.name.startswith("wsviz.db")]


def test_a_run_name_with_a_trailing_newline_is_refused():
    with pytest.raises(WsvizError):
        safe_run_name("ab\n")


def test_good_run_names_are_kept(tmp_path):
    store = RunStore(tmp_path / "runs")
    for name in ("a", "run-1", "my_run.v2", "A" * 64):
        assert safe_run_name(name) == name
    run = store.create("resnet_digits", "mnist5k", {}, "my_run.v2")
    assert run.name == "my_run.v2" and Path(run.out_dir).parent == store.root


HOSTILE_IDS = ["../x", "..", ".", "", "/etc", "/tmp", "a/../../x", "a/b", "./../x", "~", "~root", "a\\b",
               "..／x", "x" * 300, "link-out", "link-up", "link-inside/../.."]


@pytest.mark.parametrize("run_id", HOSTILE_IDS, ids=[ascii(n)[:30] for n in HOSTILE_IDS])
def test_run_dir_never_leaves_the_runs_folder(tmp_path, run_id):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = RunStore(tmp_path / "runs")
    (store.root / "link-out").symlink_to(outside)  # a symlink inside the runs folder pointing outside
    (store.root / "link-up").symlink_to("..")
    (store.root / "link-inside").mkdir()
    before = sorted(tmp_path.rglob("*"))
    try:
        path = store.run_dir(run_id)
    except WsvizError as exc:
        assert "would leave the runs folder" in str(exc)
    else:  # names that are plain (if odd) file names stay inside
        assert path.parent == store.root and path.resolve().parent == store.root, path
        assert run_id not in ("link-out", "link-up", "..", "/etc")
    assert sorted(tmp_path.rglob("*")) == before
    assert list(outside.iterdir()) == []


def test_run_dir_with_a_nul_byte_is_a_wsviz_error(tmp_path):
    with pytest.raises(WsvizError):
        RunStore(tmp_path / "runs").run_dir("x\x00y")


# ------------------------------------------------------------------------------- server config
CONFIG = ROOT / ".streamlit" / "config.toml"
WANTED = {"server.address": "localhost", "server.enableXsrfProtection": True, "server.maxUploadSize": 20,
          "browser.gatherUsageStats": False}


def streamlit_options(cwd: Path, home: Path) -> dict:
    """The options Streamlit itself resolves when started from ``cwd`` (no user config, no env overrides)."""
    code = ("import json, streamlit.config as c; c.get_config_options(force_reparse=True); "
            f"print(json.dumps({{k: c.get_option(k) for k in {list(WANTED)!r}}}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env["HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_server_settings_in_the_file_and_as_streamlit_resolves_them(tmp_path):
    raw = tomllib.loads(CONFIG.read_text())
    from_file = {f"{s}.{k}": raw[s][k] for s, k in (key.split(".") for key in WANTED)}
    assert from_file == WANTED
    assert streamlit_options(ROOT, tmp_path) == WANTED
    # Control: started elsewhere, Streamlit falls back to its defaults, which differ.
    elsewhere = streamlit_options(tmp_path, tmp_path)
    assert elsewhere["server.maxUploadSize"] != 20 and elsewhere["browser.gatherUsageStats"] is not False
    assert elsewhere["server.address"] != "localhost"


def test_upload_byte_limit_matches_the_server_limit():
    """Streamlit refuses uploads over maxUploadSize * 1024 * 1024 bytes (starlette_routes.py); the decoder's
    own limit must be the same, so a file the server accepts is never refused for its size afterwards."""
    mb = tomllib.loads(CONFIG.read_text())["server"]["maxUploadSize"]
    assert MAX_UPLOAD_BYTES == mb * 1024 * 1024


# ------------------------------------------------------------------------------- the app
BAD_APP_CHECKPOINTS = {
    # folder: (how to make it, where it is reported, phrase of the reason)
    "payload-weights": ("pickle", "sidebar", "is a Python pickle"),
    "torchsave-weights": ("torch.save", "sidebar", "is a ZIP archive"),
    "truncated-half": ("half", "sidebar", "is truncated"),
    "truncated-10-bytes": ("ten", "sidebar", "announce a"),
    "empty-weights": ("zero", "sidebar", "is only 0 bytes"),
    "card-not-json": ("notjson", "sidebar", "is not valid JSON"),
    "card-bad-accuracy": ("accuracy", "sidebar", "test_accuracy='high'"),
    "no-card": ("nocard", "sidebar", "No model card"),
    "shape-mismatch": ("narrow", "page", "do not fit the model its card describes"),
    "unknown-model": ("unknown", "page", "Unknown model 'no_such_net'"),
}


def build_app_checkpoints(root: Path, marker: Path) -> None:
    full = _safetensors_bytes()
    shutil.copytree(CK / GOOD, root / GOOD)
    shutil.copytree(CK / OTHER, root / OTHER)
    for name in ("model.pt", "weights.pth", "pytorch_model.bin"):  # ignored: only safetensors are loaded
        (root / GOOD / name).write_bytes(torch_save_payload(marker))
    makers = {
        "pickle": dict(weights=pickle_payload(marker)), "torch.save": dict(weights=torch_save_payload(marker)),
        "half": dict(weights=full[: len(full) // 2]), "ten": dict(weights=full[:10]), "zero": dict(weights=b""),
        "notjson": dict(card_text="{oops"), "accuracy": dict(edit=lambda c: c.update(test_accuracy="high")),
        "nocard": {}, "narrow": dict(edit=lambda c: c["config"].update(base_width=8)),
        "unknown": dict(edit=lambda c: c.update(model="no_such_net")),
    }
    for folder, (how, _, _) in BAD_APP_CHECKPOINTS.items():
        make_checkpoint(root, folder, **makers[how])
        if how == "nocard":
            (root / folder / "card.json").unlink()


DRIVER = textwrap.dedent("""
    import json, os, sys, tempfile
    from pathlib import Path

    cfg = json.loads(sys.argv[1])
    ROOT = Path(cfg["root"])
    sys.path.insert(0, str(ROOT / "tests"))
    from streamlit.testing.v1 import AppTest

    out = {"tempdir": tempfile.gettempdir()}

    def app():
        return AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)

    def sidebar(at):
        exp = list(at.sidebar.expander)
        return {"labels": [e.label for e in exp], "items": [m.value for e in exp for m in e.markdown],
                "options": list(at.multiselect(key="variants").options)}

    # 1. The first page: every bad checkpoint found is listed in the sidebar with its reason.
    at = app()
    at.run()
    out["first"] = {"exception": [e.value for e in at.exception], **sidebar(at),
                    "variants": list(at.session_state["variants"])}

    # 2. Variants whose weights do not fit / whose model is unknown: an error on the page, which goes on.
    # (AppTest runs app.py, with the sidebar, only on a session's first run; later runs run the page.)
    at.session_state["variants"] = [cfg["good"], "shape-mismatch", "unknown-model"]
    at.switch_page("pages/kernels.py")
    at.run()
    out["kernels"] = {"exception": [e.value for e in at.exception], "errors": [e.value for e in at.error],
                      "charts": len(at.get("plotly_chart")), "titles": [t.value for t in at.title]}
    at.session_state["variants"] = [cfg["good"], "shape-mismatch", "unknown-model"]  # (no sidebar to keep it)
    at.slider[0].set_value(32).run()  # the page goes on working
    out["kernels"]["slider_exception"] = [e.value for e in at.exception]
    out["kernels"]["slider_charts"] = len(at.get("plotly_chart"))
    # A new session: the two are now listed as refused, with the reason, and no longer offered.
    at = app()
    at.session_state["variants"] = [cfg["good"], "shape-mismatch", "unknown-model"]
    at.run()
    out["kernels_rerun"] = {"exception": [e.value for e in at.exception], **sidebar(at),
                            "variants": list(at.session_state["variants"]), "errors": [e.value for e in at.error]}

    # 3. A link's ?variants= picks known variants only.
    at = app()
    at.query_params["variants"] = cfg["query"]
    at.run()
    out["query"] = {"exception": [e.value for e in at.exception], "variants": list(at.session_state["variants"])}

    # 4. The Train page: hostile run names are refused before anything is created.
    at = app()
    at.run()
    at.switch_page("pages/train.py")
    at.run()
    train = []
    for name in cfg["names"]:
        at.text_input[0].set_value(name)
        at.button[0].click().run()
        train.append({"name": name, "errors": [e.value for e in at.error], "success": [s.value for s in at.success],
                      "exception": [e.value for e in at.exception]})
    out["train"] = train
    from wsviz.training.runstore import RunStore
    store = RunStore(cfg["runs"])
    out["runs"] = [r.name for r in store.list()]
    for r in store.list():  # never expected; stop anything launched all the same
        if r.pid:
            try:
                os.kill(r.pid, 9)
            except ProcessLookupError:
                pass

    # 5. Uploads leave no temporary file: the whole upload corpus through the Compare page
    # (AppTest hands files to st.file_uploader in memory, as the server does once received),
    # then through wsviz.data.uploads.load_upload, which the page calls via prepared().
    import test_uploads as tu
    from wsviz import WsvizError
    from wsviz.data.uploads import load_upload

    files = tu.upload_corpus()

    def listing():
        return sorted(str(p) for p in Path(tempfile.gettempdir()).rglob("*"))

    at = app()
    at.run()
    at.session_state["variants"] = [cfg["good"]]
    at.switch_page("pages/compare.py")
    at.run()  # warm-up: a shipped sample, so whatever the stack creates once is there before the snapshot
    before = listing()
    at.session_state["variants"] = [cfg["good"]]
    at.file_uploader[0].set_value([(n, d, "application/octet-stream") for n, d in files])
    at.run()
    page = {"exception": [e.value for e in at.exception], "errors": [e.value for e in at.error],
            "metrics": len(at.metric), "subheaders": [s.value for s in at.subheader]}
    after_page = listing()
    direct = {}
    for name, data in files:
        try:
            load_upload(data, name, 1, 28)
            direct[name] = "ok"
        except WsvizError as exc:
            direct[name] = str(exc)
    after_direct = listing()
    # Control: a temporary file made now is seen by this very listing.
    with tempfile.NamedTemporaryFile(prefix="control-", delete=False) as fh:
        control = fh.name
    seen = control in listing()
    os.unlink(control)
    out["uploads"] = {"n": len(files), "page": page, "direct": direct, "new_after_page": sorted(set(after_page) - set(before)),
                      "new_after_direct": sorted(set(after_direct) - set(after_page)), "control_seen": seen}
    print("RESULT " + json.dumps(out))
""")

QUERY = "../../etc,../rot-cnn,rot-cnn/../scale-msws-shared,rot-cnn,/etc/passwd,payload-weights,no-card,%2e%2e,~"
TRAIN_NAMES = ["../escape", "/tmp/wsviz-abs-escape", "..", "a/b", "a\\b", ".hidden", "..／x", "~root", "x" * 65]
REPO_CACHES = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}


def repo_files() -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in REPO_CACHES]
        out |= {os.path.join(dirpath, f) for f in filenames if not f.endswith((".py", ".md", ".pyc"))}
    return out


@pytest.fixture(scope="module")
def app_run(tmp_path_factory):
    """Drive the app once in a fresh process over a checkpoint folder holding good and bad checkpoints."""
    base = tmp_path_factory.mktemp("app")
    checkpoints, runs, tmpdir, home = base / "checkpoints", base / "runs", base / "tmp", base / "home"
    for d in (checkpoints, tmpdir, home):
        d.mkdir()
    marker = base / "PAYLOAD-RAN"
    build_app_checkpoints(checkpoints, marker)
    cfg = {"root": str(ROOT), "good": GOOD, "query": QUERY, "names": TRAIN_NAMES, "runs": str(runs)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(WSVIZ_CHECKPOINTS=str(checkpoints), WSVIZ_RUNS=str(runs), TMPDIR=str(tmpdir), HOME=str(home),
               PYTHONPATH=str(ROOT))
    repo_before = repo_files()
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    repo_after = repo_files()
    kill_active_runs(runs)  # belt and braces: nothing launched outlives the test
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result.update(marker_exists=marker.exists(), tmpdir=str(tmpdir), base=str(base), runs_dir=str(runs),
                  new_repo_files=sorted(repo_after - repo_before))
    return result


def unescape(markdown: str) -> str:
    """What st.markdown shows for text escaped by pages._shared.plain."""
    return re.sub(r"\\(.)", r"\1", markdown)


def test_app_lists_every_checkpoint_it_cannot_use_with_the_reason(app_run):
    first = app_run["first"]
    assert first["exception"] == []  # a card with a string accuracy used to crash the Models page
    assert set(first["options"]) == {GOOD, OTHER, "shape-mismatch", "unknown-model"}
    items = [unescape(i) for i in first["items"]]
    for folder, (_, where, phrase) in BAD_APP_CHECKPOINTS.items():
        if where == "sidebar":
            line = next((i for i in items if i.startswith(f"**{folder}**: ")), None)
            assert line is not None and phrase in line, (folder, items)
    assert first["labels"] == [f"{len(items)} checkpoint(s) cannot be used"]
    assert first["variants"] == [GOOD]
    assert not app_run["marker_exists"]


def test_app_reports_a_variant_that_cannot_be_loaded_and_keeps_working(app_run):
    kernels = app_run["kernels"]
    assert kernels["exception"] == [] and kernels["titles"] == ["Kernels"]
    errors = [unescape(e) for e in kernels["errors"]]
    for folder in ("shape-mismatch", "unknown-model"):
        phrase = BAD_APP_CHECKPOINTS[folder][2]
        assert any(e.startswith(f"Variant {folder} cannot be used: ") and phrase in e for e in errors), errors
    assert kernels["charts"] >= 1  # the good variant's kernels are drawn all the same
    assert kernels["slider_exception"] == [] and kernels["slider_charts"] >= 1

    rerun = app_run["kernels_rerun"]
    assert rerun["exception"] == [] and rerun["errors"] == []
    assert rerun["variants"] == [GOOD] and set(rerun["options"]) == {GOOD, OTHER}
    items = [unescape(i) for i in rerun["items"]]
    for folder in ("shape-mismatch", "unknown-model"):
        assert any(i.startswith(f"**{folder}**: ") and BAD_APP_CHECKPOINTS[folder][2] in i for i in items), items
    assert not app_run["marker_exists"]


def test_variants_link_selects_known_variants_only(app_run):
    """app.py keeps only listed variants from ?variants= (and Streamlit's multiselect drops values outside its
    options too): path-like names, refused checkpoints and junk are never selected, and the link is read."""
    assert app_run["query"]["exception"] == []
    assert app_run["query"]["variants"] == [OTHER]  # not the default ([GOOD]): the link was read


def test_train_page_refuses_hostile_run_names_and_creates_nothing(app_run):
    for attempt in app_run["train"]:
        assert attempt["exception"] == [] and attempt["success"] == [], attempt
        assert any("is not allowed" in e for e in attempt["errors"]), attempt
    assert app_run["runs"] == []
    runs = Path(app_run["runs_dir"])
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(("wsviz.db", ".wsviz.db"))) == []
    base = Path(app_run["base"])
    assert sorted(p.name for p in base.iterdir()) == ["checkpoints", "home", "runs", "tmp"]
    assert not Path("/tmp/wsviz-abs-escape").exists()


def test_uploads_leave_no_temporary_files(app_run):
    up = app_run["uploads"]
    assert app_run["tempdir"] == app_run["tmpdir"]  # the app process used the temp folder watched here
    assert up["control_seen"]  # and a temporary file made there would have been seen
    assert up["n"] == len(upload_corpus())
    page = up["page"]
    assert page["exception"] == []
    refused_names = [n for n, r in up["direct"].items() if r != "ok"]
    assert len(refused_names) >= 10 and len(refused_names) < up["n"]
    # The page stops at the first image it cannot prepare for a variant, per image: each refused one is named.
    assert len(page["errors"]) == len(refused_names)
    assert all(any(f"'{n}'" in e for e in page["errors"]) for n in refused_names)
    assert up["new_after_page"] == [] and up["new_after_direct"] == []
    assert app_run["new_repo_files"] == []
