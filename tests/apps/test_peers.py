"""Experiment 5 (peers): our one-step hypergradient against higher's and torchopt's, and the
`t1t2 peers` command at tiny size. The parity tests are float64 and tight (1e-8 relative), so a
different update rule, Jacobian or parametrization on either side fails them; the last tests
show that they do see such differences."""
import csv
import json
import math

import pytest
import torch

from t1t2_fast.apps import peers as P
from t1t2_fast.apps.cli import main

RTOL = 1e-8
TINY = dict(width=16, batch=32)


def ours_methods():
    return (["ours-cpp"] if P.compiled_available() else []) + ["ours-reference"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("peer", P.PEERS)
@pytest.mark.parametrize("per", ["layer", "network"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_float64_hypergradients_agree(peer, per, optimizer):
    pytest.importorskip(peer)
    p = P.Problem(optimizer=optimizer, per=per, dtype=torch.float64, **TINY)
    methods = ours_methods() + [peer]
    r = P.agreement(p, methods, steps=3)  # steps 2 and 3 start from a momentum / Adam state each built
    for m in methods:
        assert max(r["rel_diff"][m]) <= RTOL, (m, r["rel_diff"][m])
    h = r["hypergrads"][peer]
    assert len(h[-1]) == (1 if per == "network" else 3)
    assert all(abs(float(v)) > 1e-12 for step in h for v in step.values())  # not vacuously zero


@pytest.mark.parametrize("peer", P.PEERS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_float64_training_trajectories_agree(peer, optimizer):
    """The T1 steps themselves (weights after three hyper iterations, λ updated in between)."""
    pytest.importorskip(peer)
    p = P.Problem(optimizer=optimizer, dtype=torch.float64, **TINY)
    with P.default_dtype(torch.float64):
        init, data = P.make_inputs(p)
        ours, other = P.make_runner("ours-reference", p, init, data), P.make_runner(peer, p, init, data)
        for _ in range(3):
            ours.iteration()
            other.iteration()
    a, b = ours.weights(), other.weights()
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(b[n].detach(), a[n].detach(), rtol=1e-12, atol=1e-14)
    moved = max(float((a[n].detach() - init[n]).abs().max()) for n in a)
    assert moved > 1e-4


def test_float32_hypergradients_are_close():
    """At float32 the methods differ by rounding only (SGD; Adam's early steps are ill-conditioned)."""
    pytest.importorskip("higher")
    pytest.importorskip("torchopt")
    p = P.Problem(optimizer="sgd", **TINY)
    r = P.agreement(p, ours_methods() + list(P.PEERS), steps=2)
    for m, d in r["rel_diff"].items():
        assert max(d) < 1e-4, (m, d)


def test_higher_adam_without_the_eps_correction_disagrees():
    pytest.importorskip("higher")
    p = P.Problem(optimizer="adam", dtype=torch.float64, **TINY)
    with P.default_dtype(torch.float64):
        init, data = P.make_inputs(p)
        ours = P.make_runner("ours-reference", p, init, data)
        raw = P.Higher(p, init, data, correct_eps=False)
        diffs = [P.rel_diff(raw.iteration(), ours.iteration()) for _ in range(2)]
    assert min(diffs) > 1e-3  # eps/√(1−β2ᵗ) instead of eps changes the (eps-sensitive) Jacobian


def test_torchopt_adam_float64_needs_a_float64_default_dtype():
    """torchopt's pow(β, count) follows the default dtype: float32 there is visible in float64."""
    pytest.importorskip("torchopt")
    p = P.Problem(optimizer="adam", dtype=torch.float64, **TINY)
    init, data = P.make_inputs(p)  # default dtype float32 from here on
    ours, other = P.make_runner("ours-reference", p, init, data), P.make_runner("torchopt", p, init, data)
    diff = max(P.rel_diff(other.iteration(), ours.iteration()) for _ in range(2))
    assert diff > 100 * RTOL


def test_a_slightly_wrong_learning_rate_is_caught():
    pytest.importorskip("higher")
    p = P.Problem(optimizer="sgd", dtype=torch.float64, **TINY)
    with P.default_dtype(torch.float64):
        init, data = P.make_inputs(p)
        ours = P.make_runner("ours-reference", p, init, data)
        off = P.make_runner("higher", P.replace(p, lr=p.step_lr * (1 + 1e-6)), init, data)
        diff = P.rel_diff(off.iteration(), ours.iteration())
    assert diff > 10 * RTOL  # a 1e-6 relative change of the learning rate moves h by about 1e-6


def test_peak_memory_of_a_plain_step_counts_what_it_holds():
    """The measurement counts what a plain momentum-SGD step must hold, and nothing made before it.
    Lower bound: θ (the method's model copy), ∇θ and the momentum buffer are all live while the step
    runs, so a peak under 3x the weights misses allocations. Upper bound: besides those three, foreach
    SGD's weight decay may form ∇θ + wd·θ out of place (at most one more copy of the weights; how much
    of it is live at once depends on torch's foreach kernels: measured 3.91x on torch 2.13), and the
    forward/backward's batch-sized tensors (a few of batch x (in + depth·width + classes) values).
    The same number whatever runs before it."""
    p = P.Problem(optimizer="sgd", width=64, batch=8)
    init, data = P.make_inputs(p)
    weights = sum(t.numel() * t.element_size() for t in init.values())
    activations = p.batch * (p.in_features + p.depth * p.width + p.classes) * 4  # float32 values
    peak = P.peak_memory(p, P.PLAIN, init, data)
    assert 3 * weights <= peak <= 4 * weights + 4 * activations, (peak / weights, weights, activations)
    assert P.peak_memories(p, ["higher", P.PLAIN] if P.available_peers()[0] else ["ours-reference", P.PLAIN],
                           init, data)[P.PLAIN] == peak


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
SMOKE = ["peers", "--widths", "8,16", "--repeats", "1", "--warmup", "0", "--batch-size", "8",
         "--agree-width", "8", "--agree-steps", "2", "--quiet"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_peers_command_smoke(tmp_path, capsys):
    pytest.importorskip("higher")
    pytest.importorskip("torchopt")
    threads = torch.get_num_threads()
    assert main([*SMOKE, "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads
    rows = read_csv(tmp_path / "peers.csv")
    methods = ours_methods() + ["higher", "torchopt", "torch"]
    assert {(r["optimizer"], int(r["width"]), r["method"]) for r in rows} == {
        (o, w, m) for o in ("sgd", "adam") for w in (8, 16) for m in methods}
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["peak_mb"]) > 0
        if r["method"] != "torch":
            assert math.isfinite(float(r["rel_diff_vs_ours"]))
    assert (tmp_path / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| optimizer | width |" in (tmp_path / "peers.md").read_text()
    s = json.loads((tmp_path / "summary.json").read_text())
    for opt in ("sgd", "adam"):
        v = s["verdict"][opt]
        assert v["width"] == 16 and v["fastest_peer"] in P.PEERS
        assert v["speedup"] > 0 and v["memory_ratio"] > 0
        assert s["agreement"][opt]["passed"]
    assert "pure-Python" in s["torchopt_path"]
    out = capsys.readouterr().out
    assert "target >= 3x" in out and "PASS" in out


def test_one_missing_peer_is_skipped_with_a_warning(tmp_path, capsys, monkeypatch):
    pytest.importorskip("higher")
    monkeypatch.setattr(P, "available_peers", lambda wanted: (["higher"], {"torchopt": "ImportError: test"}))
    assert main([*SMOKE, "--widths", "8", "--optimizer", "sgd", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "skipping torchopt" in err and "pip install t1t2_fast[experiments]" in err
    assert {r["method"] for r in read_csv(tmp_path / "peers.csv")} == set(ours_methods() + ["higher", "torch"])


def test_no_peer_is_an_error_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(P, "available_peers", lambda wanted: ([], {n: "ImportError: test" for n in wanted}))
    assert main([*SMOKE, "--out", str(tmp_path)]) == 1
    assert "pip install t1t2_fast[experiments]" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["peers", "--widths", "0"], "--widths: expected comma-separated positive integers"),
    (["peers", "--widths", "a,b"], "--widths: expected comma-separated positive integers"),
    (["peers", "--peers", "jax"], "--peers: expected a comma-separated subset of higher, torchopt"),
    (["peers", "--optimizer", "rmsprop"], "invalid choice"),
])
def test_bad_flags(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
