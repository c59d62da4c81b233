"""Differentiable Siamese Augmentation (DSA) built on kornia.

A port of the ``DiffAugment`` used by DSA (Zhao & Bilen, 2021) and by
MTT/AST dataset distillation. Every op is differentiable with respect to the
images and vectorised over the batch. The random parameters of a call are
sampled once into a :class:`DSAParams`, so the same transform can be replayed
on another batch (the "siamese" part).

Groups (``strategy`` is a ``_``-separated list of them):

``color``   brightness ``x + b``, then saturation ``(x - mean_c) * s + mean_c``,
            then contrast ``(x - mean_chw) * c + mean_chw``; linear, unclamped
            (the inputs are already normalised).
``crop``    integer translation with zero fill (the reference's pad + crop).
``cutout``  zero one square per sample.
``flip``    horizontal flip per sample.
``scale``   per-axis scaling about the image centre.
``rotate``  rotation about the image centre.

Mode ``"single"`` (the MTT/AST default) applies one group per call, chosen
uniformly; ``"multiple"`` applies every group in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from kornia.geometry.transform import warp_affine

from astkit.errors import UserError

__all__ = ["STRATEGY_DEFAULT", "GROUPS", "MODES", "DSAParams", "DSA", "build_augmentation"]

STRATEGY_DEFAULT = "color_crop_cutout_flip_scale_rotate"
#: Valid group names, in the reference's order.
GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
#: Valid modes; "S"/"M" are the reference's (``ParamDiffAug.aug_mode``) spellings.
MODES = ("single", "multiple")
_MODE_ALIASES = {"single": "single", "multiple": "multiple", "s": "single", "m": "multiple"}
_IDENTITY = ("", "none")
_MAGNITUDES = ("scale", "rotate", "crop", "cutout", "brightness", "saturation", "contrast", "flip")


@dataclass
class DSAParams:
    """Everything sampled for one call, so it can be replayed on another batch.

    ``group`` lists the groups applied, in order. ``values`` holds the
    per-sample parameters (first dimension = batch size ``N``):

    - ``brightness`` (N,) additive offset; ``saturation`` (N,) and
      ``contrast`` (N,) multiplicative factors;
    - ``shift`` (N, 2) int64 ``(dx, dy)`` in pixels: content moves right/down;
    - ``cutout_center`` (N, 2) int64 ``(cx, cy)``, centre of the zeroed square;
    - ``flip`` (N,) bool; ``scale`` (N, 2) ``(sx, sy)``; ``angle`` (N,) degrees.
    """

    group: list[str] | tuple = field(default_factory=list)
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int | None:
        """``N`` of the tensors in ``values`` (None when there are none)."""
        for v in self.values.values():
            return int(v.shape[0])
        return None


def _parse_strategy(strategy: str | None) -> tuple[str, ...]:
    if strategy is None:
        return ()
    if not isinstance(strategy, str):
        raise UserError(f"augment strategy must be a string, got {type(strategy).__name__}")
    s = strategy.strip()
    if s.lower() in _IDENTITY:
        return ()
    groups = tuple(g.strip() for g in s.split("_"))
    for g in groups:
        if g not in GROUPS:
            raise UserError(
                f"unknown augment group {g!r} in strategy {strategy!r}; valid groups: "
                f"{', '.join(GROUPS)} (joined by '_'), or 'none'"
            )
    return groups


class DSA:
    """Differentiable siamese augmentation: ``DSA(strategy, mode)(x, generator=g)``.

    Magnitudes follow the reference ``ParamDiffAug``: ``scale`` (ratio, factors
    in ``[1/scale, scale]``), ``rotate`` (max degrees), ``crop`` (max shift as a
    fraction of the side), ``cutout`` (square side as a fraction of the side),
    ``brightness``, ``saturation``, ``contrast`` and ``flip`` (probability).
    An empty or ``"none"`` strategy is the identity (``enabled`` is False).
    """

    def __init__(
        self,
        strategy: str = STRATEGY_DEFAULT,
        mode: str = "single",
        *,
        scale: float = 1.2,
        rotate: float = 15.0,
        crop: float = 0.125,
        cutout: float = 0.5,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        flip: float = 0.5,
    ) -> None:
        self.groups = _parse_strategy(strategy)
        m = _MODE_ALIASES.get(mode.strip().lower()) if isinstance(mode, str) else None
        if m is None:
            raise UserError(f"unknown augment mode {mode!r}; valid modes: {', '.join(MODES)}")
        self.mode = m
        mags = dict(scale=scale, rotate=rotate, crop=crop, cutout=cutout, brightness=brightness,
                    saturation=saturation, contrast=contrast, flip=flip)
        for k, v in mags.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UserError(f"augment magnitude {k}={v!r} must be a finite number >= 0")
        if scale <= 0:
            raise UserError(f"augment magnitude scale={scale!r} must be > 0")
        if flip > 1:
            raise UserError(f"augment magnitude flip={flip!r} is a probability, must be in [0, 1]")
        self.scale, self.rotate, self.crop, self.cutout = float(scale), float(rotate), float(crop), float(cutout)
        self.brightness, self.saturation, self.contrast = float(brightness), float(saturation), float(contrast)
        self.flip = float(flip)

    @property
    def strategy(self) -> str:
        """The normalised strategy string (``"none"`` for the identity)."""
        return "_".join(self.groups) or "none"

    @property
    def enabled(self) -> bool:
        """False for the identity strategy."""
        return bool(self.groups)

    def __repr__(self) -> str:
        if not self.enabled:
            return "DSA(strategy='none')"
        mags = ", ".join(f"{k}={getattr(self, k):g}" for k in _MAGNITUDES)
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r}, {mags})"

    # ----------------------------------------------------------------- sampling

    def sample(self, x_shape: torch.Size | tuple, *, generator: torch.Generator | None = None,
               device=None, dtype=None) -> DSAParams:
        """Draw the parameters of one call for a batch of shape ``(N, C, H, W)``.

        Sampling happens on the generator's device (CPU for ``None``, the global
        RNG) and the result is moved to ``device``; float values get ``dtype``
        (default: torch's default dtype).
        """
        if len(x_shape) != 4:
            raise ValueError(f"DSA expects a (N, C, H, W) shape, got {tuple(x_shape)}")
        if not self.groups:
            return DSAParams([], {})
        n, _, h, w = (int(s) for s in x_shape)
        dtype = dtype or torch.get_default_dtype()
        gdev = generator.device if generator is not None else torch.device("cpu")
        kw = dict(generator=generator, device=gdev)
        if self.mode == "single":
            i = int(torch.randint(len(self.groups), (1,), **kw).item()) if len(self.groups) > 1 else 0
            groups = [self.groups[i]]
        else:
            groups = list(self.groups)
        vals: dict[str, torch.Tensor] = {}
        for g in groups:
            if g == "color":
                r = torch.rand(3, n, dtype=dtype, **kw)
                vals["brightness"] = (r[0] - 0.5) * self.brightness
                vals["saturation"] = r[1] * self.saturation
                vals["contrast"] = r[2] + self.contrast
            elif g == "crop":
                bx, by = int(w * self.crop + 0.5), int(h * self.crop + 0.5)
                dx = torch.randint(-bx, bx + 1, (n,), **kw)
                dy = torch.randint(-by, by + 1, (n,), **kw)
                vals["shift"] = torch.stack([dx, dy], 1)
            elif g == "cutout":
                cw, ch = self._cutout_size(h, w)
                # Reference: centre in [0, side + (1 - size % 2)).
                cx = torch.randint(0, w + (1 - cw % 2), (n,), **kw)
                cy = torch.randint(0, h + (1 - ch % 2), (n,), **kw)
                vals["cutout_center"] = torch.stack([cx, cy], 1)
            elif g == "flip":
                vals["flip"] = torch.rand(n, **kw) < self.flip
            elif g == "scale":
                lo = 1.0 / self.scale
                vals["scale"] = torch.rand(n, 2, dtype=dtype, **kw) * (self.scale - lo) + lo
            elif g == "rotate":
                vals["angle"] = (torch.rand(n, dtype=dtype, **kw) - 0.5) * (2 * self.rotate)
        if device is not None:
            vals = {k: v.to(device) for k, v in vals.items()}
        return DSAParams(groups, vals)

    def _cutout_size(self, h: int, w: int) -> tuple[int, int]:
        return int(w * self.cutout + 0.5), int(h * self.cutout + 0.5)

    # ----------------------------------------------------------------- applying

    def apply(self, x: torch.Tensor, params: DSAParams) -> torch.Tensor:
        """Apply the transform described by ``params`` (deterministic, differentiable).

        The same ``params`` on two batches of the same shape give the identical
        transform (siamese augmentation).
        """
        if not params.group:
            return x
        if x.dim() != 4:
            raise ValueError(f"DSA expects a (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        nb = params.batch_size
        if nb is not None and nb != x.shape[0]:
            raise ValueError(f"DSA params were sampled for a batch of {nb}, got a batch of {x.shape[0]}")
        v = params.values

        def f(key: str) -> torch.Tensor:  # float parameter on x's device/dtype
            return v[key].to(device=x.device, dtype=x.dtype)

        for g in params.group:
            if g == "color":
                x = _brightness(x, f("brightness"))
                x = _saturation(x, f("saturation"))
                x = _contrast(x, f("contrast"))
            elif g == "crop":
                x = _translate(x, v["shift"].to(x.device, torch.long))
            elif g == "cutout":
                cw, ch = self._cutout_size(x.shape[2], x.shape[3])
                x = _cutout(x, v["cutout_center"].to(x.device, torch.long), cw, ch)
            elif g == "flip":
                x = _flip(x, v["flip"].to(x.device, torch.bool))
            elif g == "scale":
                x = _scale(x, f("scale"))
            elif g == "rotate":
                x = _rotate(x, f("angle"))
            else:
                raise UserError(f"unknown augment group {g!r} in DSAParams; valid groups: {', '.join(GROUPS)}")
        return x

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample parameters for ``x`` and apply them."""
        if not self.groups:
            return x
        return self.apply(x, self.sample(x.shape, generator=generator, device=x.device, dtype=x.dtype))


def build_augmentation(strategy: str | None, mode: str = "single", **magnitudes) -> DSA:
    """A :class:`DSA` from config values; ``None``, ``""`` or ``"none"`` give the identity."""
    bad = sorted(set(magnitudes) - set(_MAGNITUDES))
    if bad:
        raise UserError(f"unknown augment magnitude(s) {', '.join(bad)}; valid: {', '.join(_MAGNITUDES)}")
    return DSA("" if strategy is None else strategy, mode, **magnitudes)


# --------------------------------------------------------------------- the ops
# Each takes x (N, C, H, W) and per-sample parameters on x's device.


def _brightness(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x + b.view(-1, 1, 1, 1)


def _saturation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * s.view(-1, 1, 1, 1) + m


def _contrast(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * c.view(-1, 1, 1, 1) + m


def _translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[..., y, x] = in[..., y - dy, x - dx]``, zero outside: one pad + one gather."""
    n, c, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1))  # out-of-range reads are clamped onto this zero border
    rows = (torch.arange(h, device=x.device) + 1 - shift[:, 1:2]).clamp_(0, h + 1)  # (N, H)
    cols = (torch.arange(w, device=x.device) + 1 - shift[:, 0:1]).clamp_(0, w + 1)  # (N, W)
    idx = (rows.unsqueeze(2) * (w + 2) + cols.unsqueeze(1)).view(n, 1, h * w).expand(n, c, h * w)
    return xp.reshape(n, c, -1).gather(2, idx).view(n, c, h, w)


def _cutout(x: torch.Tensor, center: torch.Tensor, cw: int, ch: int) -> torch.Tensor:
    """Zero the ``ch x cw`` square starting at ``center - size // 2`` (clipped to the image)."""
    _, _, h, w = x.shape
    x0 = (center[:, 0] - cw // 2).unsqueeze(1)
    y0 = (center[:, 1] - ch // 2).unsqueeze(1)
    xs = torch.arange(w, device=x.device)
    ys = torch.arange(h, device=x.device)
    in_x = (xs >= x0) & (xs < x0 + cw)  # (N, W)
    in_y = (ys >= y0) & (ys < y0 + ch)  # (N, H)
    keep = ~(in_y.unsqueeze(2) & in_x.unsqueeze(1))  # (N, H, W)
    return x * keep.unsqueeze(1).to(x.dtype)


def _flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def _warp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Warp by the source->destination linear map ``m`` (N, 2, 2) about the image centre.

    ``out(c + m (p - c)) = in(p)``, i.e. ``out(q) = in(c + m^-1 (q - c))``; pixel
    coordinates, ``align_corners=True`` (pixel centres at the corners of the
    normalised grid, as the reference's ``affine_grid``), bilinear, zero padding.
    """
    _, _, h, w = x.shape
    c = x.new_tensor([(w - 1) / 2.0, (h - 1) / 2.0])
    t = c - m @ c  # (N, 2)
    return warp_affine(x, torch.cat([m, t.unsqueeze(2)], 2), (h, w), mode="bilinear",
                       padding_mode="zeros", align_corners=True)


def _scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``out(q) = in(c + diag(sx, sy) (q - c))``: factors > 1 shrink the content (as the reference)."""
    return _warp(x, torch.diag_embed(s.reciprocal()))


def _rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """``out(q) = in(c + R(angle) (q - c))``, pixel coordinates with y down (the reference's theta)."""
    t = torch.deg2rad(angle)
    cos, sin = torch.cos(t), torch.sin(t)
    # source->destination is R(-angle)
    return _warp(x, torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1))
