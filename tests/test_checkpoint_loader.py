"""The checkpoint loader's own rules, message by message: option types, the meta-device build,
weights that do not fit (listed by name), bare weights files.

tests/test_security.py feeds the loader hostile files; here each rule of
wsviz/training/checkpoint.py is checked on its own, with the whole message it gives.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from wsviz import WsvizError
from wsviz.models import get_spec
from wsviz.training.checkpoint import _NoRandomFill, build_on_meta, load_checkpoint, load_weights

CK = Path(__file__).resolve().parents[1] / "checkpoints"
GOOD = "scale-msws-shared"  # msws_resnet_digits


def _refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(WsvizError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------ option types
def _default(model: str, key: str):
    return get_spec(model).config()[key]


TYPED = [  # (model, option, value, what it must be)
    ("msws_resnet_digits", "base_width", 16.0, "an integer"),
    ("msws_resnet_digits", "base_width", True, "an integer"),
    ("steerable_rotmnist", "width", True, "a finite number"),
    ("steerable_rotmnist", "width", float("inf"), "a finite number"),
    ("steerable_rotmnist", "width", "wide", "a finite number"),
]


@pytest.mark.parametrize("model,key,value,words", TYPED)
def test_options_of_the_wrong_type_are_refused_with_the_rule(model, key, value, words):
    msg = _refusal(build_on_meta, model, {key: value})
    assert msg == (f"The model options gives {model} the option {key}={value!r}, but it must be {words} "
                   f"(default {_default(model, key)!r}); change that option.")


def test_options_of_the_right_type_are_accepted():
    assert build_on_meta("wsms_resnet_digits", {"shared": 0}) is not None  # 0/1 for booleans: `--set shared=1`
    assert build_on_meta("wsms_resnet_digits", {"shared": 1}) is not None
    assert build_on_meta("wsms_resnet_digits", {"shared": False}) is not None
    assert build_on_meta("steerable_rotmnist", {"width": 1}) is None  # an integer is a number; e2cnn: no meta build
    assert build_on_meta("msws_resnet_digits", {"sharing": "unshared", "base_width": 8}) is not None


def test_a_model_or_option_that_does_not_exist_keeps_the_registry_message():
    with pytest.raises(WsvizError) as expected:
        get_spec("msws_resnet_digits").config(bogus=1)
    assert _refusal(build_on_meta, "msws_resnet_digits", {"bogus": 1}) == str(expected.value)
    with pytest.raises(WsvizError) as expected:
        get_spec("no_such_net")
    assert _refusal(build_on_meta, "no_such_net", {}) == str(expected.value)


# ----------------------------------------------------------------------- meta builds
def test_build_on_meta_allocates_nothing_and_is_the_real_architecture():
    meta = build_on_meta("msws_resnet_digits", {"base_width": 8})
    assert all(t.is_meta for t in meta.state_dict().values())
    from wsviz.models import create_model

    real = create_model("msws_resnet_digits", base_width=8)
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in real.state_dict().items()}


def test_options_that_cannot_be_built_say_so():
    msg = _refusal(build_on_meta, "msws_resnet_digits", {"base_width": 10**9})
    assert re.fullmatch(r"These options make a msws_resnet_digits that cannot be built \(\w+: .+\); change them\.",
                        msg, re.S), msg


def test_no_random_fill_skips_only_meta_fills_and_scalings():
    with _NoRandomFill():
        meta = torch.empty(3, device="meta")
        assert meta.normal_() is meta and meta.uniform_() is meta
        scaled = torch.empty(3, dtype=torch.int64, device="meta") * 1.5
        assert scaled.is_meta and scaled.shape == (3,) and scaled.dtype == torch.float32
        assert (meta * 2).is_meta
        real = torch.zeros(1000)
        real.normal_()  # real tensors are filled as usual
        assert real.std() > 0.5
        assert torch.equal(torch.ones(2) * 3, torch.tensor([3.0, 3.0]))
        both = torch.empty(3, device="meta") * torch.empty(3, device="meta")  # tensor x tensor: torch's own
        assert both.is_meta


# --------------------------------------------------------------------- load_checkpoint
def _copy(tmp_path: Path, edit=None) -> Path:
    folder = tmp_path / "ck"
    shutil.copytree(CK / GOOD, folder)
    if edit is not None:
        card = json.loads((folder / "card.json").read_text())
        edit(card)
        (folder / "card.json").write_text(json.dumps(card))
    return folder


def test_load_checkpoint_returns_the_eval_model_and_its_card(tmp_path):
    folder = _copy(tmp_path)
    model, card = load_checkpoint(folder, device="cpu")
    assert card == json.loads((folder / "card.json").read_text())
    assert not any(m.training for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())
    from safetensors.torch import load_file

    stored = load_file(str(folder / "weights.safetensors"))
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())


def test_a_card_that_cannot_be_built_is_worded_for_the_card(tmp_path):
    folder = _copy(tmp_path, lambda c: c["config"].update(base_width=10**9))
    msg = _refusal(load_checkpoint, folder)
    assert re.fullmatch(rf"The model card {re.escape(str(folder / 'card.json'))} describes a msws_resnet_digits "
                        r"that cannot be built \(\w+: .+\); re-create the checkpoint\.", msg, re.S), msg


def test_a_card_option_of_the_wrong_type_is_worded_for_the_card(tmp_path):
    folder = _copy(tmp_path, lambda c: c["config"].update(depth=14.0))
    assert _refusal(load_checkpoint, folder) == (
        f"The model card {folder / 'card.json'} gives msws_resnet_digits the option depth=14.0, but it must be "
        f"an integer (default {_default('msws_resnet_digits', 'depth')!r}); re-create the checkpoint.")


# ------------------------------------------------------------------------ load_weights
class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 2)
        self.c = nn.Linear(2, 1)


def test_load_weights_loads_a_bare_file(tmp_path):
    src = Small()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    dst = Small()
    assert load_weights(dst, tmp_path / "w.safetensors") is dst
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def test_load_weights_names_what_does_not_fit(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.zeros(2, 4), "a.bias": torch.zeros(2), "x.weight": torch.zeros(1),
               "y.weight": torch.zeros(1), "z.weight": torch.zeros(1), "zz.weight": torch.zeros(1)}, str(path))
    msg = _refusal(load_weights, Small(), path)
    assert msg == (f"The weights in {path} do not fit Small with these options: "
                   "missing ['b.weight', 'b.bias', 'c.weight']; unexpected ['x.weight', 'y.weight', 'z.weight']; "
                   "wrong shape [('a.weight', (2, 4), (2, 3))]. Pass the options the weights were saved with, "
                   "or the weights of this model.")
    save_file({k: v.contiguous() for k, v in Small().state_dict().items() if k != "c.bias"}, str(path))
    assert _refusal(load_weights, Small(), path, "my model") == (
        f"The weights in {path} do not fit my model with these options: missing ['c.bias']. Pass the options "
        "the weights were saved with, or the weights of this model.")


def test_load_weights_of_a_missing_file(tmp_path):
    path = tmp_path / "nothing.safetensors"
    assert _refusal(load_weights, Small(), path) == f"{path} does not exist; give a .safetensors file."
