"""The method's parameters, declared once per recipe (DESIGN sections 1-4, 6, 7).

Every stage reads them from one :class:`Method`, and everything a stage produces records them: checkpoints
(``stage.json``), trajectory caches (their key) and registered models (``model.json``). Whoever reads such an
artifact (evaluation, upscaling, a cached distillation) takes the parameters from it with :meth:`Method.from_record`
and refuses a mismatch with :func:`disagreements`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from oftsr.degrade import KINDS


@dataclasses.dataclass(frozen=True)
class Method:
    """Scale and degradation of the measurement, start noise, training crop, knob range and network preset.

    Attributes:
        sf: scale factor (4).
        degradation: ``bicubic``, ``avgpool`` or ``realesrgan`` (:mod:`oftsr.degrade`; the realesrgan chain's
            settings are the data plane's ``data.realesrgan``).
        sigma_y: measurement noise in [-1, 1] units, added in LR space (0 for the noiseless settings).
        sigma_p: noise of the start ``x0 = sqrt(1 - sigma_p^2) x_lr + sigma_p eps``.
        crop: HR training and evaluation crop (a multiple of ``sf``).
        t_min, t_max: the knob's trained range (distillation times, boundary velocity at ``t_min``).
        preset: the network preset (:data:`oftsr.nets.PRESETS`).
    """

    sf: int = 4
    degradation: str = "bicubic"
    sigma_y: float = 0.0
    sigma_p: float = 0.2
    crop: int = 256
    t_min: float = 0.01
    t_max: float = 0.99
    preset: str = "tiny"

    def __post_init__(self) -> None:
        from oftsr.nets import PRESETS

        if not isinstance(self.sf, int) or self.sf < 1:
            raise ValueError(f"method.sf must be a positive integer, got {self.sf!r}")
        if self.degradation not in KINDS:
            raise ValueError(f"method.degradation must be one of {KINDS}, got {self.degradation!r}")
        if self.sigma_y < 0:
            raise ValueError(f"method.sigma_y must be >= 0, got {self.sigma_y}")
        if self.degradation == "realesrgan" and self.sigma_y:
            raise ValueError("method.sigma_y must be 0 with the realesrgan degradation (its chain draws the noise)")
        if not 0.0 <= self.sigma_p <= 1.0:
            raise ValueError(f"method.sigma_p must lie in [0, 1], got {self.sigma_p}")
        if self.crop < 1 or self.crop % self.sf:
            raise ValueError(f"method.crop must be a positive multiple of sf={self.sf}, got {self.crop}")
        if not 0.0 < self.t_min < self.t_max <= 1.0:
            raise ValueError(f"method.t_min / t_max need 0 < t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.preset not in PRESETS:
            raise ValueError(f"method.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str = "the record") -> Method:
        """The method recorded in a checkpoint's or a model's metadata; a record without all of the fields (written
        before they were recorded) is refused, naming the missing ones, instead of guessed."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in record]
        if missing:
            raise ValueError(f"{where} does not record the method parameter(s) {', '.join(missing)}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        cast = {"int": int, "float": float, "str": str}
        return cls(**{n: cast[types[n]](record[n]) for n in names})


def disagreements(expected: Method, record: Mapping[str, Any], fields: tuple[str, ...] | None = None) -> list[str]:
    """``["sigma_p: 0.2 here, 0.3 there", ...]`` for each field of ``expected`` that ``record`` holds with another
    value (fields it does not hold are not compared)."""
    names = fields or tuple(f.name for f in dataclasses.fields(expected))
    out = []
    for name in names:
        if name not in record:
            continue
        mine, theirs = getattr(expected, name), record[name]
        same = abs(float(mine) - float(theirs)) < 1e-9 if isinstance(mine, float) else mine == type(mine)(theirs)
        if not same:
            out.append(f"{name}: {mine!r} here, {theirs!r} there")
    return out


def check_agrees(expected: Method, record: Mapping[str, Any], what: str, fields: tuple[str, ...] | None = None) -> None:
    """Raise ``ValueError`` naming every disagreeing field of ``record`` (read from ``what``)."""
    bad = disagreements(expected, record, fields)
    if bad:
        raise ValueError(f"{what} was made with other method parameters: {'; '.join(bad)}")
