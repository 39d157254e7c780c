"""Checkpoints: safetensors round trips, every kind of tampered file, legacy pickles, devices."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from napari_confocal_stain.errors import CheckpointError
from napari_confocal_stain.inference import DeviceError, load_model, select_device
from napari_confocal_stain.models import (
    METADATA_KEY,
    available_weights,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from napari_confocal_stain.models import checkpoint as checkpoint_module

SMALL = {
    "unet": {"base_filters": 4, "n_down": 2},
    "resnet": {"base_filters": 4, "n_down": 2, "n_blocks": 1},
    "affine": {},
    "patchgan": {"base_filters": 4},
    "despeckle-combalia": {"filters": 4, "layers": 2},
    "despeckle-dilated": {"filters": 4, "layers": 3, "dilation": [1, 2, 1]},
}


def probe_input(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if model.config.get("skip"):
        return torch.rand(2, 1, 20, 24, generator=g)
    return torch.rand(2, 3, 32, 40, generator=g) * 2 - 1


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and BatchNorm buffer away from its initial value."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.abs_().add_(0.5)  # a variance stays positive
                m.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A real small U-Net checkpoint on disk and the model it came from."""
    model = perturbed(build_model("unet", **SMALL["unet"]))
    path = save_checkpoint(tmp_path / "unet.safetensors", model, training={"epochs": 3})
    return path, model


