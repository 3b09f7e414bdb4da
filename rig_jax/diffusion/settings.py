"""Frozen settings of the samplers, inversions and the editor.

They replace long keyword lists: a settings object is hashable, so it is the static
argument of a jitted function and the key of a compile cache as it stands. Values are
checked once, when the object is built. There are no defaults here: the defaults live
in the config (`configs/common.py`), and `from_config` turns a config section (any
object with attribute access, e.g. an `ml_collections.ConfigDict`) into settings,
refusing a missing or unknown field with one line that names it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from rig_jax.errors import ConfigError

S = TypeVar("S")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _count(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field}: must be an integer >= {minimum}, got {value!r}")
    return value


def _real(value: Any, field: str, low: float | None = None, high: float | None = None) -> float:
    if not _number(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else ""
        raise ConfigError(f"{field}: must be a finite number{bounds}, got {value!r}")
    return float(value)


def _set(obj: Any, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def _from_section(cls: type[S], section: Any, name: str, **nested: Any) -> S:
    """`cls(**section)` with the section's fields checked both ways and errors named `name.field`."""
    keys = set(section.keys()) if hasattr(section, "keys") else set(vars(section))
    fields = {f.name for f in dataclasses.fields(cls)}
    surplus = sorted(keys - fields - set(nested))
    if surplus:
        raise ConfigError(f"{name}.{surplus[0]}: unknown field (expected {sorted(fields)})")
    missing = sorted(fields - keys - set(nested))
    if missing:
        raise ConfigError(f"{name}.{missing[0]}: missing field")
    values = {f: nested[f] if f in nested else section[f] if hasattr(section, "keys") else getattr(section, f)
              for f in fields}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{name}.{e}") from None


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Guided DDIM: `num_steps` of the schedule, CFG scale (exactly 1 runs the conditional half
    only), DDIM `eta` (> 0: the stochastic policy, needs an rng) and diffusers' `guidance_rescale`."""

    num_steps: int
    guidance_scale: float
    eta: float
    guidance_rescale: float

    def __post_init__(self) -> None:
        _set(self, num_steps=_count(self.num_steps, "num_steps", 1),
             guidance_scale=_real(self.guidance_scale, "guidance_scale"),
             eta=_real(self.eta, "eta", 0.0),
             guidance_rescale=_real(self.guidance_rescale, "guidance_rescale", 0.0, 1.0))

    @classmethod
    def from_config(cls, section: Any, name: str = "sampler") -> SamplerSettings:
        return _from_section(cls, section, name)


@dataclasses.dataclass(frozen=True)
class InversionSettings:
    """DDIM inversion: its guidance (`w_inv`; 1 = the conditional prediction alone) and the
    fixed-point refinements per step (0 = plain DDIM inversion)."""

    guidance_scale: float
    fixed_point_iterations: int

    def __post_init__(self) -> None:
        _set(self, guidance_scale=_real(self.guidance_scale, "guidance_scale"),
             fixed_point_iterations=_count(self.fixed_point_iterations, "fixed_point_iterations", 0))

    @classmethod
    def from_config(cls, section: Any, name: str = "inversion") -> InversionSettings:
        return _from_section(cls, section, name)


@dataclasses.dataclass(frozen=True)
class NullTextSettings:
    """Null-text optimisation: off, or at most `inner_steps` Adam iterations per step at
    `learning_rate` (decayed over the steps), stopping below `early_stop_epsilon + i *
    early_stop_slope` (see `null_text_invert`)."""

    enabled: bool
    inner_steps: int
    learning_rate: float
    early_stop_epsilon: float
    early_stop_slope: float

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"enabled: must be True or False, got {self.enabled!r}")
        _set(self, inner_steps=_count(self.inner_steps, "inner_steps", 0),
             learning_rate=_real(self.learning_rate, "learning_rate", 0.0),
             early_stop_epsilon=_real(self.early_stop_epsilon, "early_stop_epsilon", 0.0),
             early_stop_slope=_real(self.early_stop_slope, "early_stop_slope", 0.0))

    @classmethod
    def from_config(cls, section: Any, name: str = "null_text") -> NullTextSettings:
        return _from_section(cls, section, name)


@dataclasses.dataclass(frozen=True)
class EditSettings:
    """The Inverse Diffuser: invert to t_s = `strength` * T (counted like img2img over
    `sampler.num_steps`), optionally tune the null text, then denoise with `sampler`."""

    strength: float
    sampler: SamplerSettings
    inversion: InversionSettings
    null_text: NullTextSettings

    def __post_init__(self) -> None:
        _set(self, strength=_real(self.strength, "strength", 0.0, 1.0))
        for field, kind in (("sampler", SamplerSettings), ("inversion", InversionSettings),
                            ("null_text", NullTextSettings)):
            value = getattr(self, field)
            if not isinstance(value, kind):
                raise ConfigError(f"{field}: expected {kind.__name__}, got {type(value).__name__}")

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    @classmethod
    def from_config(cls, section: Any, name: str = "editor") -> EditSettings:
        """`config.editor` with subsections `sampler`, `inversion`, `null_text`."""
        nested = {}
        for field, kind in (("sampler", SamplerSettings), ("inversion", InversionSettings),
                            ("null_text", NullTextSettings)):
            try:
                sub = section[field] if hasattr(section, "keys") else getattr(section, field)
            except (KeyError, AttributeError):
                raise ConfigError(f"{name}.{field}: missing section") from None
            nested[field] = kind.from_config(sub, f"{name}.{field}")
        return _from_section(cls, section, name, **nested)
