"""The contract of the closures ``T1T2`` calls: what a training or validation closure must return."""
from __future__ import annotations

import torch


def scalar_loss(loss, where: str) -> torch.Tensor:
    """The closure's loss as a 0-d tensor that requires grad, or a clear error saying what is wrong
    with it; ``where`` names the closure ("training", "validation")."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the {where} closure must return a scalar loss tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"the {where} closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                         f"reduce it (e.g. .mean()) inside the closure")
    if not loss.requires_grad:
        raise ValueError(f"the {where} closure returned a loss that does not require grad; is it computed from "
                         f"the model's parameters outside torch.no_grad()?")
    return loss.reshape(())
