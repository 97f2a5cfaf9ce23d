"""Physics-aware training: forward on the hardware, backward through its digital twin.

Wright et al. (Nature 2022) train physical systems by running the forward pass on the system itself
and computing the backward pass as the vector-Jacobian product of a differentiable *digital twin*
evaluated at the same inputs. The loss (and every activation) is the hardware's, so training corrects
for everything the hardware really does, while the gradient only needs a model that is roughly right.

Here the hardware is anything that implements :class:`HardwareBackend`: it is asked to program a
weight matrix into a named layer and to run inputs through it. The digital parts of the network
(embeddings, norms, attention softmax, the digital LoRA adapters, the LM head) run on the host as
usual. Inside :func:`on_hardware` every analogue 2-D layer of the model (``AnalogLinear`` /
``AnalogConv1D``, base and analogue adapters alike) sends its matmul to the backend; under autograd its
backward is the twin's VJP:

    forward:  y = hw(x) + b                    (hardware output, no graph through the hardware)
    backward: ∂L/∂x = ∂L/∂y · W,   ∂L/∂W = (∂L/∂y)ᵀ · x   (twin: the ideal layer x·Wᵀ the chip was asked for)

The twin is the layer's own target matrix W, so the backward needs nothing from the hardware and keeps
only x (and only when W itself trains, i.e. for analogue adapters). Weights are (re)programmed whenever
they changed since the last program call, which for a frozen base is once.

:class:`SimulatedChip` is the built-in backend: the model's own programmed ``AnalogMatrix`` instances in
eval mode (programming noise, drift, converters, fresh read noise at every call). A lab plugs in its chip
by implementing the two methods. Layers that are not 2-D carriers (MoE 3-D experts, weight-side
parametrizations such as Mamba's ``dt_proj``) stay on the in-model simulation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from analogllm.chip import deployed
from analogllm.nn.linear import AnalogConv1D, AnalogLinear

_PEFT_PREFIX = "base_model.model."


@runtime_checkable
class HardwareBackend(Protocol):
    """An analogue chip as seen from the host, one layer (array or group of tiles) at a time.

    ``name`` is the layer's module name in the original model (peft's ``base_model.model.`` prefix and
    ``.base_layer`` suffix removed; analogue adapters are ``<layer>.lora_A.<adapter>`` etc.).
    """

    def program(self, name: str, weight: torch.Tensor) -> None:
        """Write the (out, in) matrix ``weight`` into layer ``name`` (replacing what it held)."""
        ...

    def matmul(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Run the (N, in) inputs through layer ``name`` and return its (N, out) outputs (no bias;
        converters, noise and digital scales included, as the chip's periphery delivers them)."""
        ...


def layer_name(module_name: str) -> str:
    """The hardware name of a module: the original model's name, without peft's wrapping."""
    name = module_name[len(_PEFT_PREFIX):] if module_name.startswith(_PEFT_PREFIX) else module_name
    return name.replace(".base_layer", "")


def hardware_layers(model: nn.Module) -> dict[str, AnalogLinear | AnalogConv1D]:
    """Hardware name → module of every layer that runs on the backend."""
    return {layer_name(n): m for n, m in model.named_modules() if isinstance(m, (AnalogLinear, AnalogConv1D))}


