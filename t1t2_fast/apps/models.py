"""The networks of the commands: ``make_mlp`` (``train``, ``grid``, ``compare``, ``search``, ``peers``)
and ``make_model`` (``overhead``, the benchmarks): MLPs with named layers and optional GaussianNoise
sites, and a small CNN."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from t1t2_fast import GaussianNoise

NOISE_SITES = ("input", "hidden")
MODELS = ("mlp256", "mlp1024", "mlp4096", "cnn")  # make_model's defaults; any mlp<width> is accepted
PAPER_MODEL = "paper"  # make_model: the paper's BN MLP 784-1000-1000-1000-10 (the experiments' --full network)


def make_mlp(num_features: int, num_classes: int, width: int, depth: int, noise: tuple[str, ...] = (),
             noise_init: float = 0.1, noise_per: str = "layer", noise_mode: str = "additive",
             batchnorm: bool = False):
    """An MLP with named layers (fc1..fcN, out), so hyperparameters read ``l2.fc1.weight``; with
    ``noise``, GaussianNoise modules ``input`` (before fc1) and ``hidden<i>`` (after relu<i>), whose
    levels are the hyperparameters ``noise.input``, ``noise.hidden1``, ...; with ``batchnorm``, a
    BatchNorm1d ``bn<i>`` between fc<i> and relu<i> (the paper's MLPs)."""

    def noise_layer(features):
        return GaussianNoise(noise_init, per=noise_per, num_features=features if noise_per == "unit" else None,
                             mode=noise_mode)

    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    if "input" in noise:
        layers["input"] = noise_layer(num_features)
    fan_in = num_features
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(fan_in, width)
        if batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm1d(width)
        layers[f"relu{i}"] = nn.ReLU()
        if "hidden" in noise:
            layers[f"hidden{i}"] = noise_layer(width)
        fan_in = width
    layers["out"] = nn.Linear(fan_in, num_classes)
    return nn.Sequential(layers)


def is_mlp_name(name: str) -> bool:
    """Whether ``name`` is ``mlp<width>`` with a positive width."""
    return name.startswith("mlp") and name[3:].isdigit() and int(name[3:]) > 0


def make_model(name: str, noise: float | None) -> nn.Module:
    """``mlp<w>``: 784-w-w-10 ReLU; ``cnn``: conv(1→16)-pool-conv(16→32)-pool-linear on 1x28x28;
    ``paper``: 784-1000-1000-1000-10 with BatchNorm1d before each ReLU (make_mlp). With ``noise``,
    additive per-layer GaussianNoise on the input and after each hidden ReLU."""

    if name == PAPER_MODEL:
        return make_mlp(784, 10, 1000, 3, noise=NOISE_SITES if noise is not None else (),
                        noise_init=noise if noise is not None else 0.1, batchnorm=True)

    def site():
        return [GaussianNoise(noise)] if noise is not None else []

    if name.startswith("mlp"):
        w = int(name[3:])
        layers = [*site(), nn.Linear(784, w), nn.ReLU(), *site(), nn.Linear(w, w), nn.ReLU(), *site(), nn.Linear(w, 10)]
    elif name == "cnn":
        layers = [*site(), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), *site(),
                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), *site(), nn.Flatten(),
                  nn.Linear(32 * 7 * 7, 10)]
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS} or mlp<width>")
    return nn.Sequential(*layers)
