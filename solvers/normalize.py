"""Spectral or weight normalization of a fixed-point map's linear layers, the DEQ way: the
normalized weight is recomputed once per solve (`reset_norm`), not at every one of the loop's
evaluations.

    apply_spectral_norm(cell, generator=g)      # every nn.Linear of `cell`: weight_orig * g / sigma
    apply_weight_norm(cell)                     # or: weight_v * g / ||row of weight_v||
    reset_norm(cell)                            # before each solve
    remove_norm(cell)                           # bake the normalized weights back into parameters

Weight normalization (Salimans & Kingma 2016) follows torchdeq's `WeightNorm` for nn.Linear (a
norm per output row, the learned scale started at the row's norm, or a fixed `target_norm`, and
an optional clip of the factor g / ||v||).

Miyato et al., "Spectral Normalization for Generative Adversarial Networks", ICLR 2018; the DEQ
variant (a learned scale per output row, started at `target_norm`, recomputed once per forward)
follows torchdeq's `torchdeq.norm` (same weights from the same power-iteration vectors, tested),
except that the starting vectors come from a `torch.Generator` you pass, not from the global RNG.
sigma is estimated by `n_power_iterations` steps per reset in training mode (none in eval mode).
`weight` is a plain attribute computed by reset_norm: call it again after loading a state dict or
moving / casting the module (`.double()` converts weight_orig, not the derived weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_STATE = "_spectral_norm"  # attribute on a normalized module: its settings


def apply_spectral_norm(module: nn.Module, *, target_norm: float = 1.0, learn_scale: bool = True,
                        n_power_iterations: int = 1, generator: torch.Generator | None = None,
                        skip: tuple[str, ...] = ()) -> list[str]:
    """Normalize the weight of every nn.Linear in `module` (but those whose qualified name contains
    a string of `skip`); returns the names of the layers it normalized."""
    if not target_norm > 0 or isinstance(n_power_iterations, bool) or n_power_iterations < 1:
        raise ValueError(f"need target_norm > 0 and n_power_iterations >= 1, got {target_norm}, {n_power_iterations}")
    done = []
    for name, layer in _plain_linears(module, skip):
        weight = layer.weight
        h, w = weight.shape
        draw = lambda n: F.normalize(torch.randn(n, generator=generator, dtype=weight.dtype).to(weight.device),
                                     dim=0, eps=1e-12)
        u, v = draw(h), draw(w)
        del layer.weight
        layer.register_parameter("weight_orig", weight)
        if learn_scale:
            layer.register_parameter("weight_g", nn.Parameter(torch.full((h, 1), float(target_norm),
                                                                          dtype=weight.dtype, device=weight.device)))
        layer.register_buffer("weight_u", u)
        layer.register_buffer("weight_v", v)
        setattr(layer, _STATE, {"kind": "spectral", "target_norm": float(target_norm), "learn_scale": learn_scale,
                                "n_power_iterations": n_power_iterations})
        layer.weight = _normalized(layer, power=False)
        done.append(name)
    return done


def apply_weight_norm(module: nn.Module, *, target_norm: float = 1.0, learn_scale: bool = True,
                      clip: float | None = None, skip: tuple[str, ...] = ()) -> list[str]:
    """Weight-normalize every nn.Linear in `module` (but those whose qualified name contains a
    string of `skip`): weight = weight_v * factor, factor = g / ||weight_v row|| (g learned,
    started at the row norms) or target_norm / ||row|| (learn_scale=False), at most `clip` if
    given. Returns the names of the layers it normalized."""
    if not target_norm > 0 or (clip is not None and not clip > 0):
        raise ValueError(f"need target_norm > 0 and clip > 0 (or None), got {target_norm}, {clip}")
    done = []
    for name, layer in _plain_linears(module, skip):
        weight = layer.weight
        del layer.weight
        layer.register_parameter("weight_v", weight)
        if learn_scale:
            layer.register_parameter("weight_g", nn.Parameter(_row_norms(weight).detach().clone()))
        setattr(layer, _STATE, {"kind": "weight", "target_norm": float(target_norm), "learn_scale": learn_scale,
                                "clip": None if clip is None else float(clip)})
        layer.weight = _normalized(layer, power=False)
        done.append(name)
    return done


def _plain_linears(module: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers of `module` not yet normalized, but those whose name contains a `skip`."""
    return [(name, layer) for name, layer in module.named_modules()
            if isinstance(layer, nn.Linear) and not any(s in name for s in skip) and not hasattr(layer, _STATE)]


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.norm(dim=1, keepdim=True)


def _normalized(layer: nn.Linear, power: bool) -> torch.Tensor:
    state = getattr(layer, _STATE)
    if state["kind"] == "weight":
        w = layer.weight_v
        scale = layer.weight_g if state["learn_scale"] else state["target_norm"]
        factor = scale / _row_norms(w)
        if state["clip"] is not None:
            factor = factor.clamp(max=state["clip"])
        return w * factor
    w = layer.weight_orig
    u, v = layer.weight_u, layer.weight_v
    if power:
        with torch.no_grad():
            for _ in range(state["n_power_iterations"]):
                v = F.normalize(torch.mv(w.t(), u), dim=0, eps=1e-12, out=v)
                u = F.normalize(torch.mv(w, v), dim=0, eps=1e-12, out=u)
            u, v = u.clone(), v.clone()  # the buffers move on; the graph keeps these
    sigma = torch.dot(u, torch.mv(w, v))
    scale = layer.weight_g if state["learn_scale"] else state["target_norm"]
    return w * (scale / sigma)


def reset_norm(module: nn.Module, *, power: bool | None = None) -> None:
    """Recompute every normalized weight of `module` (spectral: with power iterations in training
    mode, or as `power` says); call once before each solve, so the loop's evaluations share one
    weight and one graph, and after loading a state dict or moving the module."""
    for layer in module.modules():
        if hasattr(layer, _STATE):
            layer.weight = _normalized(layer, power=layer.training if power is None else power)


def remove_norm(module: nn.Module) -> None:
    """Replace each normalized weight by a plain parameter holding its current value."""
    for layer in module.modules():
        if hasattr(layer, _STATE):
            with torch.no_grad():
                weight = _normalized(layer, power=False).detach().clone()
            for name in ("weight", "weight_orig", "weight_g", "weight_u", "weight_v"):  # either kind's
                if hasattr(layer, name):
                    delattr(layer, name)
            delattr(layer, _STATE)
            layer.weight = nn.Parameter(weight)
