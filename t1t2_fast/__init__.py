"""t1t2_fast: tune continuous regularization hyperparameters inside one training run (T1-T2,
Luketina et al., ICML 2016) with fused kernels and a pure-PyTorch reference path."""
from . import functional, reference
from .backend import BACKENDS
from .penalties import L1, L2, PER_CHOICES, Penalty
from .noise import GaussianNoise, no_noise, noise_enabled
from .optimizer import NonFiniteError, T1T2
from . import tunables
from .tunables import ConcreteDropout, Tunable, evaluating, is_evaluating, smoothed_cross_entropy

__version__ = "0.1.0"
__all__ = ["T1T2", "L2", "L1", "Penalty", "GaussianNoise", "no_noise", "noise_enabled", "Tunable", "evaluating",
           "is_evaluating", "ConcreteDropout", "smoothed_cross_entropy", "NonFiniteError", "BACKENDS", "PER_CHOICES",
           "functional", "reference", "tunables", "__version__"]
