"""wsviz installs as a package and works from any folder, with nothing downloaded.

The wheel is built from a copy of the source (so the build leaves nothing in the checkout)
with ``pip wheel --no-deps --no-build-isolation --no-index`` and installed, again without the
index, into a fresh virtual environment that sees the globally installed dependencies
(``--system-site-packages``). Everything then runs from a temporary folder, with no
``PYTHONPATH``: the ``wsviz`` command, ``python -m wsviz scale``, and a background training
job, which must find the installed package by itself.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import wsviz

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "scale-msws-vanilla"


def _run(args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package must be enough
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**base, **env})


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv python, a folder outside the checkout)."""
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    shutil.copy2(ROOT / "pyproject.toml", src)
    shutil.copy2(ROOT / "README.md", src)
    shutil.copy2(ROOT / "app.py", src)
    for d in ("wsviz", "pages", "tests", "benchmarks"):  # the latter three must stay out of the wheel
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    dist = base / "dist"
    p = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
              "-w", str(dist), str(src)], cwd=base)
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = dist.glob("wsviz-*.whl")
    env_dir = base / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    p = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=base)
    assert p.returncode == 0, p.stdout + p.stderr
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return wheel, python, elsewhere


def test_the_wheel_holds_the_library_its_data_and_its_command(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"wsviz", "wsviz-0.1.0.dist-info"}  # no pages/, tests/, benchmarks/, app.py
    assert "wsviz/catalog.json" in names and "wsviz/models/adopt.py" in names
    meta = zipfile.ZipFile(wheel).read("wsviz-0.1.0.dist-info/METADATA").decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("torch") and ">=" in r for r in requires)  # ranges, not pins
    assert not any("==" in r.split(";")[0] for r in requires)
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    assert {"app", "equivariant", "test"} <= extras
    assert any(r.startswith("streamlit") and 'extra == "app"' in r for r in requires)
    assert any(r.startswith("e2cnn") and 'extra == "equivariant"' in r for r in requires)
    entry = zipfile.ZipFile(wheel).read("wsviz-0.1.0.dist-info/entry_points.txt").decode()
    assert "wsviz = wsviz.cli:entry" in entry


def test_installed_commands_work_from_another_folder(installed, tmp_path):
    _, python, elsewhere = installed
    p = _run([str(python), "-c", "import wsviz, wsviz.catalog as c; print(wsviz.__file__); print(len(c.load_catalog()))"],
             cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    where, count = p.stdout.split()
    assert Path(where).is_relative_to(python.parents[1]) and int(count) == len(wsviz.list_models())  # the installed copy, with its data

    p = _run([str(python.parent / "wsviz"), "models", "msws_*"], cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    listed = [line.split()[0] for line in p.stdout.splitlines()]
    assert listed == ["msws_alexnet", "msws_resnet101", "msws_resnet152", "msws_resnet18", "msws_resnet34",
                      "msws_resnet50", "msws_resnet_digits"]
    p = _run([str(python.parent / "wsviz"), "models", "--family", "nope"], cwd=elsewhere)
    assert p.returncode == 2 and p.stderr.startswith("error: No family 'nope'")

    out = tmp_path / "out"
    p = _run([str(python), "-m", "wsviz", "scale", "--checkpoint", str(CHECKPOINT), "--dataset", "mnist5k",
              "--limit", "40", "--values", "0.5", "1.0", "--out", str(out)], cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(open(out / "scale_sweep.csv")))
    assert [(r["scale"], r["model"]) for r in rows] == [("0.5", "scale-msws-vanilla"), ("1.0", "scale-msws-vanilla")]
    assert float(rows[1]["agreement"]) == 1.0 and float(rows[1]["accuracy"]) > 0.5
    assert (out / "scale_accuracy.html").is_file()


def test_background_jobs_find_the_installed_package(installed, tmp_path):
    _, python, elsewhere = installed
    script = f"""
import json, time
from wsviz.training.jobs import child_environment, launch
from wsviz.training.loop import TrainConfig
from wsviz.training.runstore import RunStore
env, cwd = child_environment()
store = RunStore({str(tmp_path / "runs")!r})
run = launch(store, "resnet_digits", "mnist5k", TrainConfig(epochs=1, batch_size=64, max_batches=2),
             overrides={{"base_width": 8, "depth": 8}})
t0 = time.time()
while store.get(run.id).active and time.time() - t0 < 240:
    time.sleep(0.2)
r = store.get(run.id)
print(json.dumps({{"pythonpath": env.get("PYTHONPATH"), "cwd": cwd, "status": r.status, "reason": r.reason,
                  "log": open(r.out_dir + "/log.txt").read()[-2000:]}}))
"""
    p = _run([str(python), "-c", script], cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["pythonpath"] is None and res["cwd"] is None  # installed: nothing added for the child
    assert res["status"] == "done", res


def test_readme_keeps_its_two_commands_and_documents_installing():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -r requirements.txt && streamlit run app.py" in readme
    assert "pip install -r requirements-dev.txt && python -m pytest" in readme
    section = readme.split("## Your own models", 1)[1].split("\n## ", 1)[0]
    for command in ("pip install .", "wsviz.adopt(", "python -m wsviz import"):
        assert command in section, command
