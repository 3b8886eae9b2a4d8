"""``python -m wsviz import``: plain PyTorch state dicts become wsviz checkpoints, safely.

torchvision's ResNets (randomly initialised here, with BatchNorm statistics that are not the
identity; nothing is downloaded) imported into wsviz's unshared baselines compute the same
outputs; pickles that carry code are refused before they run; weights that do not fit are
refused with the keys named; the checkpoint is readable with plain PyTorch + safetensors.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_model, save_file
from torch import nn

import wsviz
from wsviz.cli import main
from wsviz.cli_errors import run_cli
from wsviz.errors import WsvizError
from wsviz.models.convert import import_weights
from wsviz.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
X_SIZE = 64  # the ResNets are fully convolutional: small inputs keep the comparison fast


def _torchvision(arch: str, num_classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(num_classes=num_classes)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):  # not the identity, so a mixed-up BN would show
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _inputs() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 3, X_SIZE, X_SIZE)


@pytest.mark.parametrize("arch, model, option", [
    ("resnet18", "msws_resnet18", "sharing=vanilla"),
    ("resnet50", "msws_resnet50", "sharing=vanilla"),
    ("resnet34", "sharesnet34", "shared=false"),
    ("resnet50", "sharesnet50", "shared=false"),
])
def test_torchvision_resnet_imports_with_equal_outputs(tmp_path, arch, model, option):
    tv = _torchvision(arch)
    weights = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), weights)
    out = tmp_path / "ck"
    code = run_cli(main, ["import", "--model", model, "--set", option, "--set", f"input_size={X_SIZE}",
                          "--weights", str(weights), "--out", str(out)])
    assert code == 0
    m, card = load_checkpoint(out)
    assert card["model"] == model and card["config"]["num_classes"] == 7  # read from fc
    assert card["imported_from"]["layout"] == "torchvision-resnet" and card["test_accuracy"] is None
    assert card["unique_params"] == sum(p.numel() for p in tv.parameters())
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(m(x), tv(x), rtol=1e-5, atol=1e-5)


def test_checkpoint_is_plain_pytorch_and_create_model_loads_it(tmp_path):
    tv = _torchvision("resnet18")
    weights = tmp_path / "r18.safetensors"  # safetensors input too
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(weights))
    out = tmp_path / "ck"
    import_weights("msws_resnet18", weights, out, {"sharing": "vanilla", "input_size": X_SIZE})
    x = _inputs()
    with torch.no_grad():
        want = tv(x)
    # safetensors metadata and the card are enough for someone without wsviz's loader
    with safe_open(str(out / "weights.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt" and meta["wsviz_model"] == "msws_resnet18"
    card = json.loads((out / "card.json").read_text())
    assert json.loads(meta["wsviz_config"]) == card["config"]
    plain = wsviz.create_model(card["model"], **card["config"])
    missing, unexpected = load_model(plain, str(out / "weights.safetensors"))
    assert not missing and not unexpected
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), want, rtol=1e-5, atol=1e-5)
    # timm's convention: create_model(name, checkpoint_path=...)
    m = wsviz.create_model("msws_resnet18", checkpoint_path=out)
    assert m.training  # like any new model
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(WsvizError, match="sharing='vanilla', not sharing='shared'"):
        wsviz.create_model("msws_resnet18", checkpoint_path=out, sharing="shared")
    with pytest.raises(WsvizError, match="already holds a checkpoint"):
        import_weights("msws_resnet18", weights, out, {"sharing": "vanilla"})


class _Payload:
    """Unpickling this writes a marker file: what a malicious .pth would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the payload ran"))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    state = {"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}
    if how == "torch.save":
        torch.save(state, evil)
    else:
        with open(evil, "wb") as fh:
            pickle.dump(state, fh)
    # the payload is live: an ordinary unpickler runs it
    if how == "torch.save":
        torch.load(evil, weights_only=False)
    else:
        with open(evil, "rb") as fh:
            pickle.load(fh)
    assert marker.read_text() == "the payload ran"
    marker.unlink()

    with pytest.raises(WsvizError, match="other than tensors, so it was refused without running them"):
        import_weights("msws_resnet18", evil, tmp_path / "ck", {"sharing": "vanilla"})
    assert not marker.exists()
    assert not (tmp_path / "ck").exists()
    # the same through the command line, in a fresh process: exit status 2, one line, nothing ran
    p = subprocess.run([sys.executable, "-m", "wsviz", "import", "--model", "msws_resnet18", "--weights", str(evil),
                        "--out", str(tmp_path / "ck")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and "refused without running" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.bin", "model.ckpt", "model.pkl", "weights"])
def test_other_file_types_are_refused_unread(tmp_path, name):
    marker = tmp_path / "marker"
    path = tmp_path / name
    with open(path, "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    with pytest.raises(WsvizError, match=r"imports \.pt / \.pth files .* and \.safetensors files"):
        import_weights("msws_resnet18", path, tmp_path / "ck")
    assert not marker.exists()


def test_keys_that_do_not_fit_are_named(tmp_path):
    state = _torchvision("resnet18").state_dict()
    # missing keys
    partial = {k: v for k, v in state.items() if k not in ("layer4.1.bn2.running_var", "fc.bias")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(WsvizError) as err:
        import_weights("msws_resnet18", tmp_path / "partial.pt", tmp_path / "a", {"sharing": "vanilla"})
    msg = str(err.value)
    assert "missing 2" in msg and "layer4.1.bn2.running_var" in msg and "fc.bias" in msg
    assert "trunk.stages.3.1.bn2.running_var" in msg  # and where it goes in wsviz's model
    # a misshapen key, and an extra one
    bad = dict(state)
    bad["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    bad["extra.weight"] = torch.zeros(3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(WsvizError) as err:
        import_weights("msws_resnet18", tmp_path / "bad.pt", tmp_path / "b", {"sharing": "vanilla"})
    msg = str(err.value)
    assert "wrong shape 1: layer2.0.conv1.weight (128, 64, 5, 5) (the model's is (128, 64, 3, 3))" in msg
    assert "unexpected 1: extra.weight" in msg
    # the shared msws model stores its multi-rate kernels differently: refused, with the hint
    torch.save(state, tmp_path / "r18.pt")
    with pytest.raises(WsvizError, match=r"do not fit msws_resnet18.*msws_resnet18 --set sharing=vanilla"):
        import_weights("msws_resnet18", tmp_path / "r18.pt", tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing written for refused imports


def test_wrapped_state_dicts_are_unwrapped(tmp_path):
    tv = _torchvision("resnet18")
    wrapped = {"epoch": 90, "state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}
    torch.save(wrapped, tmp_path / "train_ckpt.pth")
    import_weights("msws_resnet18", tmp_path / "train_ckpt.pth", tmp_path / "ck",
                   {"sharing": "vanilla", "input_size": X_SIZE})
    m, _ = load_checkpoint(tmp_path / "ck")
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(m(x), tv(x), rtol=1e-5, atol=1e-5)


def test_the_app_lists_an_imported_checkpoint(tmp_path):
    """The app's own checkpoint scan (pages/_shared.py) lists it and loads it like any other variant."""
    tv = _torchvision("resnet18", num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    ck = tmp_path / "checkpoints"
    import_weights("msws_resnet18", tmp_path / "r18.pth", ck / "imported-r18", {"sharing": "vanilla", "input_size": 32})
    code = ("import json; from pages._shared import available_variants, get_variant, refused_checkpoints; "
            "v = available_variants(); m, card = get_variant('imported-r18'); "
            "print(json.dumps([sorted(v), refused_checkpoints(), card['model'], type(m).__name__]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "WSVIZ_CHECKPOINTS": str(ck),
                            "WSVIZ_RUNS": str(tmp_path / "runs")})
    assert p.returncode == 0, p.stderr
    listed, refused, model, cls = json.loads(p.stdout.strip().splitlines()[-1])
    assert listed == ["imported-r18"] and refused == {} and model == "msws_resnet18" and cls == "ResNet"


# ------------------------------------------------------------------ timm's registry conventions
def test_list_models_returns_names_filtered_by_wildcards():
    names = wsviz.list_models()
    assert all(isinstance(n, str) for n in names) and len(names) == len(set(names)) >= 30
    assert wsviz.list_models("sharesnet*") == wsviz.list_models(family="sharesnet")
    assert wsviz.list_models(["msws_resnet1*", "*wrn40_4"]) == ["msws_resnet101", "msws_resnet152", "msws_resnet18",
                                                                "sharesnet_wrn40_4"]
    assert wsviz.list_models("nothing*") == []
    assert wsviz.get_spec("msws_resnet18").family == "msws"  # the metadata has its own function


def test_pretrained_picks_the_trained_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WSVIZ_CHECKPOINTS", str(ROOT / "checkpoints"))
    have = wsviz.list_models(pretrained=True)
    assert "msws_resnet_digits" in have and "msws_resnet18" not in have
    m = wsviz.create_model("msws_resnet_digits", pretrained=True, sharing="vanilla")
    ref, _ = load_checkpoint(ROOT / "checkpoints" / "scale-msws-vanilla")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    # no options: the checkpoint with the model's default options (sharing='shared')
    assert wsviz.create_model("msws_resnet_digits", pretrained=True).wsviz_config["sharing"] == "shared"
    with pytest.raises(WsvizError, match="4 trained checkpoints of 'repeatnet_resnet18'.*mode='bireal'"):
        wsviz.create_model("repeatnet_resnet18", pretrained=True)
    with pytest.raises(WsvizError, match="No trained checkpoint of 'msws_resnet18'"):
        wsviz.create_model("msws_resnet18", pretrained=True)
    monkeypatch.setenv("WSVIZ_CHECKPOINTS", str(tmp_path))
    assert wsviz.list_models(pretrained=True) == []


def test_weights_saved_without_num_batches_tracked_import_as_torchvision_loads_them(tmp_path):
    """State dicts from before PyTorch 0.4.1 have no BatchNorm num_batches_tracked; torchvision's own
    load_state_dict(strict=True) accepts them, so import does too (it refused: 'missing 20: ...')."""
    import torch
    import torchvision

    from wsviz.models.convert import import_weights

    tv = torchvision.models.resnet18(num_classes=10)
    sd = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    torchvision.models.resnet18(num_classes=10).load_state_dict(sd, strict=True)  # torchvision accepts it
    path = tmp_path / "old.pt"
    torch.save(sd, path)
    card = import_weights("msws_resnet18", path, tmp_path / "ck", overrides={"sharing": "vanilla", "input_size": 32})
    assert card["unique_params"] == sum(p.numel() for p in tv.parameters())