# ------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", sorted(SMALL))
def test_round_trip_gives_identical_outputs(tmp_path, name):
    model = perturbed(build_model(name, **SMALL[name]))
    path = save_checkpoint(tmp_path / f"{name}.safetensors", model, architecture=name)
    loaded = load_model(path, device="cpu")
    assert not loaded.training
    assert type(loaded) is type(model)
    x = probe_input(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    meta = loaded.checkpoint_meta
    assert meta["architecture"] == name
    assert meta["kwargs"] == model.config
    assert meta["path"] == str(path)


def test_metadata_is_a_json_header_in_safetensors(saved):
    path, model = saved
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
        assert set(f.keys()) == set(model.state_dict())
    meta = json.loads(raw[METADATA_KEY])
    assert meta["format_version"] == 1
    assert meta["architecture"] == "unet"
    assert meta["kwargs"] == dict(
        in_channels=3, out_channels=3, base_filters=4, n_down=2, max_filters=512
    )
    assert meta["normalization"] == {"input": "dscm", "range": [-1, 1]}
    assert meta["training"] == {"epochs": 3}
    assert meta["package_version"]
    assert meta["n_parameters"] == sum(p.numel() for p in model.parameters())
    state, meta2 = load_checkpoint(path)
    assert meta2 == meta and set(state) == set(model.state_dict())
    assert not path.read_bytes().startswith(b"PK")  # not a torch zip/pickle


def test_despeckle_checkpoint_records_reflectance_normalisation(tmp_path):
    model = build_model("despeckle-thesis", filters=4)
    path = save_checkpoint(tmp_path / "d.safetensors", model, architecture="despeckle-thesis")
    normalization = load_model(path).checkpoint_meta["normalization"]
    assert normalization == {"input": "reflectance", "range": [0, 1]}


def test_load_to_dtype(saved):
    path, model = saved
    loaded = load_model(path, device="cpu", dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    x = probe_input(model)
    with torch.no_grad():
        assert (loaded(x.bfloat16()).float() - model(x)).abs().max() < 0.1


def test_save_is_atomic_and_overwrites(tmp_path, saved):
    path, _ = saved
    other = perturbed(build_model("unet", **SMALL["unet"]))
    with torch.no_grad():
        other.head[1].bias.fill_(0.25)
    save_checkpoint(path, other)
    assert torch.equal(load_model(path).head[1].bias, other.head[1].bias)
    assert sorted(p.name for p in path.parent.iterdir()) == ["unet.safetensors"]  # no temp file

    broken = build_model("unet", **SMALL["unet"])
    with torch.no_grad():
        broken.stem[1].weight[0, 0, 0, 0] = float("nan")
    target = tmp_path / "sub" / "nan.safetensors"
    with pytest.raises(CheckpointError, match=r"'stem\.1\.weight' has NaN or inf"):
        save_checkpoint(target, broken)
    assert not target.exists()
    assert not list(target.parent.glob("*"))  # no temporary file left behind either


def test_save_refuses_inconsistent_description(tmp_path):
    model = build_model("unet", **SMALL["unet"])
    with pytest.raises(CheckpointError, match=r"'resnet' is a ResnetGenerator.*UNetGenerator"):
        save_checkpoint(tmp_path / "x.safetensors", model, architecture="resnet")
    with pytest.raises(CheckpointError, match=r"'stem\.1\.weight' has shape \[4, 3, 7, 7\]"):
        save_checkpoint(tmp_path / "x.safetensors", model, kwargs={"base_filters": 8, "n_down": 2})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "x.safetensors", model, training={"when": object()})
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------ bundled weights


def test_unknown_bundled_name_lists_what_is_available(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint_module, "WEIGHTS_DIR", tmp_path / "weights")
    with pytest.raises(
        CheckpointError, match=r"no bundled weights named 'unet'.*none.*build_model"
    ):
        load_model("unet")
    (tmp_path / "weights").mkdir()
    model = perturbed(build_model("unet", **SMALL["unet"]))
    save_checkpoint(tmp_path / "weights" / "stain-v1.safetensors", model)
    assert available_weights() == ("stain-v1",)
    with pytest.raises(CheckpointError, match="bundled weights: stain-v1"):
        load_model("stain-v2")
    loaded = load_model("stain-v1")
    x = probe_input(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("name", available_weights())
def test_bundled_weights_load_bit_for_bit(name):
    """The checked loader gives exactly the tensors an independent safetensors reader does."""
    model = load_model(name, device="cpu")
    raw = load_file(str(checkpoint_module.WEIGHTS_DIR / f"{name}.safetensors"))
    state = model.state_dict()
    assert set(state) == set(raw)
    for key, value in raw.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------------------------ tampered files


def rewrite_header(path: Path, edit) -> None:
    """Parse the real file's JSON header, let ``edit`` change it, write it back with the data."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n :])


def rewrite_meta(path: Path, edit) -> None:
    def change(header):
        meta = json.loads(header["__metadata__"][METADATA_KEY])
        edit(meta)
        header["__metadata__"][METADATA_KEY] = json.dumps(meta)

    rewrite_header(path, change)


def resave(path: Path, edit_tensors) -> None:
    """Load the real file's tensors and metadata, edit the tensors, save them back."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit_tensors(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"these are not the weights you are looking for")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"not a safetensors file \(only 3 bytes\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [40, -100, -1])
def test_truncated(saved, keep):
    path, _ = saved
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_header_json_flipped(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[8] = ord("X")  # the header's opening brace
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        load_model(path)


def test_metadata_json_invalid(saved):
    path, _ = saved
    rewrite_header(path, lambda h: h["__metadata__"].update({METADATA_KEY: '{"architecture": '}))
    with pytest.raises(CheckpointError, match=f"'{METADATA_KEY}' metadata is not valid JSON"):
        load_model(path)


def test_metadata_missing(saved):
    path, _ = saved
    rewrite_header(path, lambda h: h.pop("__metadata__"))
    with pytest.raises(CheckpointError, match=f"no '{METADATA_KEY}' entry"):
        load_checkpoint(path)


def test_metadata_field_missing(saved):
    path, _ = saved
    rewrite_meta(path, lambda m: m.pop("architecture"))
    with pytest.raises(CheckpointError, match="lacks 'architecture'"):
        load_model(path)


def test_metadata_too_new(saved):
    path, _ = saved
    rewrite_meta(path, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="version 99 is newer"):
        load_model(path)


def test_unknown_architecture(saved):
    path, _ = saved
    rewrite_meta(path, lambda m: m.update(architecture="transformer-xl"))
    with pytest.raises(CheckpointError, match=r"unknown architecture 'transformer-xl'.*unet"):
        load_model(path)


def test_kwargs_that_do_not_build(saved):
    path, _ = saved
    rewrite_meta(path, lambda m: m["kwargs"].update(n_heads=8))
    with pytest.raises(CheckpointError, match=r"do not build 'unet'.*n_heads"):
        load_model(path)


def test_kwargs_that_build_another_size(saved):
    path, _ = saved
    rewrite_meta(path, lambda m: m["kwargs"].update(base_filters=8))
    message = (
        r"'stem\.1\.weight' has shape \[4, 3, 7, 7\] in the file, the architecture expects "
        r"\[8, 3, 7, 7\]"
    )
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_tensor_shape_edited_in_header(saved):
    path, _ = saved
    rewrite_header(path, lambda h: h["stem.1.weight"].update(shape=[4, 3, 5, 5]))
    message = (
        r"tensor 'stem\.1\.weight': header says shape \[4, 3, 5, 5\] F32 \(1200 bytes\) but "
        r"its data span 2352 bytes"
    )
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_tensor_shape_permuted_in_header(saved):
    path, _ = saved
    rewrite_header(path, lambda h: h["stem.1.weight"].update(shape=[3, 4, 7, 7]))  # same bytes
    message = (
        r"'stem\.1\.weight' has shape \[3, 4, 7, 7\] in the file, the architecture expects "
        r"\[4, 3, 7, 7\]"
    )
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_tensor_dropped(saved):
    path, _ = saved
    resave(path, lambda t: (t.pop("head.1.bias"), t.pop("middle.1.weight")))
    with pytest.raises(
        CheckpointError, match=r"missing tensors: head\.1\.bias, middle\.1\.weight"
    ):
        load_model(path)


def test_tensor_added(saved):
    path, _ = saved
    resave(path, lambda t: t.update({"backdoor.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: backdoor\.weight"):
        load_model(path)


def test_tensor_not_float(saved):
    path, _ = saved
    resave(path, lambda t: t.update({"head.1.bias": torch.zeros(3, dtype=torch.int32)}))
    with pytest.raises(
        CheckpointError, match=r"'head\.1\.bias' is torch\.int32 .* floating-point"
    ):
        load_model(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_tensor_not_finite(saved, bad):
    path, _ = saved

    def poison(t):
        t["down.0.1.weight"][0, 0, 1, 1] = bad

    resave(path, poison)
    with pytest.raises(CheckpointError, match=r"'down\.0\.1\.weight' has 1 NaN/inf"):
        load_checkpoint(path)


def test_requested_architecture_must_agree(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match="is a 'unet' checkpoint, not 'resnet'"):
        load_model(path, architecture="resnet")
    with pytest.raises(CheckpointError, match=r"not \{'base_filters': 8\}"):
        load_model(path, kwargs={"base_filters": 8})
    assert load_model(path, architecture="unet", kwargs={"base_filters": 4}).n_down == 2


def test_foreign_safetensors_needs_the_architecture(tmp_path):
    model = perturbed(build_model("resnet", **SMALL["resnet"]))
    path = tmp_path / "foreign.safetensors"
    save_file(model.state_dict(), str(path))  # plain safetensors, no description
    with pytest.raises(CheckpointError, match="not written by save_checkpoint"):
        load_model(path)
    loaded = load_model(path, architecture="resnet", kwargs=SMALL["resnet"])
    x = probe_input(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.checkpoint_meta["extra"] == {"source": "foreign-safetensors"}


# ------------------------------------------------------------------------------ legacy pickles


class Payload:
    """A pickle that runs ``os.mkdir(marker)`` when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_legacy_state_dict_round_trip(tmp_path):
    model = perturbed(build_model("unet", **SMALL["unet"]))
    path = tmp_path / "old.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 12}, path)
    with pytest.raises(CheckpointError, match="legacy PyTorch file carries no architecture"):
        load_model(path)
    loaded = load_model(path, architecture="unet", kwargs=SMALL["unet"])
    x = probe_input(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.checkpoint_meta["normalization"]["input"] == "dscm"
    # Converting: a legacy model can be re-saved as a safetensors checkpoint.
    again = load_model(save_checkpoint(tmp_path / "new.safetensors", loaded))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_legacy_shape_mismatch_is_named(tmp_path):
    path = tmp_path / "old.pth"
    torch.save(build_model("unet", **SMALL["unet"]).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"'stem\.1\.weight' has shape \[4, 3, 7, 7\]"):
        load_model(path, architecture="unet", kwargs={"base_filters": 8, "n_down": 2})


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    model = build_model("unet", **SMALL["unet"])
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "hook": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused: not a plain tensor state dict"):
        load_model(evil, architecture="unet", kwargs=SMALL["unet"])
    assert not marker.exists()

    # The same bytes under a .safetensors name are not unpickled at all.
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(evil.read_bytes())
    with pytest.raises(CheckpointError, match=r"not a safetensors file.*PyTorch pickle"):
        load_model(disguised)
    raw = tmp_path / "raw.pth"  # a bare (non-zip) pickle stream
    raw.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        load_model(raw, architecture="unet")
    assert not marker.exists()

    # The payload is live: an unrestricted unpickler (plain pickle, what torch.load does
    # without weights_only) would have run it.
    pickle.loads(raw.read_bytes())
    assert marker.is_dir()


# ------------------------------------------------------------------------------------ devices


def expected_auto() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def test_select_device_auto_and_cpu():
    assert select_device("auto").type == expected_auto()
    assert select_device().type == expected_auto()
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        select_device("banana")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_select_device_unavailable_cuda():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"device '{name}' is not available.*fallback=True"):
            select_device(name)
        with pytest.warns(RuntimeWarning, match="running on the CPU instead"):
            assert select_device(name, fallback=True) == torch.device("cpu")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_select_device_unavailable_mps():
    with pytest.raises(DeviceError, match="MPS"):
        select_device("mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_model_device_fallback(saved):
    path, _ = saved
    with pytest.raises(DeviceError):
        load_model(path, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(path, device="cuda", fallback=True)
    assert any(issubclass(w.category, RuntimeWarning) for w in caught)
    assert next(model.parameters()).device == torch.device("cpu")
    assert load_model(path).checkpoint_meta["architecture"] == "unet"  # device="auto"
