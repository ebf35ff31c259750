"""Tests for mctool.data.augment: parameter ranges, exact op definitions, replay, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mctool.data.augment import DEFAULT_STRATEGY, DSA, OPS, AugParams, crop_shift, cutout_size
from mctool.core.errors import UsageError


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def sample_op(op: str, batch: int, h: int, w: int, seed: int = 0) -> AugParams:
    """Draw parameters for one specific op (a single-op strategy always picks it)."""
    p = DSA(op).sample(batch, h, w, gen(seed))
    assert p.op == op
    return p


def rand_images(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic random images."""
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


# ---------------------------------------------------------------- construction


def test_default_strategy_has_six_ops() -> None:
    assert DSA().ops == OPS
    assert DSA(DEFAULT_STRATEGY).ops == ("color", "crop", "cutout", "flip", "scale", "rotate")


def test_flip_false_drops_flip() -> None:
    dsa = DSA(flip=False)
    assert "flip" not in dsa.ops and len(dsa.ops) == 5
    g = gen(3)
    assert all(dsa.sample(2, 8, 8, g).op != "flip" for _ in range(600))
    # a strategy made only of flip becomes the identity
    assert DSA("flip", flip=False).sample(4, 8, 8, gen()).op == "none"


@pytest.mark.parametrize("bad", ["color_blur", "", "Color", "crop__flip", "noise"])
def test_unknown_op_is_usage_error(bad: str) -> None:
    with pytest.raises(UsageError):
        DSA(bad)


@pytest.mark.parametrize("strategy", ["none", "None"])
def test_none_is_identity(strategy: str) -> None:
    dsa = DSA(strategy)
    x = rand_images(3, 3, 8, 8)
    p = dsa.sample(3, 8, 8, gen())
    assert p.op == "none" and p.values == {}
    assert torch.equal(dsa.apply(x, p), x)
    assert torch.equal(dsa(x, gen()), x)


def test_op_choice_is_uniform() -> None:
    dsa = DSA()
    g = gen(5)
    n = 6000
    counts = {op: 0 for op in OPS}
    for _ in range(n):
        counts[dsa.sample(1, 8, 8, g).op] += 1
    for op in OPS:  # expected 1000 each, std ≈ 29
        assert abs(counts[op] - n / 6) < 150, counts


def test_apply_checks_shapes() -> None:
    dsa = DSA("flip")
    p = dsa.sample(2, 8, 8, gen())
    with pytest.raises(ValueError):
        dsa.apply(rand_images(3, 3, 8, 8), p)  # batch mismatch
    with pytest.raises(ValueError):
        dsa.apply(rand_images(3, 8, 8), p)  # not 4-D


# ---------------------------------------------------------------- parameter ranges


def test_sizes_match_reference() -> None:
    assert crop_shift(32) == 4 and crop_shift(64) == 8 and crop_shift(28) == 4
    assert cutout_size(32) == 16 and cutout_size(64) == 32 and cutout_size(28) == 14


@pytest.mark.parametrize(("h", "w"), [(32, 32), (32, 64)])
def test_crop_ranges(h: int, w: int) -> None:
    p = sample_op("crop", 20000, h, w)
    for key, s in (("tx", crop_shift(h)), ("ty", crop_shift(w))):
        v = p.values[key]
        assert v.dtype == torch.int64
        assert int(v.min()) == -s and int(v.max()) == s  # both extremes reachable, no more
        assert set(v.tolist()) == set(range(-s, s + 1))


@pytest.mark.parametrize(("h", "w"), [(32, 32), (30, 64)])  # 30 px: odd cutout side 15
def test_cutout_ranges(h: int, w: int) -> None:
    p = sample_op("cutout", 20000, h, w)
    for key, size in (("ox", h), ("oy", w)):
        v = p.values[key]
        hi = size - cutout_size(size) % 2  # range [0, size + 1 - c%2)
        assert int(v.min()) == 0 and int(v.max()) == hi
        assert set(v.tolist()) == set(range(0, hi + 1))


def test_color_ranges() -> None:
    p = sample_op("color", 20000, 8, 8)
    assert set(p.values) == {"brightness", "saturation", "contrast"}
    for v in p.values.values():
        assert float(v.min()) >= 0.0 and float(v.max()) < 1.0
        assert float(v.min()) < 0.01 and float(v.max()) > 0.99
    # three independent draws, not one shared
    assert not torch.equal(p.values["brightness"], p.values["saturation"])