class SimulatedChip:
    """The built-in backend: the model's own programmed ``AnalogMatrix`` of each layer, in chip mode.

    ``program`` makes sure the layer's chip state is the programming of ``weight`` (same chip seed and
    drift time; a changed weight is written anew, as ``AnalogMatrix.chip`` does); ``matmul`` is the
    deployed chip's forward with fresh read noise.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = hardware_layers(model)
        if not self.layers:
            raise ValueError("model has no analogue 2-D layers (AnalogLinear / AnalogConv1D) to run on a chip")
        self.programs = 0

    def _layer(self, name: str) -> AnalogLinear | AnalogConv1D:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"the simulated chip has no layer {name!r}") from None

    def program(self, name: str, weight: torch.Tensor) -> None:
        layer = self._layer(name)
        if weight.data_ptr() != layer.analog_weight().data_ptr():
            raise ValueError(f"{name}: the simulated chip programs the layer's own weight tensor")
        layer.analog.ensure_programmed(layer.analog_weight())
        self.programs += 1

    @torch.no_grad()
    def matmul(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = self._layer(name)
        analog = layer.analog
        was = analog.mode
        analog.mode = "chip"  # the chip, whatever mode the layer trains in
        try:
            return analog(x, layer.analog_weight(), None)
        finally:
            analog.mode = was


class _HardwareMatmul(torch.autograd.Function):
    """y = hardware(x) in forward; the twin x·Wᵀ's vector-Jacobian product in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]):  # type: ignore[override]
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return run(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = (g @ weight.to(g.dtype)).view(*grad.shape[:-1], weight.shape[-1]) if ctx.needs_input_grad[0] else None
        dw = (g.T @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class HardwareSession:
    """Book-keeping of one :func:`on_hardware` context: what is programmed, how often the chip ran."""

    def __init__(self, backend: HardwareBackend) -> None:
        self.backend = backend
        self.programmed: dict[str, tuple[int, int]] = {}
        self.calls = 0

    def ensure_programmed(self, name: str, weight: torch.Tensor) -> None:
        key = (weight._version, weight.data_ptr())
        if self.programmed.get(name) != key:
            self.backend.program(name, weight.detach())
            self.programmed[name] = key

    def forward(self, name: str, module: AnalogLinear | AnalogConv1D, x: torch.Tensor) -> torch.Tensor:
        if module.analog.mode == "digital":  # the host's exact product (the KV prefix, calibration capture)
            return type(module).forward(module, x)
        weight = module.analog_weight()
        self.ensure_programmed(name, weight)
        self.calls += 1

        def run(inp: torch.Tensor) -> torch.Tensor:
            flat = inp.detach().reshape(-1, inp.shape[-1])
            return self.backend.matmul(name, flat).reshape(*inp.shape[:-1], weight.shape[0]).to(inp.dtype)

        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            if module.analog.chip.deployed:
                raise ValueError("physics-aware training needs the digital twin's weights, which analogllm.deploy_ "
                                 "freed; train by backprop or zeroth-order, or use a model programmed with program_")
            y = _HardwareMatmul.apply(x, weight, run)
        else:
            with torch.no_grad():
                y = run(x)
        bias = module.bias
        return y if bias is None else y + bias


@contextmanager
def on_hardware(model: nn.Module, backend: HardwareBackend | None = None) -> Iterator[HardwareSession]:
    """Run every analogue 2-D layer of ``model`` on ``backend`` (default: :class:`SimulatedChip`), with
    the twin's VJP as backward. Programs every layer on entry; restores the layers' forwards on exit."""
    if backend is not None and deployed(model):
        raise ValueError("analogllm.deploy_ freed this model's digital weights, so there is nothing to program into "
                         f"{type(backend).__name__}; use a model programmed with program_")
    backend = SimulatedChip(model) if backend is None else backend
    if not isinstance(backend, HardwareBackend):
        raise TypeError(f"{type(backend).__name__} is not a HardwareBackend: it needs program(name, weight) "
                        "and matmul(name, x)")
    session = HardwareSession(backend)
    layers = hardware_layers(model)
    patched: list[nn.Module] = []
    try:
        for name, module in layers.items():
            session.ensure_programmed(name, module.analog_weight())
            module.forward = (lambda x, _n=name, _m=module: session.forward(_n, _m, x))  # type: ignore[method-assign]
            patched.append(module)
        yield session
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


__all__ = ["HardwareBackend", "HardwareSession", "SimulatedChip", "hardware_layers", "layer_name", "on_hardware"]
