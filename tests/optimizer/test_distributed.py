"""T1-T2 across 2 processes (DDP, gloo, CPU, float64): the same θ and λ as one process, per-rank
noise, the λ drift check, no hang when a rank fails, and `torchrun ... train`.

The rank workers are tests/support/ddp_cases.py run as subprocesses; that file documents the one-process
references (for noise: one process that simulates the two ranks' shards and noise seeds)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import ddp_cases as cases
from conftest import ROOT, SUPPORT, needs_gloo

pytestmark = needs_gloo

WORLD = 2


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SUPPORT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _spawn(mode, tmp_path, env=None):
    """Start the WORLD rank workers of ``mode``; returns (processes, their output files)."""
    init = tmp_path / "init"  # a FileStore rendezvous: no port to find
    outs = [tmp_path / f"rank{r}.out" for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, str(SUPPORT / "ddp_cases.py"), mode, str(r), str(WORLD), str(init),
                               str(outs[r])], env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(WORLD)]
    return procs, outs


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    procs, outs = _spawn("equivalence", tmp)
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-process run did not finish in 120 s")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    return [torch.load(o) for o in outs]


@pytest.mark.parametrize("case", list(cases.CASES))
def test_two_ranks_match_one_process(ranks, case):
    torch.set_num_threads(1)
    ref = cases.reference(case, WORLD)
    r0, r1 = ranks[0][case], ranks[1][case]
    for key in ("theta", "raw", "hypergrad"):
        assert r0[key].keys() == ref[key].keys()  # DDP's "module." prefix does not reach the names
        for name in ref[key]:
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)  # identical on the ranks
            torch.testing.assert_close(r0[key][name], ref[key][name], rtol=1e-9, atol=1e-12, msg=f"{key} {name}")
    # λ moved: the comparison is not between two untouched initial values
    init = cases.make_opt(cases.make_model(cases.CASES[case][1]), case).raw_hyperparameters()
    assert all(not torch.equal(init[n], ref["raw"][n]) for n in init)


def test_state_dict_names_and_world_size(ranks):
    single = cases.make_opt(cases.make_model(True), "adam-noise-fd")
    r0 = ranks[0]["adam-noise-fd"]
    assert r0["world_size"] == WORLD
    assert sorted(single.raw_hyperparameters()) == sorted(r0["raw"])
    assert r0["state_keys"] == sorted(n for n, _ in single._model.named_parameters())


def test_communication_is_the_hypergradient_vector(ranks):
    """Per hyper step: the hypergradients plus one hash slot per rank, in float64; with noise (exact
    reduction, the default) also the validation gradient, once."""
    for case, (_, noise, _) in cases.CASES.items():
        r = ranks[0][case]
        per_step = 8 * (r["hypers"] + WORLD) + (8 * r["params"] if noise else 0)
        assert r["comm_bytes"] == cases.STEPS * per_step, case


def test_no_host_read_in_step_and_one_in_hyper_step_across_processes(ranks):
    """tests/optimizer/test_host_sync.py's rule under DDP: 0 host reads per step(), at most 1 per
    hyper_step(), in every case, including noise with the exact reduction (mean v all-reduced)."""
    for case in list(cases.CASES) + ["local-noise"]:
        for r in (0, 1):
            reads = ranks[r][case]["reads"]
            assert (reads["step"], reads["hyper_step"]) == (0, 1), (case, r, reads)


def test_local_noise_reduction_sends_only_hypergradients(ranks):
    """distributed_noise="local": each rank's own v; λ still identical on the ranks, only the small
    vector is sent, and the result differs from the one-process value (it drops the cross terms)."""
    r0, r1 = ranks[0]["local-noise"], ranks[1]["local-noise"]
    for key in ("theta", "raw"):
        assert all(torch.equal(r0[key][n], r1[key][n]) for n in r0[key])
    assert r0["comm_bytes"] == cases.STEPS * 8 * (r0["hypers"] + WORLD)
    exact = ranks[0]["momentum-noise-fd"]["raw"]
    assert any(not torch.allclose(r0["raw"][n], exact[n], rtol=1e-9, atol=0) for n in exact if n.startswith("noise"))


def test_a_nonfinite_shard_on_one_rank_skips_the_step_on_every_rank(ranks):
    for case in ("momentum-penalties", "adam-noise-fd"):
        r0, r1 = ranks[0]["nonfinite"][case], ranks[1]["nonfinite"][case]
        assert r0["skips"] == r1["skips"], case
        assert r0["skips"][1] == {"t1": 1, "t2": 0} and r0["skips"][-1] == {"t1": 1, "t2": 1}, case
        # the lazy guard (default) counts the skipped T1 step in steps, and its hyper step is skipped
        # uncounted; the T2 skip of a NaN validation shard is a masked update that counts (docs/reliability.md)
        assert r0["steps"] == cases.STEPS and r0["hyper_steps"] == cases.STEPS - 1
        for key in ("theta", "raw"):
            for name in r0[key]:
                assert torch.equal(r0[key][name], r1[key][name]), (case, key, name)
                assert torch.isfinite(r0[key][name]).all(), (case, key, name)


@pytest.mark.parametrize("mode, raised_at", [("drift", 2), ("drift-grads", 1)])
def test_drift_of_lambda_on_one_rank_fails_on_every_rank(ranks, mode, raised_at):
    """Checked on the device and read with the next hyper step's checks (the default guard: no host
    read of its own), or read at once (skip_nonfinite="grads")."""
    for r in range(WORLD):
        step, msg = ranks[r][mode]
        assert step == raised_at, (r, step, msg)
        assert "no longer identical on every rank" in msg and "l2.2.weight" in msg and "ranks [1]" in msg


def test_a_failing_rank_does_not_leave_the_others_hanging(tmp_path):
    """Rank 1 raises in its validation closure and then stays alive, without calling hyper_step, until
    the test releases it; rank 0 must give up on its all-reduce by itself, at the group's 2 s timeout,
    with a clear error. The order of events is the check, not a clock: rank 0 has exited while rank 1
    is still alive (so not because rank 1's connections closed), and gloo's message says it timed out.
    A rank 0 that waited for its peer never exits before the release: communicate's 120 s is only the
    guard that turns that hang into a failure."""
    release = tmp_path / "release"
    procs, outs = _spawn("hang", tmp_path, _env(T1T2_TEST_TIMEOUT="2", T1T2_TEST_RELEASE=str(release),
                                                T1T2_TEST_LINGER="300"))
    try:
        try:
            log0 = procs[0].communicate(timeout=120)[0].decode()
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 still waits on rank 1 (alive, not calling hyper_step) after 120 s")
        rank1_alive = procs[1].poll() is None
        release.touch()
        log1 = procs[1].communicate(timeout=120)[0].decode()
    finally:
        for p in procs:
            p.kill()
    assert rank1_alive, "rank 1 exited before rank 0 gave up: rank 0 may have waited for its connections to close"
    assert [p.returncode for p in procs] == [1, 1], (log0, log1)
    failed = outs[1].read_text()
    assert "ValueError: boom in rank 1's validation closure" in failed
    waited = outs[0].read_text()
    assert "RuntimeError" in waited and "all-reduce of the hypergradients failed or timed out" in waited, waited
    assert "rank 0 of 2" in waited and "Timed out" in waited  # gloo's timeout, not a closed connection


def test_torchrun_cli(tmp_path):
    """`torchrun --nproc_per_node=2 -m t1t2_fast train`: it trains, and only rank 0 prints and writes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "t1t2_fast",
           "train", "--steps", "12", "--width", "8", "--batch-size", "16", "--noise", "input", "--quiet",
           "--dist-timeout", "60", "--out", str(out)]
    p = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr[-6000:]
    assert sorted(f.name for f in out.iterdir()) == ["log.csv", "metrics.json", "trajectories.png"]
    assert p.stdout.count("test accuracy") == 1  # rank 0 only
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps_done"] == 12 and m["hyper_steps"] == 12
    assert m["hyperparameters"]["noise.input"] != pytest.approx(0.1, rel=1e-6)
    assert not (tmp_path / "runs").exists()  # no other rank wrote a default output folder


def test_framework_pattern_reduces_over_the_default_group(tmp_path):
    """Optimizer built on the unwrapped module, training through DDP (what Lightning and Hugging Face
    do): with process_group=None the hyper steps reduce over the default group, so θ and λ are
    those of one process on the concatenated batches; process_group=False opts out."""
    procs, outs = _spawn("framework", tmp_path)
    try:
        logs = [p.communicate(timeout=120)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    ranks = [torch.load(o) for o in outs]
    torch.set_num_threads(1)
    for case in cases.FRAMEWORK_CASES:
        r0, r1 = ranks[0][case], ranks[1][case]
        assert r0["world_size"] == r1["world_size"] == WORLD, case
        assert r0["comm_bytes"] > 0, case
        assert r0["opted_out_world_size"] == 1, case
        ref = cases.reference(case, WORLD)
        for key in ("theta", "raw", "hypergrad"):
            assert r0[key].keys() == ref[key].keys()
            for name in ref[key]:
                assert torch.equal(r0[key][name], r1[key][name]), (case, key, name)
                torch.testing.assert_close(r0[key][name], ref[key][name], rtol=1e-9, atol=1e-12,
                                           msg=f"{case} {key} {name}")