def test_flip_fraction() -> None:
    v = sample_op("flip", 20000, 8, 8).values["flip"]
    assert v.dtype == torch.bool
    assert abs(v.float().mean().item() - 0.5) < 0.02  # std ≈ 0.0035


def test_scale_ranges() -> None:
    p = sample_op("scale", 20000, 8, 8)
    for key in ("sx", "sy"):
        v = p.values[key]
        assert float(v.min()) >= 1 / 1.2 - 1e-6 and float(v.max()) <= 1.2 + 1e-6
        assert float(v.min()) < 1 / 1.2 + 0.01 and float(v.max()) > 1.2 - 0.01
    assert not torch.equal(p.values["sx"], p.values["sy"])


def test_rotate_ranges() -> None:
    deg = torch.rad2deg(sample_op("rotate", 20000, 8, 8).values["angle"])
    assert float(deg.min()) >= -15.0 - 1e-4 and float(deg.max()) <= 15.0 + 1e-4
    assert float(deg.min()) < -14.9 and float(deg.max()) > 14.9


def test_params_are_small_cpu_tensors() -> None:
    dsa = DSA()
    g = gen(7)
    for _ in range(50):
        p = dsa.sample(5, 16, 16, g)
        for v in p.values.values():
            assert v.device.type == "cpu" and v.shape == (5,)


# ---------------------------------------------------------------- exact op definitions


def test_color_matches_formulas(device: torch.device) -> None:
    x = rand_images(2, 3, 5, 7, dtype=torch.float64).to(device)
    rb = torch.tensor([0.1, 0.9], dtype=torch.float64)
    rs = torch.tensor([0.3, 0.75], dtype=torch.float64)
    rc = torch.tensor([0.0, 0.6], dtype=torch.float64)
    out = DSA().apply(x, AugParams("color", {"brightness": rb, "saturation": rs, "contrast": rc})).cpu()
    x = x.cpu()
    for i in range(2):
        y = x[i] + (rb[i] - 0.5) * 1.0
        m = y.mean(dim=0, keepdim=True)
        y = (y - m) * (2 * rs[i]) + m
        m = y.mean()
        y = (y - m) * (rc[i] + 0.5) + m
        torch.testing.assert_close(out[i], y, rtol=0, atol=1e-12)


def test_saturation_on_one_channel_is_identity(device: torch.device) -> None:
    x = rand_images(2, 1, 6, 6, dtype=torch.float64).to(device)
    half = torch.full((2,), 0.5, dtype=torch.float64)  # brightness 0, contrast ×1
    sat = torch.tensor([0.0, 0.9], dtype=torch.float64)
    p = AugParams("color", {"brightness": half, "saturation": sat, "contrast": half})
    torch.testing.assert_close(DSA().apply(x, p), x, rtol=0, atol=1e-12)


def manual_shift(img: torch.Tensor, tx: int, ty: int) -> torch.Tensor:
    """out[:, i, j] = img[:, i + tx, j + ty] inside, else 0 — written with loops."""
    out = torch.zeros_like(img)
    _, h, w = img.shape
    for i in range(h):
        for j in range(w):
            if 0 <= i + tx < h and 0 <= j + ty < w:
                out[:, i, j] = img[:, i + tx, j + ty]
    return out


def test_crop_is_exact_shift_with_zero_fill(device: torch.device) -> None:
    x = rand_images(4, 3, 6, 9) + 10.0  # nonzero everywhere, so fill zeros are visible
    tx = torch.tensor([0, 1, -2, 6])  # 6 = H: everything shifted out
    ty = torch.tensor([0, -3, 2, 0])
    out = DSA().apply(x.to(device), AugParams("crop", {"tx": tx, "ty": ty})).cpu()
    for i in range(4):
        assert torch.equal(out[i], manual_shift(x[i], int(tx[i]), int(ty[i])))
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[3], torch.zeros_like(x[3]))


