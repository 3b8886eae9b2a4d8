"""The checkpoint loader's own rules, message by message: option types, the meta-device build,
weights that do not fit (listed by name), bare weights files.

tests/test_security.py feeds the loader hostile files; here each rule of
wsviz/training/checkpoint.py is checked on its own, with the whole message it gives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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
def test_load_checkpoint_returns_the_eval_model_and_its_card(tmp_path):
    folder = make_checkpoint(tmp_path, "ck", src=GOOD)
    model, card = load_checkpoint(folder, device="cpu")
    assert card == json.loads((folder / "card.json").read_text())
    assert not any(m.training for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())
    from safetensors.torch import load_file

    stored = load_file(str(folder / "weights.safetensors"))
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())


def test_a_card_that_cannot_be_built_is_worded_for_the_card(tmp_path):
    folder = make_checkpoint(tmp_path, "ck", src=GOOD, edit=lambda c: c["config"].update(base_width=10**9))
    msg = _refusal(load_checkpoint, folder)
    assert re.fullmatch(rf"The model card {re.escape(str(folder / 'card.json'))} describes a msws_resnet_digits "
                        r"that cannot be built \(\w+: .+\); re-create the checkpoint\.", msg, re.S), msg


def test_a_card_option_of_the_wrong_type_is_worded_for_the_card(tmp_path):
    folder = make_checkpoint(tmp_path, "ck", src=GOOD, edit=lambda c: c["config"].update(depth=14.0))
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


# ------------------------------------------- every message in full, each rule on its own
# (written against the survivors of mutation testing: benchmarks/mutation/SURVIVORS.md, checkpoint)
STEERABLE = "rot-steerable-c4"  # e2cnn: not built on meta; N=4, width=0.25 (not the defaults)


def test_weights_that_do_not_fit_the_card_message_in_full(tmp_path):
    # every tensor of the wrong width
    folder = make_checkpoint(tmp_path, "ck", src=GOOD, edit=lambda c: c["config"].update(base_width=8))
    assert _refusal(load_checkpoint, folder) == (
        f"The weights in {folder / 'weights.safetensors'} do not fit the model its card describes (msws_resnet_digits): "
        "wrong shape [('head.fc.weight', (10, 64), (10, 32)), ('trunk.stages.0.0.bn1.bias', (16,), (8,)), "
        "('trunk.stages.0.0.bn1.running_mean', (16,), (8,))]. "  # the first three only
        "The card or the weights were changed or mixed up; re-create the checkpoint.")


def test_e2cnn_weights_that_do_not_fit_are_checked_once_built(tmp_path):
    folder = make_checkpoint(tmp_path, "ck", src=STEERABLE, edit=lambda c: c["config"].update(width=0.5))
    assert _refusal(load_checkpoint, folder) == (
        f"The weights in {folder / 'weights.safetensors'} do not fit the model its card describes (steerable_rotmnist): "
        "wrong shape [('blocks.0.0.filter', (16, 1, 7, 7), (32, 1, 7, 7)), ('blocks.0.0.weights', (72,), (144,)), "
        "('blocks.0.1.batch_norm_[4].bias', (4,), (8,))]. "
        "The card or the weights were changed or mixed up; re-create the checkpoint.")


def test_an_e2cnn_checkpoint_loads_with_its_own_options(tmp_path):
    """Its card's options are not the defaults (N=4, width=0.25), and e2cnn stores one name of each
    shared basis buffer: the fit check must take the aliased names as one tensor."""
    from safetensors.torch import load_file

    model, card = load_checkpoint(CK / STEERABLE)
    assert card["config"]["N"] == 4 and card["config"]["width"] == 0.25 != get_spec(card["model"]).config()["width"]
    stored = load_file(str(CK / STEERABLE / "weights.safetensors"))
    state = model.state_dict()
    assert set(stored) < set(state)  # some names of shared buffers are not in the file ...
    assert all(torch.equal(stored[k], state[k]) for k in stored)  # ... and what is there was loaded


def test_a_card_with_options_other_than_the_defaults_builds_them(tmp_path):
    from wsviz.models import create_model
    from wsviz.training.checkpoint import save_checkpoint

    narrow = create_model("msws_resnet_digits", base_width=8).eval()
    card = {**json.loads((CK / GOOD / "card.json").read_text())}
    card["config"] = {**card["config"], "base_width": 8}
    save_checkpoint(tmp_path / "narrow", narrow, card)
    model, _ = load_checkpoint(tmp_path / "narrow")
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), narrow(x))


def test_a_card_without_options_builds_the_defaults(tmp_path):
    # the shipped card's options are the defaults
    folder = make_checkpoint(tmp_path, "ck", src=GOOD, edit=lambda c: c.pop("config"))
    assert json.loads((CK / GOOD / "card.json").read_text())["config"] == get_spec("msws_resnet_digits").config()
    model, card = load_checkpoint(folder)
    assert "config" not in card and model.state_dict().keys() == load_checkpoint(CK / GOOD)[0].state_dict().keys()


def test_a_tied_checkpoint_loads_its_shared_weight_once(tmp_path):
    """The meta-device fit check must see a tied weight under both its names as one tensor."""
    from wsviz.models import create_model
    from wsviz.models.tie import apply_ties
    from wsviz.training.checkpoint import save_checkpoint

    group = ["stages.0.1.conv2", "stages.0.2.conv2"]
    tied = apply_ties(create_model("sharesnet_wrn_digits", shared=False), [group]).eval()
    card = json.loads((CK / "scale-sharesnet-unshared" / "card.json").read_text())
    save_checkpoint(tmp_path / "t", tied, card)
    model, card = load_checkpoint(tmp_path / "t")
    assert card["tied"]["groups"] == [group]
    assert model.get_submodule(group[1]).source is model.get_submodule(group[0])
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), tied(x))


@pytest.mark.parametrize("src", [GOOD, STEERABLE])  # the meta build, and e2cnn's real build
def test_a_card_tying_layers_its_model_lacks_is_worded_for_the_card(tmp_path, src):
    folder = make_checkpoint(tmp_path, "ck", src=src, edit=lambda c: c.update(tied={"groups": [["a", "b"]]}))
    assert _refusal(load_checkpoint, folder) == (
        f"The model card {folder / 'card.json'} ties groups its model does not have: "
        "Group ['a', 'b']: the model has no layer 'a'. Re-create the checkpoint.")


def test_a_card_with_an_unknown_option_message_in_full(tmp_path):
    folder = make_checkpoint(tmp_path, "ck", src=GOOD, edit=lambda c: c["config"].update(bogus=1))
    with pytest.raises(WsvizError) as registry:
        get_spec("msws_resnet_digits").config(bogus=1)
    assert _refusal(load_checkpoint, folder) == (
        f"The model card {folder / 'card.json'} cannot be used: {registry.value} Re-create the checkpoint "
        "(or update wsviz, if a newer version wrote it).")


def test_a_model_that_fails_to_build_for_real_is_worded_for_the_card(tmp_path, monkeypatch):
    """The meta build passed and the weights fit, yet the real build fails (out of memory, say)."""
    import wsviz.models

    real_create = wsviz.models.create_model

    def create_model(*args, **kwargs):
        if torch.empty(()).is_meta:
            return real_create(*args, **kwargs)
        raise MemoryError("cannot allocate 1 TB")

    monkeypatch.setattr(wsviz.models, "create_model", create_model)
    folder = make_checkpoint(tmp_path, "ck", src=GOOD)
    assert _refusal(load_checkpoint, folder) == (
        f"The model card {folder / 'card.json'} describes a msws_resnet_digits that cannot be built "
        "(MemoryError: cannot allocate 1 TB); re-create the checkpoint.")


def test_options_that_cannot_be_built_name_the_error():
    msg = _refusal(build_on_meta, "msws_resnet_digits", {"base_width": 10**9})
    assert msg.startswith("These options make a msws_resnet_digits that cannot be built (RuntimeError: Storage size"), msg


def test_load_weights_refuses_a_pickle_without_running_it(tmp_path):
    import pickle

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text('pwned')",)

    path = tmp_path / "model.bin"
    path.write_bytes(pickle.dumps({"a.weight": Payload()}, protocol=4))
    assert _refusal(load_weights, Small(), path) == (
        f"{path} is a Python pickle (the format of older torch.save / .pth / .bin files), not a safetensors file; "
        "wsviz never unpickles weights (loading a pickle can run any code it contains). Convert a state dict you "
        "trust with `python -m wsviz import`.")
    assert not marker.exists()


def test_load_weights_refuses_a_truncated_file(tmp_path):
    src = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in Small().state_dict().items()}, str(src))
    path = tmp_path / "w.safetensors"
    path.write_bytes(src.read_bytes()[:-4])
    msg = _refusal(load_weights, Small(), path)
    assert re.fullmatch(rf"{re.escape(str(path))} is not a readable safetensors file \(.+\); it may be truncated or "
                        r"not a safetensors file at all\. Re-create it\.", msg), msg


def test_weights_that_fit_but_fail_to_load_are_refused(tmp_path, monkeypatch):
    import wsviz.training.checkpoint as checkpoint

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in Small().state_dict().items()}, str(path))

    def failing_load(*args, **kwargs):
        raise RuntimeError("disk read error")

    monkeypatch.setattr(checkpoint, "load_model", failing_load)
    assert _refusal(load_weights, Small(), path) == (
        f"The weights in {path} could not be loaded (disk read error); re-create the checkpoint.")


class _Ops(TorchDispatchMode):
    """Records every aten operation that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_no_random_fill_never_dispatches_a_fill_or_scaling_of_a_meta_tensor():
    meta = torch.empty(3, device="meta")
    with _NoRandomFill(), _Ops() as seen:
        meta.normal_()
        meta.uniform_(-1, 1)
        scaled = meta * 0.5
    assert seen.ops == ["empty_like"] and scaled.is_meta  # no normal_, uniform_ or mul ran
    with _NoRandomFill(), _Ops() as seen:
        torch.mul(meta, 2, out=torch.empty(3, device="meta"))  # keyword arguments: torch's own
        meta.mul(meta)  # tensor x tensor: torch's own
    assert seen.ops == ["empty", "mul", "mul"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_no_random_fill_keeps_the_dtype_a_scaling_would_give(dtype):
    with _NoRandomFill():
        for factor in (2, 0.5):
            assert (torch.empty(3, dtype=dtype, device="meta") * factor).dtype == \
                torch.result_type(torch.empty(3, dtype=dtype), factor)


@pytest.mark.may_skip_in_ci("CI machines have no GPU; this runs where CUDA is")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_checkpoint_puts_the_model_on_the_device():
    """safetensors copies the weights into the model built on the CPU; load_checkpoint then moves it."""
    model, _ = load_checkpoint(CK / GOOD, device="cuda")
    assert {t.device.type for t in model.state_dict().values()} == {"cuda"}
