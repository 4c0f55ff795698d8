"""The hyper-optimizers: the update of the raw hyperparameters λ from their hypergradients h, then
the projection into their bounds, with a count of the steps that hit a bound per hyperparameter.

- ``"sgd"``: λ ← λ − η_h h
- ``"adam"`` (default; the paper's choice): Adam on h with bias correction, λ ← λ − η_h m̂/(√ŝ + ε)
"""
from __future__ import annotations

import torch

from .penalties import Hyperparameter

HYPER_OPTIMIZERS = ("sgd", "adam")


class HyperOptimizer:
    """Updates hyperparameters in place. ``state``: Adam's moments per hyperparameter name;
    ``clipped``: per name, how many hyper steps the projection moved it."""

    def __init__(self, name: str, lr: float, betas: tuple[float, float], eps: float, names: list[str]):
        if name not in HYPER_OPTIMIZERS:
            raise ValueError(f"unknown hyper_optimizer={name!r}; expected one of {HYPER_OPTIMIZERS}")
        self.name, self.lr, self.betas, self.eps = name, lr, tuple(betas), eps
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.clipped = {n: 0 for n in names}

    @torch.no_grad()
    def step(self, hypers: list[Hyperparameter], hypergrads: dict[str, torch.Tensor], t: int) -> None:
        """One update of every hyperparameter (``t``: this hyper step's 1-based number, for Adam's
        bias correction), then the projection; the clip counts are read back once, at the end."""
        moved = []
        for h in hypers:
            g = hypergrads[h.name]
            if self.name == "sgd":
                h.raw.add_(g, alpha=-self.lr)
            else:
                b1, b2 = self.betas
                st = self.state.get(h.name)
                if st is None:
                    st = self.state[h.name] = {"exp_avg": torch.zeros_like(h.raw), "exp_avg_sq": torch.zeros_like(h.raw)}
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(self.eps)
                h.raw.addcdiv_(st["exp_avg"], denom, value=-self.lr / (1 - b1 ** t))
            moved.append(h.project())
        for h, m in zip(hypers, torch.stack(moved).tolist() if moved else []):
            self.clipped[h.name] += m > 0
