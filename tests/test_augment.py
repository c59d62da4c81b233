"""Differentiable siamese augmentation (astkit.augment)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from astkit.augment import GROUPS, STRATEGY_DEFAULT, DSA, DSAParams, build_augmentation
from astkit.errors import UserError


def _x(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _color(n, b=0.0, s=1.0, c=1.0, dtype=torch.float64):
    full = lambda v: torch.full((n,), float(v), dtype=dtype)  # noqa: E731
    return DSAParams(["color"], {"brightness": full(b), "saturation": full(s), "contrast": full(c)})


def _ref_crop(x, t_rows, t_cols):
    """The reference DSA ``rand_crop`` (pad + gather) with given translations."""
    n, _, h, w = x.shape
    gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(h), torch.arange(w), indexing="ij")
    gx = torch.clamp(gx + t_rows.view(n, 1, 1) + 1, 0, h + 1)
    gy = torch.clamp(gy + t_cols.view(n, 1, 1) + 1, 0, w + 1)
    xp = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return xp.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def _ref_cutout(x, off_rows, off_cols, ratio=0.5):
    """The reference DSA ``rand_cutout`` with given offsets."""
    n, _, h, w = x.shape
    cs = int(h * ratio + 0.5), int(w * ratio + 0.5)
    gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(cs[0]), torch.arange(cs[1]), indexing="ij")
    gx = torch.clamp(gx + off_rows.view(n, 1, 1) - cs[0] // 2, min=0, max=h - 1)
    gy = torch.clamp(gy + off_cols.view(n, 1, 1) - cs[1] // 2, min=0, max=w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


def _ref_affine(x, theta2x2):
    """The reference DSA scale/rotate: ``affine_grid`` + ``grid_sample``, align_corners=True."""
    theta = torch.cat([theta2x2, torch.zeros(x.shape[0], 2, 1, dtype=x.dtype)], 2)
    return F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=True), align_corners=True)


# ------------------------------------------------------------------ formulas


def test_brightness_adds_exactly():
    x = _x(3, 3, 5, 4)
    b = torch.tensor([-0.5, 0.0, 0.25], dtype=x.dtype)
    p = _color(3)
    p.values["brightness"] = b
    torch.testing.assert_close(DSA("color").apply(x, p), x + b.view(3, 1, 1, 1), rtol=0, atol=1e-12)


def test_saturation_formula():
    x = _x(2, 3, 4, 5)
    s = torch.tensor([0.3, 1.7], dtype=x.dtype)
    p = _color(2)
    p.values["saturation"] = s
    m = x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(DSA("color").apply(x, p), (x - m) * s.view(2, 1, 1, 1) + m, rtol=0, atol=1e-12)


def test_contrast_formula():
    x = _x(2, 3, 4, 5)
    c = torch.tensor([0.6, 1.4], dtype=x.dtype)
    p = _color(2)
    p.values["contrast"] = c
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    torch.testing.assert_close(DSA("color").apply(x, p), (x - m) * c.view(2, 1, 1, 1) + m, rtol=0, atol=1e-12)


def test_color_chain_is_linear_and_unclamped():
    x = _x(2, 3, 4, 4) * 5  # normalised data: well outside [0, 1]
    b, s, c = 0.3, 1.8, 1.3
    y = x + b
    m = y.mean(dim=1, keepdim=True)
    y = (y - m) * s + m
    m = y.mean(dim=[1, 2, 3], keepdim=True)
    y = (y - m) * c + m
    out = DSA("color").apply(x, _color(2, b, s, c))
    torch.testing.assert_close(out, y, rtol=0, atol=1e-12)
    assert out.min() < -1 and out.max() > 2


def test_flip_equals_torch_flip():
    x = _x(4, 3, 5, 6)
    f = torch.tensor([True, False, True, False])
    out = DSA("flip").apply(x, DSAParams(["flip"], {"flip": f}))
    assert torch.equal(out[f], torch.flip(x[f], dims=[3]))
    assert torch.equal(out[~f], x[~f])


def test_crop_shift_moves_pixels_and_zero_fills():
    x = _x(2, 1, 5, 7) + 10  # no zeros in the input
    d = DSA("crop")
    out = d.apply(x, DSAParams(["crop"], {"shift": torch.tensor([[1, 0], [0, -2]])}))
    # sample 0: one pixel right
    assert torch.equal(out[0, :, :, 1:], x[0, :, :, :-1])
    assert torch.equal(out[0, :, :, 0], torch.zeros_like(out[0, :, :, 0]))
    # sample 1: two pixels up
    assert torch.equal(out[1, :, :-2, :], x[1, :, 2:, :])
    assert torch.equal(out[1, :, -2:, :], torch.zeros_like(out[1, :, -2:, :]))
    zero = d.apply(x, DSAParams(["crop"], {"shift": torch.zeros(2, 2, dtype=torch.long)}))
    assert torch.equal(zero, x)


def test_crop_matches_reference():
    x = _x(6, 3, 8, 11)
    shift = torch.tensor([[1, -1], [-3, 2], [0, 0], [11, 0], [2, -8], [-1, 1]])
    out = DSA("crop").apply(x, DSAParams(["crop"], {"shift": shift}))
    # the reference reads in[y + t]: content moves by -t
    assert torch.equal(out, _ref_crop(x, -shift[:, 1], -shift[:, 0]))


def test_cutout_zeroes_expected_square():
    x = _x(1, 2, 6, 8) + 10
    d = DSA("cutout")  # size int(side * 0.5 + 0.5): 4 wide, 3 high
    out = d.apply(x, DSAParams(["cutout"], {"cutout_center": torch.tensor([[3, 2]])}))
    hole = torch.zeros(6, 8, dtype=torch.bool)
    hole[2 - 3 // 2: 2 - 3 // 2 + 3, 3 - 4 // 2: 3 - 4 // 2 + 4] = True
    assert torch.equal(out[:, :, hole], torch.zeros_like(out[:, :, hole]))
    assert torch.equal(out[:, :, ~hole], x[:, :, ~hole])
    # clipped at the border
    out = d.apply(x, DSAParams(["cutout"], {"cutout_center": torch.tensor([[0, 6]])}))
    assert torch.equal((out[0, 0] == 0).nonzero(), torch.tensor([[5, 0], [5, 1]]))  # row 5, cols 0-1


def test_cutout_matches_reference():
    for h, w in [(8, 8), (7, 10)]:
        x = _x(5, 3, h, w)
        cy = torch.tensor([0, h - 1, h // 2, 1, h])
        cx = torch.tensor([w, 0, w // 2, w - 2, 3])
        out = DSA("cutout").apply(x, DSAParams(["cutout"], {"cutout_center": torch.stack([cx, cy], 1)}))
        assert torch.equal(out, _ref_cutout(x, cy, cx))


def test_unit_scale_and_zero_angle_are_identity():
    x = _x(3, 3, 7, 9, dtype=torch.float32)
    one = DSA("scale").apply(x, DSAParams(["scale"], {"scale": torch.ones(3, 2)}))
    zero = DSA("rotate").apply(x, DSAParams(["rotate"], {"angle": torch.zeros(3)}))
    torch.testing.assert_close(one, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(zero, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw", [(8, 8), (6, 9)])
def test_scale_matches_reference(hw):
    x = _x(4, 3, *hw)
    s = torch.tensor([[1.2, 1 / 1.2], [0.9, 0.9], [1.1, 1.0], [1 / 1.2, 1.15]], dtype=x.dtype)
    out = DSA("scale").apply(x, DSAParams(["scale"], {"scale": s}))
    torch.testing.assert_close(out, _ref_affine(x, torch.diag_embed(s)), rtol=0, atol=1e-10)


def test_rotate_matches_reference_on_square_images():
    x = _x(4, 3, 9, 9)
    a = torch.tensor([-15.0, -4.0, 7.5, 15.0], dtype=x.dtype)
    t = a / 180 * math.pi
    theta = torch.stack([torch.stack([t.cos(), -t.sin()], 1), torch.stack([t.sin(), t.cos()], 1)], 1)
    out = DSA("rotate").apply(x, DSAParams(["rotate"], {"angle": a}))
    torch.testing.assert_close(out, _ref_affine(x, theta), rtol=0, atol=1e-10)


def test_rotate_90_on_non_square_image_is_a_true_rotation():
    # 90 degrees about the centre of a 5x7 image maps the centre row onto the centre column
    x = torch.zeros(1, 1, 5, 7, dtype=torch.float64)
    x[0, 0, 2, :] = 1.0
    out = DSA("rotate").apply(x, DSAParams(["rotate"], {"angle": torch.tensor([90.0], dtype=x.dtype)}))
    expected = torch.zeros(5, 7, dtype=x.dtype)
    expected[:, 3] = 1.0
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-10)


# ------------------------------------------------------------------ sampling


def test_sample_ranges_and_shapes():
    n, h, w = 4000, 16, 24
    d = DSA(STRATEGY_DEFAULT, "multiple")
    p = d.sample((n, 3, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert list(p.group) == list(GROUPS)
    v = p.values
    for k in ("brightness", "saturation", "contrast", "angle", "flip"):
        assert v[k].shape == (n,)
    for k in ("shift", "cutout_center", "scale"):
        assert v[k].shape == (n, 2)
    assert v["brightness"].dtype == torch.float64 and v["shift"].dtype == torch.long
    assert -0.5 <= v["brightness"].min() and v["brightness"].max() < 0.5
    assert 0 <= v["saturation"].min() and v["saturation"].max() < 2.0
    assert 0.5 <= v["contrast"].min() and v["contrast"].max() < 1.5
    assert 1 / 1.2 <= v["scale"].min() and v["scale"].max() <= 1.2
    assert -15 <= v["angle"].min() and v["angle"].max() <= 15 and v["angle"].abs().max() > 14
    assert 0.45 < v["flip"].double().mean() < 0.55
    # crop: bounds int(side * 0.125 + 0.5), inclusive, per axis
    assert set(v["shift"][:, 0].tolist()) == set(range(-3, 4))
    assert set(v["shift"][:, 1].tolist()) == set(range(-2, 3))
    # cutout (12 x 8, both even): centre in [0, side]
    assert set(v["cutout_center"][:, 0].tolist()) == set(range(0, w + 1))
    assert set(v["cutout_center"][:, 1].tolist()) == set(range(0, h + 1))


def test_single_mode_picks_one_group_per_call_and_all_over_many():
    d = DSA()
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        p = d.sample((2, 3, 8, 8), generator=g)
        assert len(p.group) == 1
        seen.add(p.group[0])
    assert seen == set(GROUPS)


def test_multiple_mode_applies_every_group_in_order():
    d = DSA("flip_color", "multiple")
    x = _x(2, 3, 4, 4)
    p = d.sample(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    assert list(p.group) == ["flip", "color"]
    expected = DSA("color").apply(DSA("flip").apply(x, DSAParams(["flip"], p.values)), DSAParams(["color"], p.values))
    assert torch.equal(d.apply(x, p), expected)


def test_same_seed_same_output_and_different_seed_differs():
    x = _x(8, 3, 12, 12, dtype=torch.float32)
    for strategy in [*GROUPS, STRATEGY_DEFAULT]:
        d = DSA(strategy, "multiple")
        a = d(x, generator=torch.Generator().manual_seed(7))
        b = d(x, generator=torch.Generator().manual_seed(7))
        c = d(x, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b), strategy
        assert not torch.equal(a, c), strategy


def test_global_rng_when_no_generator():
    x = _x(4, 3, 8, 8, dtype=torch.float32)
    d = DSA(mode="multiple")
    torch.manual_seed(123)
    a = d(x)
    torch.manual_seed(123)
    assert torch.equal(a, d(x))


# ------------------------------------------------------------------ siamese replay


def test_siamese_replay_gives_the_same_transform():
    d = DSA(STRATEGY_DEFAULT, "multiple")
    x1 = _x(5, 3, 10, 12, seed=1)
    x2 = _x(5, 3, 10, 12, seed=2)
    x2[0] = x1[0]  # one shared sample
    p = d.sample(x1.shape, generator=torch.Generator().manual_seed(0), dtype=x1.dtype)
    y1, y2 = d.apply(x1, p), d.apply(x2, p)
    assert torch.equal(y1[0], y2[0])
    assert not torch.equal(y1[1:], y2[1:])
    assert torch.equal(d.apply(x1, p), y1)  # deterministic
    # the geometric part is one linear map applied to both batches
    g = DSA("crop_cutout_flip_scale_rotate", "multiple")
    q = g.sample(x1.shape, generator=torch.Generator().manual_seed(1), dtype=x1.dtype)
    torch.testing.assert_close(g.apply(x1 + 2 * x2, q), g.apply(x1, q) + 2 * g.apply(x2, q))


def test_params_replay_across_dtypes():
    d = DSA(STRATEGY_DEFAULT, "multiple")
    x = _x(3, 3, 8, 8)
    p = d.sample(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y32 = d.apply(x.float(), p)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, d.apply(x, p).float(), rtol=0, atol=1e-5)


def test_batch_size_mismatch_raises():
    d = DSA("flip")
    p = d.sample((3, 1, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        d.apply(torch.zeros(2, 1, 4, 4), p)


# ------------------------------------------------------------------ gradients


def _grad_params(group):
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return {
        "color": {"brightness": f64([0.2]), "saturation": f64([1.5]), "contrast": f64([0.7])},
        "crop": {"shift": torch.tensor([[1, -2]])},
        "cutout": {"cutout_center": torch.tensor([[2, 3]])},
        "flip": {"flip": torch.tensor([True])},
        "scale": {"scale": f64([[1.13, 0.87]])},
        "rotate": {"angle": f64([11.0])},
    }[group]


@pytest.mark.parametrize("group", GROUPS)
def test_gradcheck_every_group(group):
    d = DSA(group)
    values = _grad_params(group)
    p = DSAParams([group], values)
    c = 3 if group == "color" else 1
    x = _x(1, c, 6, 7).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: d.apply(t, p), (x,), eps=1e-6, atol=1e-6)
    x.grad = None
    d.apply(x, p).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_cutout_gradient_is_a_mask():
    d = DSA("cutout")
    x = _x(1, 1, 6, 6).requires_grad_(True)
    p = DSAParams(["cutout"], {"cutout_center": torch.tensor([[3, 3]])})
    d.apply(x, p).sum().backward()
    assert set(x.grad.unique().tolist()) == {0.0, 1.0}
    assert int((x.grad == 0).sum()) == 9


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize("strategy", ["color_blur", "color__crop", "Color", "translation"])
def test_bad_strategy_raises_user_error(strategy):
    with pytest.raises(UserError) as e:
        DSA(strategy)
    msg = str(e.value)
    assert "\n" not in msg and "color" in msg and "rotate" in msg


def test_bad_mode_raises_user_error():
    with pytest.raises(UserError, match="double.*single.*multiple"):
        DSA(mode="double")
    with pytest.raises(UserError, match="double"):
        build_augmentation("color", "double")


def test_bad_magnitude_raises_user_error():
    with pytest.raises(UserError, match="zoom"):
        build_augmentation("scale", zoom=2.0)
    with pytest.raises(UserError, match="flip"):
        DSA(flip=1.5)


@pytest.mark.parametrize("strategy", [None, "", "none", "None"])
def test_identity_strategy_returns_input(strategy):
    d = build_augmentation(strategy)
    assert not d.enabled
    x = _x(2, 3, 4, 4)
    assert d(x, generator=torch.Generator().manual_seed(0)) is x
    assert d.apply(x, d.sample(x.shape)) is x
    assert "none" in repr(d)


def test_build_augmentation_passes_mode_and_magnitudes():
    d = build_augmentation("rotate_scale", "multiple", rotate=5.0)
    assert d.enabled and d.mode == "multiple" and d.rotate == 5.0 and d.groups == ("rotate", "scale")
    assert "rotate_scale" in repr(d) and "multiple" in repr(d)
    p = d.sample((500, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert p.values["angle"].abs().max() <= 5.0