def test_cutout_zeroes_the_right_square(device: torch.device) -> None:
    h, w = 8, 10  # sizes 4 and 5
    x = rand_images(3, 2, h, w) + 10.0
    ox = torch.tensor([4, 0, 8])
    oy = torch.tensor([5, 9, 0])
    out = DSA().apply(x.to(device), AugParams("cutout", {"ox": ox, "oy": oy})).cpu()
    ch, cw = cutout_size(h), cutout_size(w)
    for i in range(3):
        r0, c0 = int(ox[i]) - ch // 2, int(oy[i]) - cw // 2
        expect = x[i].clone()
        expect[:, max(r0, 0) : max(r0 + ch, 0), max(c0, 0) : max(c0 + cw, 0)] = 0
        assert torch.equal(out[i], expect)
    # sample 0: rows 2..5, cols 3..7 (interior, full square, all channels)
    assert (out[0] == 0).sum() == 2 * ch * cw
    assert (out[0, :, 2:6, 3:8] == 0).all()
    # sample 1: rows 0..1 (clipped at top), cols 7..9 (clipped at right)
    assert (out[1] == 0).sum() == 2 * 2 * 3


def test_flip_matches_torch_flip(device: torch.device) -> None:
    x = rand_images(4, 3, 5, 7)
    flags = torch.tensor([True, False, True, False])
    out = DSA().apply(x.to(device), AugParams("flip", {"flip": flags})).cpu()
    for i in range(4):
        assert torch.equal(out[i], torch.flip(x[i], dims=[2]) if flags[i] else x[i])


def test_unit_scale_and_zero_rotation_are_identity(device: torch.device) -> None:
    x = rand_images(2, 3, 8, 12, dtype=torch.float64).to(device)
    one = torch.ones(2, dtype=torch.float64)
    dsa = DSA()
    torch.testing.assert_close(dsa.apply(x, AugParams("scale", {"sx": one, "sy": one})), x)
    torch.testing.assert_close(dsa.apply(x, AugParams("rotate", {"angle": one * 0})), x)


def test_scale_matches_affine_grid_definition(device: torch.device) -> None:
    # sx scales the sampling grid: output column j reads input at normalised sx·u
    h, w = 5, 9
    x = torch.arange(w, dtype=torch.float64).repeat(1, 1, h, 1)  # value = column index
    p = AugParams("scale", {"sx": torch.tensor([0.5]), "sy": torch.tensor([1.0])})
    out = DSA().apply(x.to(device), p).cpu()
    u = torch.linspace(-1, 1, w, dtype=torch.float64)
    expect = (0.5 * u + 1) / 2 * (w - 1)  # linear ramp sampled at the scaled positions
    torch.testing.assert_close(out[0, 0, 2], expect)


def test_rotate_by_90_degrees_is_rot90(device: torch.device) -> None:
    x = rand_images(1, 2, 7, 7, dtype=torch.float64)
    quarter = torch.tensor([math.pi / 2], dtype=torch.float64)
    out = DSA().apply(x.to(device), AugParams("rotate", {"angle": quarter})).cpu()
    hits = [k for k in (1, 3) if torch.allclose(out, torch.rot90(x, k, dims=(2, 3)), atol=1e-9)]
    assert len(hits) == 1


def test_rotation_is_rigid_on_non_square_images(device: torch.device) -> None:
    # A pattern around the centre pixel rotates by 90° to the same place on a 9×9 and a
    # 9×13 image: the aspect correction keeps the rotation rigid in pixel space.
    def centred(h: int, w: int) -> torch.Tensor:
        x = torch.zeros(1, 1, h, w, dtype=torch.float64)
        ci, cj = (h - 1) // 2, (w - 1) // 2
        x[0, 0, ci, cj + 2] = 1.0
        x[0, 0, ci + 1, cj] = 2.0
        return x

    p = AugParams("rotate", {"angle": torch.tensor([math.pi / 2], dtype=torch.float64)})
    sq = DSA().apply(centred(9, 9).to(device), p)[0, 0, 2:7, 2:7].cpu()
    rect = DSA().apply(centred(9, 13).to(device), p)[0, 0, 2:7, 4:9].cpu()
    torch.testing.assert_close(rect, sq, atol=1e-9, rtol=0)
    assert sorted(rect.flatten().tolist())[-2:] == pytest.approx([1.0, 2.0])


# ---------------------------------------------------------------- replay and determinism


def test_sample_repeatable_with_same_seed() -> None:
    dsa = DSA()
    a, b = gen(42), gen(42)
    for _ in range(30):
        pa, pb = dsa.sample(6, 16, 16, a), dsa.sample(6, 16, 16, b)
        assert pa.op == pb.op and pa.values.keys() == pb.values.keys()
        assert all(torch.equal(pa.values[k], pb.values[k]) for k in pa.values)


