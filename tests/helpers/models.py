"""Models for parity tests."""

from __future__ import annotations


def perturb_norms(model, std: float = 0.1, seed: int | None = None):
    """Add N(0, std) noise to every norm weight of ``model`` (in place; returns it): models initialise norms
    to 1, which would hide a norm applied to the wrong tensor, swapped, or given the wrong epsilon."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * std)
    return model
