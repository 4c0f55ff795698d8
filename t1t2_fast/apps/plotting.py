"""The figure of a ``train`` run. Every figure of the commands is a bare matplotlib ``Figure``: it
renders with Agg without touching pyplot's global backend or figure list, so calling ``main()`` from a
notebook or GUI session leaves the caller's matplotlib as it was."""
from __future__ import annotations

import math


def plot_train(path, columns, rows, hyper_names, bands, title):
    """trajectories.png of a ``train`` run: the penalty coefficients (and noise levels) against the
    step, per-entry min-max bands for tensor-valued ones, and the training and validation loss.
    ``rows`` are log.csv's rows (step, train loss, validation loss, one value per hyperparameter)."""
    # optional dependency (the apps extra), needed only when a command draws its figure
    import matplotlib
    from matplotlib.figure import Figure

    steps = [r[0] for r in rows]
    penalty_names = [n for n in hyper_names if not n.startswith("noise")]
    noise_names = [n for n in hyper_names if n.startswith("noise")]
    fig = Figure(figsize=(17 if noise_names else 12, 4.6))
    axes = fig.subplots(1, 3 if noise_names else 2)
    ax_h, ax_l = axes[0], axes[-1]
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]

    def draw(ax, names, log, what, empty):
        layer_colors: dict[str, str] = {}
        for name in names:
            j = hyper_names.index(name)
            kind, _, target = name.partition(".")
            color = layer_colors.setdefault(target, palette[len(layer_colors) % len(palette)])
            ax.plot(steps, [r[3 + j] for r in rows], "--" if kind == "l1" else "-", color=color,
                    label=columns[3 + j], lw=1.6)
            lo, hi = zip(*bands[name])
            if any(a != b for a, b in zip(lo, hi)):
                ax.fill_between(steps, lo, hi, color=color, alpha=0.15, lw=0)
        banded = any(any(a != b for a, b in bands[n]) for n in names)
        if names:
            if log:
                ax.set_yscale("log")
            ax.legend(fontsize=8, loc="best")
            ax.set_title(f"{what} (natural scale; band: min-max over entries)" if banded else what)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
            ax.set_title(what)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)

    draw(ax_h, penalty_names if noise_names else hyper_names, True, "penalty hyperparameters",
         "no penalty tuned" if noise_names else "no hyperparameters tuned")
    ax_h.set_ylabel("coefficient c (log scale)")
    if noise_names:
        draw(axes[1], noise_names, False, "noise levels", "")
        axes[1].set_ylabel("noise std σ")

    ax_l.plot(steps, [r[1] for r in rows], label="train (whole split)", lw=1.6)
    ax_l.plot(steps, [r[2] for r in rows], label="validation (whole split)", lw=1.6)
    positive = all(r[1] > 0 and r[2] > 0 for r in rows if math.isfinite(r[1]) and math.isfinite(r[2]))
    if positive:
        ax_l.set_yscale("log")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("cross-entropy (data term, no penalty)")
    ax_l.set_title("loss")
    ax_l.legend(fontsize=8)
    ax_l.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