def test_call_repeatable_and_apply_replays(device: torch.device) -> None:
    dsa = DSA()
    x = rand_images(4, 3, 16, 16).to(device)
    seen = set()
    g = gen(9)
    for seed in range(40):
        assert torch.equal(dsa(x, gen(seed)), dsa(x, gen(seed)))
        p = dsa.sample(4, 16, 16, g)
        seen.add(p.op)
        first = dsa.apply(x, p)
        with torch.no_grad():
            nograd = dsa.apply(x, p)
        assert torch.equal(first, dsa.apply(x, p))
        assert torch.equal(first, nograd)  # pass 1 without graph == pass 2 with graph
    assert seen == set(OPS)


def test_replay_with_graph_after_no_grad_pass(device: torch.device) -> None:
    dsa = DSA()
    x = rand_images(3, 3, 8, 8).to(device).requires_grad_()
    g = gen(11)
    for _ in range(20):
        p = dsa.sample(3, 8, 8, g)
        with torch.no_grad():
            y0 = dsa.apply(x, p)
        y1 = dsa.apply(x, p)
        assert torch.equal(y0, y1.detach())
        if p.op != "none":
            (grad,) = torch.autograd.grad(y1.sum(), x)
            assert torch.isfinite(grad).all()


@pytest.mark.parametrize("op", OPS)
def test_float32_and_float64_agree(op: str, device: torch.device) -> None:
    x32 = rand_images(3, 3, 12, 10).to(device)
    p = sample_op(op, 3, 12, 10, seed=4)
    out32 = DSA().apply(x32, p)
    out64 = DSA().apply(x32.to(torch.float64), p)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    torch.testing.assert_close(out32.to(torch.float64), out64, atol=1e-5, rtol=1e-5)


def test_params_to_moves_and_casts() -> None:
    p = sample_op("crop", 3, 8, 8)
    q = p.to("cpu", torch.float64)
    assert q.values["tx"].dtype == torch.int64  # integer shifts stay integer
    r = sample_op("rotate", 3, 8, 8).to("cpu", torch.float64)
    assert r.values["angle"].dtype == torch.float64
    assert p.batch == 3 and AugParams("none").batch is None


# ---------------------------------------------------------------- differentiability


def fixed_params() -> dict[str, AugParams]:
    """Hand-picked params per op for a 2×3×8×8 batch (each sample different)."""
    f64 = torch.float64
    return {
        "color": AugParams(
            "color",
            {
                "brightness": torch.tensor([0.2, 0.8], dtype=f64),
                "saturation": torch.tensor([0.1, 0.7], dtype=f64),
                "contrast": torch.tensor([0.4, 0.95], dtype=f64),
            },
        ),
        "crop": AugParams("crop", {"tx": torch.tensor([2, -1]), "ty": torch.tensor([-3, 0])}),
        "cutout": AugParams("cutout", {"ox": torch.tensor([3, 8]), "oy": torch.tensor([0, 5])}),
        "flip": AugParams("flip", {"flip": torch.tensor([True, False])}),
        "scale": AugParams(
            "scale",
            {"sx": torch.tensor([0.9, 1.15], dtype=f64), "sy": torch.tensor([1.1, 0.85], dtype=f64)},
        ),
        "rotate": AugParams("rotate", {"angle": torch.tensor([0.2, -0.25], dtype=f64)}),
    }


@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op: str, device: torch.device) -> None:
    # With the parameters fixed every op is affine in x (grid_sample's bilinear weights
    # depend only on the grid, not on x), so finite differences are exact up to rounding
    # and gradcheck's default tolerances apply without any kinks to avoid.
    x = rand_images(2, 3, 8, 8, dtype=torch.float64).to(device).requires_grad_()
    p = fixed_params()[op]
    dsa = DSA()
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, p), (x,))


@pytest.mark.parametrize("op", ["color", "rotate"])
def test_gradgradcheck(op: str, device: torch.device) -> None:
    # MCT's second pass differentiates a gradient that flows back through the DSA op.
    x = rand_images(1, 2, 6, 6, dtype=torch.float64).to(device).requires_grad_()
    p = fixed_params()[op]
    p = AugParams(p.op, {k: v[:1] for k, v in p.values.items()})
    assert torch.autograd.gradgradcheck(lambda t: DSA().apply(t, p) ** 2, (x,))
