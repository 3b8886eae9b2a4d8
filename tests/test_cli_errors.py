"""Every command-line entry answers a user's mistake with one line on stderr and the conventional exit status
(2 usage or refused input, 1 failure at run time, 130 SIGINT, 143 SIGTERM), never a traceback unless asked."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import wsviz.catalog
import wsviz.cli
import wsviz.train
import wsviz.zoo
from wsviz.cli_errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
CK = ROOT / "checkpoints" / "scale-msws-vanilla"
TRAIN = ["--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "1", "--out", "{tmp}/ck", "--max-batches",
         "1", "--batch-size", "16", "--set", "base_width=8", "--set", "depth=8", "--device", "cpu"]
ENTRIES = {"wsviz": wsviz.cli.main, "wsviz.train": wsviz.train.main, "wsviz.zoo": wsviz.zoo.main,
           "wsviz.catalog": wsviz.catalog.main}


def _with(argv: list[str], **changes: str) -> list[str]:
    out = list(argv)
    for flag, value in changes.items():
        out[out.index("--" + flag.replace("_", "-")) + 1] = value
    return out


# (entry, arguments, exit status, words the one line must contain)
BAD = [
    ("wsviz", [], 2, "required: command"),
    ("wsviz", ["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ("wsviz", ["models", "--family", "nope"], 2, "No family 'nope': use one of"),
    ("wsviz", ["models", "--name", "nope"], 2, "'nope'"),
    ("wsviz", ["kernels", "--out", "{tmp}/o"], 2, "--checkpoint"),
    ("wsviz", ["kernels", "--checkpoint", "{tmp}/missing", "--out", "{tmp}/o"], 2, "missing"),
    ("wsviz", ["kernels", "--checkpoint", "{ck}", "--out", "{tmp}/o", "--k", "many"], 2, "--k: invalid int value"),
    ("wsviz", ["kernels", "--checkpoint", "{ck}", "--out", "{file}/o"], 1, "Not a directory: {file}/o"),
    ("wsviz", ["attribution", "--checkpoint", "{ck}", "--image", "{tmp}/missing.png", "--out", "{tmp}/o"], 1,
     "No such file or directory: {tmp}/missing.png"),
    ("wsviz", ["attribution", "--checkpoint", "{ck}", "--image", "{file}", "--out", "{tmp}/o"], 2, "notes.png"),
    ("wsviz", ["attribution", "--checkpoint", "{ck}", "--method", "magic", "--out", "{tmp}/o"], 2, "invalid choice"),
    ("wsviz", ["scale", "--checkpoint", "{ck}", "--dataset", "nope", "--out", "{tmp}/o"], 2, "nope"),
    ("wsviz", ["cka", "--checkpoint", "{ck}", "--out", "{tmp}/o"], 2, "exactly two"),
    ("wsviz", ["runs", "rebuild", "--runs-dir", "{file}/runs"], 1, "cannot be created"),
    ("wsviz", ["runs", "delete"], 2, "invalid choice: 'delete'"),
    ("wsviz.train", [], 2, "Give --model, --dataset, --epochs, --out"),
    ("wsviz.train", _with(TRAIN, model="nope"), 2, "Unknown model 'nope'"),
    ("wsviz.train", _with(TRAIN, dataset="nope"), 2, "nope"),
    ("wsviz.train", _with(TRAIN, epochs="0"), 2, "epochs"),
    ("wsviz.train", _with(TRAIN, epochs="x"), 2, "--epochs: invalid int value: 'x'"),
    ("wsviz.train", [*TRAIN, "--set", "oops"], 2, "--set takes key=value"),
    ("wsviz.train", [*TRAIN, "--set", "no_such_option=1"], 2, "no_such_option"),
    ("wsviz.train", [*TRAIN, "--optimizer", "magic"], 2, "invalid choice: 'magic'"),
    ("wsviz.train", _with(TRAIN, out="{file}/ck"), 1, "Not a directory"),
    ("wsviz.zoo", [], 2, "required: cmd"),
    ("wsviz.zoo", ["retrain", "--only", "nope"], 2, "No zoo entry 'nope'"),
    ("wsviz.zoo", ["retrain", "--epochs", "x"], 2, "invalid int value"),
    ("wsviz.zoo", ["table", "--out", "{file}"], 1, "Not a directory"),
    ("wsviz.catalog", ["--bogus"], 2, "unrecognized arguments: --bogus"),
]


def fill(items: list[str], tmp: Path) -> list[str]:
    file = tmp / "notes.png"  # a text file: in the way of a folder, and not an image
    file.write_text("these are notes, not an image\n")
    return [a.format(tmp=tmp, file=file, ck=CK) for a in items]


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.skipif(not (CK / "card.json").is_file(), reason="needs the shipped checkpoints")
@pytest.mark.parametrize("entry, argv, code, words", BAD, ids=[f"{e} {' '.join(a)[:60]}" for e, a, _, _ in BAD])
def test_bad_invocation(entry, argv, code, words, tmp_path, capsys):
    args = fill(argv, tmp_path)
    assert run_cli(ENTRIES[entry], args) == code
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and fill([words], tmp_path)[0] in line, line


def test_debug_flag_and_variable_show_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["attribution", "--checkpoint", str(CK), "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path)]
    assert run_cli(wsviz.cli.main, [*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileNotFoundError" in err and err.strip().splitlines()[-1].startswith("error: ")
    monkeypatch.setenv("WSVIZ_DEBUG", "1")
    assert run_cli(wsviz.cli.main, argv) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("WSVIZ_DEBUG", "0")
    assert run_cli(wsviz.cli.main, argv) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_unexpected_errors_are_one_line_with_the_way_to_the_traceback(capsys):
    def broken(argv):
        raise RuntimeError("something inside\nwent wrong")

    assert run_cli(broken, []) == 1
    assert one_line(capsys.readouterr().err) == ("error: RuntimeError: something inside went wrong "
                                                  "(run again with --debug for the traceback)")


@pytest.mark.parametrize("module, argv, code", [
    ("wsviz", ["models", "--family", "nope"], 2),
    ("wsviz.train", _with(TRAIN, model="nope"), 2),
    ("wsviz.zoo", ["retrain", "--only", "nope"], 2),
    ("wsviz.catalog", ["--bogus"], 2),
])
def test_each_python_m_entry_uses_the_convention(module, argv, code, tmp_path):
    out = subprocess.run([sys.executable, "-m", module, *fill(argv, tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == code, out.stderr
    assert one_line(out.stderr).startswith("error: ")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupted_and_terminated(sig, code, word, tmp_path):
    # Ctrl-C's default action restored in the child, as a terminal gives it: a shell's background job (`cmd &`,
    # nohup) inherits SIGINT *ignored*, and Python then rightly leaves it ignored (the run hung to the timeout)
    proc = subprocess.Popen([sys.executable, "-m", "wsviz.zoo", "retrain", "--only", "scale-resnet20", "--epochs", "50",
                             "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # past the imports, about to train (seed 0 of the three a claimed variant gets)
        assert proc.stdout.readline().startswith("[1/3] scale-resnet20 seed 0")
        time.sleep(1.0)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The shell reports 128 + N either way: an exit with 130/143, or death by the signal itself (seen once
    # in a CI run, after the one-line message had been printed: the interpreter died of the SIGINT while
    # shutting down; the cause was not pinned down).
    assert proc.returncode in (code, -sig), err
    assert one_line(err) == word


