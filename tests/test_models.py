"""Architectures: shapes, parameter counts against formulas, skips, receptive fields, FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_confocal_stain.models import (
    SKIPS,
    AffineGenerator,
    DespeckleNN,
    NLayerDiscriminator,
    ResnetGenerator,
    UNetGenerator,
    available_models,
    build_model,
    count_flops,
    flops_per_pixel,
    model_spec,
    patchgan_receptive_field,
)

torch.manual_seed(0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ hand-computed parameter counts


def despeckle_params(M: int, K: int, N: int) -> int:
    first = N * N * 1 * K + K
    hidden = (M - 1) * (N * N * K * K + K)
    bn_prelu = M * (2 * K + K)  # BatchNorm weight+bias, per-channel PReLU slope
    last = K + 1  # 1×1 conv to one channel
    return first + hidden + bn_prelu + last


def resnet_params(f: int, n: int, R: int) -> int:
    stem = 3 * 49 * f + f
    down = sum(9 * (f * 2**i) * (f * 2 ** (i + 1)) + f * 2 ** (i + 1) for i in range(n))
    C = f * 2**n
    blocks = R * 2 * (9 * C * C + C)
    up = sum(9 * (f * 2 ** (i + 1)) * (f * 2**i) + f * 2**i for i in range(n))
    head = f * 3 * 49 + 3
    return stem + down + blocks + up + head


def unet_params(f: int, n: int, cap: int = 512) -> int:
    c = [min(f * 2**i, cap) for i in range(n + 1)]
    stem = 3 * 49 * c[0] + c[0]
    down = sum(9 * c[i - 1] * c[i] + c[i] for i in range(1, n + 1))
    middle = 9 * c[n] * c[n] + c[n]
    up = sum(9 * (2 * c[k]) * c[k - 1] + c[k - 1] for k in range(1, n + 1))  # concat: 2·c_k in
    head = c[0] * 3 * 49 + 3
    return stem + down + middle + up + head


def patchgan_params(f: int, in_ch: int = 3) -> int:  # n_layers = 3
    return (
        (16 * in_ch * f + f)
        + (16 * f * 2 * f + 2 * f)
        + (16 * 2 * f * 4 * f + 4 * f)
        + (16 * 4 * f * 8 * f + 8 * f)
        + (16 * 8 * f + 1)
    )


def test_despeckle_param_count_thesis_and_combalia():
    assert n_params(DespeckleNN(skip="log-add", layers=3, filters=32, kernel=5)) == 52_417
    assert despeckle_params(3, 32, 5) == 52_417
    assert n_params(build_model("despeckle-thesis")) == despeckle_params(3, 32, 5)
    assert n_params(build_model("despeckle-combalia")) == despeckle_params(7, 64, 3)
    # Dilation changes the receptive field, not the parameter count.
    assert n_params(build_model("despeckle-dilated")) == despeckle_params(7, 64, 3)


@pytest.mark.parametrize(("f", "n", "R"), [(64, 2, 9), (8, 3, 2), (4, 1, 0)])
def test_resnet_param_count(f, n, R):
    assert n_params(ResnetGenerator(base_filters=f, n_down=n, n_blocks=R)) == resnet_params(
        f, n, R
    )


def test_resnet_matches_cyclegan_published_count():
    # CycleGAN's resnet_9blocks with ngf=64 prints "Total number of parameters : 11.378 M".
    assert n_params(build_model("resnet")) == 11_378_179


@pytest.mark.parametrize(("f", "n", "cap"), [(64, 3, 512), (8, 2, 512), (16, 4, 64)])
def test_unet_param_count(f, n, cap):
    model = UNetGenerator(base_filters=f, n_down=n, max_filters=cap)
    assert n_params(model) == unet_params(f, n, cap)


def test_unet_default_param_count():
    assert n_params(build_model("unet")) == 7_024_899 == unet_params(64, 3)


def test_patchgan_param_count():
    assert n_params(NLayerDiscriminator()) == 2_764_737  # CycleGAN's "2.765 M"
    assert n_params(NLayerDiscriminator(base_filters=8)) == patchgan_params(8)


def test_affine_param_count():
    assert n_params(AffineGenerator()) == 3 * 3 + 3


# ---------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("skip", SKIPS)
@pytest.mark.parametrize("size", [(1, 1), (3, 7), (17, 33), (64, 48)])
def test_despeckle_any_size(skip, size):
    model = DespeckleNN(skip=skip, layers=2, filters=4, kernel=5).eval()
    x = torch.rand(2, 1, *size)
    y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1


def test_dilated_despeckle_any_size_and_halo():
    model = DespeckleNN(layers=7, filters=4, kernel=3, dilation=[1, 2, 3, 4, 3, 2, 1]).eval()
    assert [m.dilation for m in model.modules() if isinstance(m, nn.Conv2d)][:7] == [
        (d, d) for d in (1, 2, 3, 4, 3, 2, 1)
    ]
    assert model.halo == 16
    for size in [(2, 3), (5, 9), (40, 31)]:  # smaller than the dilated padding too
        assert model(torch.rand(1, 1, *size)).shape == (1, 1, *size)


def test_despeckle_receptive_field_is_its_halo():
    # Unclamped: a pixel clamped to 0 or 1 would have no gradient at all.
    model = DespeckleNN(layers=3, filters=4, kernel=3, dilation=[1, 2, 3], clamp_output=False)
    model.eval()
    x = torch.rand(1, 1, 41, 41, requires_grad=True)
    model(x)[0, 0, 20, 20].backward()
    rows, cols = np.nonzero(x.grad[0, 0].numpy())
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (14, 26, 14, 26)
    assert model.halo == 6


UNET_SIZES = {1: [(4, 4), (6, 10)], 2: [(8, 8), (24, 16)], 3: [(16, 16), (32, 48), (24, 40)]}


@pytest.mark.parametrize(("n_down", "sizes"), list(UNET_SIZES.items()))
def test_unet_shapes(n_down, sizes):
    model = UNetGenerator(base_filters=4, n_down=n_down)
    for size in sizes:
        y = model(torch.rand(2, 3, *size) * 2 - 1)
        assert y.shape == (2, 3, *size)
        assert y.abs().max() <= 1


@pytest.mark.parametrize("n_down", [2, 3])
def test_resnet_shapes(n_down):
    model = ResnetGenerator(base_filters=4, n_down=n_down, n_blocks=2)
    for size in [(2**n_down * 2, 2**n_down * 2), (32, 56)]:
        y = model(torch.rand(1, 3, *size) * 2 - 1)
        assert y.shape == (1, 3, *size)
        assert y.abs().max() <= 1


@pytest.mark.parametrize(
    "model", [UNetGenerator(base_filters=4, n_down=3), ResnetGenerator(base_filters=4, n_down=3)]
)
@pytest.mark.parametrize("size", [(30, 32), (32, 36), (8, 8)])
def test_deep_generators_reject_bad_sizes(model, size):
    with pytest.raises(ValueError, match=r"multiples of 8 .* at least 16"):
        model(torch.rand(1, 3, *size))


def test_generators_reject_wrong_channels():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        UNetGenerator(base_filters=4)(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        DespeckleNN(filters=2)(torch.rand(1, 3, 16, 16))


def test_affine_any_size():
    model = AffineGenerator()
    for size in [(1, 1), (5, 7)]:
        assert model(torch.rand(1, 3, *size)).shape == (1, 3, *size)


@pytest.mark.parametrize(("size", "out"), [(256, 30), (128, 14), (72, 7)])
def test_patchgan_shapes(size, out):
    assert NLayerDiscriminator(base_filters=4)(torch.rand(2, 3, size, size)).shape == (
        2,
        1,
        out,
        out,
    )


# ------------------------------------------------------------------------------------- structure


def test_unet_skips_are_concatenations_of_the_matching_encoder_level():
    model = UNetGenerator(base_filters=4, n_down=3)
    assert model.channels == (4, 8, 16, 32)
    enc: list[torch.Tensor] = []
    dec_in: list[torch.Tensor] = []
    hooks = [s.register_forward_hook(lambda m, a, o: enc.append(o.clone())) for s in model.down]
    hooks += [
        s.register_forward_pre_hook(lambda m, a: dec_in.append(a[0].clone())) for s in model.up
    ]
    model(torch.rand(1, 3, 32, 32) * 2 - 1)
    for h in hooks:
        h.remove()
    assert [e.shape[1] for e in enc] == [8, 16, 32]
    # up[j] runs at level k = 3 - j on cat(x, e_k): 2·c_k channels, e_k in the second half.
    for j, x in enumerate(dec_in):
        e = enc[len(enc) - 1 - j]
        assert x.shape[1] == 2 * e.shape[1] and x.shape[2:] == e.shape[2:]
        assert torch.equal(x[:, e.shape[1] :], e)
        assert model.up[j][0].in_channels == 2 * e.shape[1]


def test_norm_layers_are_plain_instance_norms_in_order():
    unet = UNetGenerator(base_filters=4, n_down=3)
    resnet = ResnetGenerator(base_filters=4, n_down=2, n_blocks=3)
    assert len(unet.norm_layers()) == 1 + 3 + 1 + 3
    assert len(resnet.norm_layers()) == 1 + 2 + 2 * 3 + 2
    for model in (unet, resnet):
        norms = model.norm_layers()
        assert norms == [m for m in model.modules() if isinstance(m, nn.InstanceNorm2d)]
        assert all(not n.affine and not n.track_running_stats for n in norms)
    # forward order: channel counts along the U-Net
    assert [n.num_features for n in unet.norm_layers()] == [4, 8, 16, 32, 32, 16, 8, 4]
    assert AffineGenerator().norm_layers() == []


def test_generators_use_reflection_padding_only():
    for model in (UNetGenerator(base_filters=4), ResnetGenerator(base_filters=4)):
        for m in model.modules():
            if type(m) is nn.Conv2d:
                assert m.padding == (0, 0), m  # padding is an explicit ReflectionPad2d module
        assert any(isinstance(m, nn.ReflectionPad2d) for m in model.modules())


# ---------------------------------------------------------------------------------------- affine


def gareau_dscm(r: np.ndarray, f: np.ndarray) -> np.ndarray:
    """DSCM = 1 − F·(1 − H) − R·(1 − E), clipped, scaled to [-1, 1] (DESIGN.md constants)."""
    h = np.array([0.30, 0.20, 1.0])
    e = np.array([1.0, 0.55, 0.88])
    dscm = 1 - f[..., None] * (1 - h) - r[..., None] * (1 - e)
    return np.clip(dscm, 0, 1) * 2 - 1


def test_affine_starts_as_identity_on_gareau_dscm():
    rng = np.random.default_rng(1)
    r, f = rng.random((2, 24, 20))
    dscm = torch.from_numpy(gareau_dscm(r, f)).permute(2, 0, 1)[None].float()
    model = AffineGenerator()
    assert torch.equal(model(dscm), dscm)
    assert torch.equal(model.conv.weight[:, :, 0, 0], torch.eye(3))


def test_affine_is_affine_and_clamped():
    model = AffineGenerator()
    with torch.no_grad():
        model.conv.weight.mul_(3.0)
        model.conv.bias.fill_(0.1)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    y = model(x)
    assert y.abs().max() <= 1
    inside = (3 * x + 0.1).abs() < 1
    assert torch.allclose(y[inside], (3 * x + 0.1)[inside])
    assert y[~inside].abs().eq(1).all()


# ------------------------------------------------------------------------------- despeckle skips


def constant_net(model: DespeckleNN, value: float) -> DespeckleNN:
    """Zero the final 1×1 conv's weights so net(·) ≡ value (before the final activation)."""
    last = [m for m in model.net if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(value)
    return model.eval()


@pytest.fixture
def speckled() -> torch.Tensor:
    return torch.rand(2, 1, 12, 10) * 0.98 + 0.01


def test_multiplicative_skip(speckled):
    model = constant_net(DespeckleNN("multiplicative", layers=2, filters=4), 0.5)
    assert torch.allclose(model(speckled), 0.5 * speckled)
    model = constant_net(DespeckleNN("multiplicative", layers=2, filters=4), 0.0)
    assert torch.equal(model(speckled), torch.zeros_like(speckled))


def test_divisive_skip_and_its_guard(speckled):
    model = constant_net(DespeckleNN("divisive", layers=2, filters=4), 2.0)
    assert torch.allclose(model(speckled), speckled / 2)
    for bad in (0.0, -1.0):  # a predicted noise of 0 or below must not give inf/NaN
        model = constant_net(DespeckleNN("divisive", layers=2, filters=4, div_eps=1e-3), bad)
        y = model(speckled)
        assert torch.isfinite(y).all()
        assert torch.allclose(y, (speckled / 1e-3).clamp(0, 1))


def test_log_add_skip(speckled):
    model = DespeckleNN("log-add", layers=2, filters=4)
    seen = []
    model.net.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    constant_net(model, 0.0)
    assert torch.allclose(model(speckled), speckled, atol=1e-6)  # net ≡ 0 → identity
    assert torch.allclose(seen[0], torch.log(speckled + model.eps))  # the net works in log space
    constant_net(model, -0.5)
    want = (speckled + model.eps) * np.exp(-0.5) - model.eps
    assert torch.allclose(model(speckled), want, atol=1e-6)


def test_log_subtract_skip(speckled):
    model = constant_net(DespeckleNN("log-subtract", layers=2, filters=4), 0.5)
    want = (speckled + model.eps) * np.exp(-0.5) - model.eps
    assert torch.allclose(model(speckled), want, atol=1e-6)


def test_output_clamped_and_final_activation(speckled):
    model = constant_net(DespeckleNN("log-add", layers=2, filters=4), 3.0)  # ×e³
    assert model(speckled).max() == 1.0
    model.clamp_output = False
    assert model(speckled).max() > 1.0
    tanh = constant_net(
        DespeckleNN("multiplicative", layers=2, filters=4, final_activation="tanh"), 5.0
    )
    assert torch.allclose(tanh(speckled), speckled * np.tanh(5.0))


def test_despeckle_rejects_bad_config():
    with pytest.raises(ValueError, match="skip"):
        DespeckleNN(skip="additive")
    with pytest.raises(ValueError, match="odd"):
        DespeckleNN(kernel=4)
    with pytest.raises(ValueError, match="dilation"):
        DespeckleNN(layers=3, dilation=[1, 2])
    with pytest.raises(ValueError, match="final_activation"):
        DespeckleNN(final_activation="gelu")


def test_despeckle_presets():
    thesis = build_model("despeckle-thesis").config
    got = (thesis["skip"], thesis["layers"], thesis["filters"], thesis["kernel"])
    assert got == ("log-add", 3, 32, 5)
    combalia = build_model("despeckle-combalia").config
    assert (combalia["skip"], combalia["layers"], combalia["filters"]) == ("multiplicative", 7, 64)
    assert combalia["final_activation"] == "tanh"
    assert isinstance(build_model("despeckle-combalia").net[-1], nn.Tanh)


# --------------------------------------------------------------------------------------- PatchGAN


@pytest.mark.parametrize(("n_layers", "rf"), [(3, 70), (2, 34)])
def test_patchgan_receptive_field_by_gradient(n_layers, rf):
    assert patchgan_receptive_field(n_layers) == rf
    # InstanceNorm couples every output to the whole image through its statistics, so the
    # convolutional receptive field is measured on the same stack without it.
    model = NLayerDiscriminator(base_filters=4, n_layers=n_layers, norm="none")
    assert model.receptive_field == rf
    x = torch.rand(1, 3, 200, 200, requires_grad=True)
    out = model(x)
    i, j = out.shape[2] // 2, out.shape[3] // 2
    out[0, 0, i, j].backward()
    rows, cols = np.nonzero(x.grad[0].abs().sum(0).numpy())
    assert rows.max() - rows.min() + 1 == rf
    assert cols.max() - cols.min() + 1 == rf
    assert rows.min() > 0 and rows.max() < 199  # the window was not cut by the border


def test_patchgan_default_has_instance_norm_and_leaky_relu():
    model = NLayerDiscriminator(base_filters=4)
    kinds = [type(m) for m in model.model]
    assert kinds.count(nn.InstanceNorm2d) == 3
    assert all(m.negative_slope == 0.2 for m in model.model if isinstance(m, nn.LeakyReLU))
    assert all(m.kernel_size == (4, 4) for m in model.model if isinstance(m, nn.Conv2d))


# ------------------------------------------------------------------------------------ FLOPs


def unet_flops_per_pixel(f: int, n: int, cap: int = 512) -> float:
    c = [min(f * 2**i, cap) for i in range(n + 1)]
    macs = 2 * 3 * 49 * c[0]  # stem + head at full resolution
    macs += sum(9 * c[i - 1] * c[i] / 4**i for i in range(1, n + 1))  # outputs at H/2^i
    macs += 9 * c[n] ** 2 / 4**n
    macs += sum(9 * 2 * c[k] * c[k - 1] / 4**k for k in range(1, n + 1))  # inputs at H/2^k
    return 2 * macs


def test_unet_flops_per_pixel_formula():
    model = build_model("unet")
    assert flops_per_pixel(model, (3, 64, 64)) == unet_flops_per_pixel(64, 3) == 443_136
    small = UNetGenerator(base_filters=8, n_down=2)
    assert flops_per_pixel(small, (3, 64, 64)) == unet_flops_per_pixel(8, 2)
    assert flops_per_pixel(small, (3, 32, 96)) == unet_flops_per_pixel(8, 2)  # size-independent
    assert count_flops(small, (3, 32, 32)) == unet_flops_per_pixel(8, 2) * 32 * 32


def test_despeckle_flops_per_pixel():
    model = DespeckleNN(layers=3, filters=32, kernel=5)
    want = 2 * (25 * 32 + 2 * 25 * 32 * 32 + 32)
    assert flops_per_pixel(model, (1, 20, 20)) == want
    assert model.training  # counting restores the mode (BatchNorm stats untouched)


# -------------------------------------------------------------------------------------- registry


def test_registry():
    names = available_models()
    wanted = "unet unet-light resnet affine patchgan despeckle despeckle-thesis " + (
        "despeckle-combalia despeckle-dilated"
    )
    for name in wanted.split():
        assert name in names
        assert isinstance(build_model(name), model_spec(name).cls)
    unet = build_model("unet", base_filters=8, n_down=2)
    assert unet.config["base_filters"] == 8 and unet.n_down == 2
    with pytest.raises(KeyError, match=r"unknown model architecture 'vgg'.*unet"):
        build_model("vgg")
    with pytest.raises(TypeError, match="build_model"):
        build_model("unet", nonsense=1)
    assert model_spec("despeckle").normalization["input"] == "reflectance"
    assert model_spec("unet").normalization == {"input": "dscm", "range": [-1, 1]}
