"""The contract between a layer and the physics of the device that stores its weights.

A layer never knows whether it sits on phase-change memory, RRAM or a photonic mesh. It hands the
device its weights, normalised per tile column to [-1, 1], and asks one question: *which matrix does
this chip instance actually compute at time t?* The answer (:class:`Realisation`) is computed once per
chip instance and drift time and then cached by the layer, so eval-time cost stays a plain matmul.

Devices are frozen dataclasses: their fields are the physical parameters written in the YAML profile,
and adding a device is one new file that subclasses :class:`Device` and registers itself.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from analogllm.config.schema import ConfigError, from_dict

_DEVICES: dict[str, type[Device]] = {}


@dataclass
class Realisation:
    """What one chip instance computes for one layer, in normalised weight units.

    weight:   (T, out, rows) effective weight per input tile (programming noise, drift, levels, mesh
              errors included), normalised so that the ideal value is the target in [-1, 1].
    read_std: same shape, std of the fresh noise added at every read (1/f read noise), or ``None``.
    gain:     scalar applied digitally after the ADC (e.g. photonic loss compensation); drift
              compensation is applied by the layer on top of it.
    reference: for a drifting device realised at t > 0, the weight the same instance had at t = 0
              (what global drift compensation calibrates against), or ``None``: the layer then
              realises the instance again at t = 0.

    The tensors are the caller's: a device returns fresh ones (never its own state), so the layer
    may transform them in place while it builds its tiles.
    """

    weight: torch.Tensor
    read_std: torch.Tensor | None = None
    gain: float = 1.0
    reference: torch.Tensor | None = None


@dataclass(frozen=True)
class Device(abc.ABC):
    """Base class of a device model. Subclasses set ``kind`` and override :meth:`realise`."""

    kind: ClassVar[str] = ""
    #: what a tile is physically called in reports and exports ("crossbar" or "mesh")
    array: ClassVar[str] = "crossbar"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _DEVICES[cls.kind] = cls

    @property
    def is_ideal(self) -> bool:
        """True when the device computes the target weights exactly (no noise, drift or levels)."""
        return False

    @property
    def drifts(self) -> bool:
        """True when :meth:`realise` depends on the time since programming."""
        return False

    @abc.abstractmethod
    def realise(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        """Return what this chip instance computes for ``weight`` ((T, out, rows), in [-1, 1]).

        ``generator`` is freshly seeded from the chip seed for every call, so a device must draw its
        random numbers in a fixed order: realising the same layer at two drift times then sees the
        same programmed conductances, which is what makes drift of one chip instance consistent.
        """

    def realise_consuming(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        """:meth:`realise` for a caller that no longer needs ``weight``: the device may write its result
        over it, so programming a large layer holds one copy less. A device that does so returns the
        reference itself whenever it drifts (the caller cannot realise ``weight`` again at t = 0)."""
        return self.realise(weight, seconds, generator)

    @property
    def closed_loop(self) -> bool:
        """True when a layer on this device can be programmed in closed loop: exactly when
        :meth:`programming_draws` gives draws (a device with stuck cells states a programming model but
        gives none), so the mapping stores input moments only where the programmer will use them."""
        return self.programming_draws(0, torch.Generator()) is not None

    def programming_draws(self, numel: int, generator: torch.Generator) -> tuple[torch.Tensor, ...] | None:
        """The random draws that decide what ``numel`` devices' pairs hold right after programming, taken
        from ``generator`` exactly as :meth:`realise` takes them (flat, in its order), or None when this
        device cannot be programmed in closed loop (:mod:`analogllm.chip.compensate` then leaves the
        targets as they are). Drawing them first is what lets a programmer aim later rows at the measured
        error of earlier ones and still get the very chip :meth:`realise` makes from the final targets."""
        return None

    def programmed(self, weight: torch.Tensor, draws: tuple[torch.Tensor, ...]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What pairs with normalised targets ``weight`` hold right after programming, given the matching
        elements of :meth:`programming_draws`: (held, what they would hold without programming noise (a
        level grid's point, say), the variance of the programming noise, the variance of one verify
        read), all in normalised units."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-loop programming model")

    def summary(self) -> str:
        """Key parameters in a few words, for ``analogllm profiles``."""
        return "exact"

    def output_var_terms(self) -> tuple[float, float]:
        """(a, b) of the device's own output-noise variance a·|y| + b for a noiseless output y in
        normalised units (a: e.g. detector shot noise, b: thermal noise); (0, 0) when it has none.
        Two numbers rather than a function so the fused read kernel can apply them too."""
        return 0.0, 0.0

    @property
    def output_noise(self) -> bool:
        """True when reads carry the device's own output noise (:meth:`output_var` is not None)."""
        return self.output_var_terms() != (0.0, 0.0)

    def output_var(self, y: torch.Tensor) -> torch.Tensor | None:
        """The variance a·|y| + b of :meth:`output_var_terms` for ``y``; None when the device has none."""
        a, b = self.output_var_terms()
        if a == 0 and b == 0:
            return None
        return y.detach().abs().mul_(a).add_(b)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


class Replay(Device):
    """A device programmed from stored targets (an exported map) instead of from the weight.

    Subclasses hold the device model they replay as a ``physics`` field and realise from their own
    data; drift and output noise are the physics' own.
    """

    physics: Device

    @property
    def drifts(self) -> bool:
        return self.physics.drifts

    def output_var_terms(self) -> tuple[float, float]:
        return self.physics.output_var_terms()


def device_names() -> list[str]:
    """Names of all registered device kinds."""
    _load_builtin()
    return sorted(_DEVICES)


def device_from_dict(data: Any, where: str = "device") -> Device:
    """Build a device from ``{"kind": NAME, **params}``; unknown kinds and fields are clear errors."""
    _load_builtin()
    if isinstance(data, Device):
        return data
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"{where}: expected a mapping with a 'kind' ({', '.join(sorted(_DEVICES))})")
    params = dict(data)
    kind = params.pop("kind")
    if kind not in _DEVICES:
        raise ConfigError(f"{where}.kind: unknown device {kind!r}; known devices: {', '.join(sorted(_DEVICES))}")
    return from_dict(_DEVICES[kind], params, where)


def _load_builtin() -> None:
    # Importing the modules registers them; done lazily so base has no import cycle with them.
    from analogllm.devices import ideal, pcm, photonic, rram  # noqa: F401
