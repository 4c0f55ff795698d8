"""Noise hyperparameters: the ``GaussianNoise`` layer and its differentiable op (``module``), and
what ``T1T2`` does with them (``hypergrad``): binding a model's layers, keying and replaying a
training step's noise, and the noise-level hypergradient."""
from .module import GaussianNoise, gaussian_noise, no_noise, noise_enabled

__all__ = ["GaussianNoise", "gaussian_noise", "no_noise", "noise_enabled"]
