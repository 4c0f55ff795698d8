"""Resume: model.state_dict() + T1T2.state_dict() saved with torch.save mid-run and loaded
in a new process continue the bit-identical trajectory of θ and λ, for every backend available.

The runs, checkpoints and the resuming process are tests/support/resume_cases.py: noise (fd and exact)
with a Dropout in the model, L2/L1 at network, layer, unit and element granularity and a decoupled
L2, sgd with momentum and adam, hyper_every 1 and 3, checkpoints with and without a stash. Every
iteration after the checkpoint is compared with torch.equal against one uninterrupted run. The
negative controls resume with one piece of the checkpoint left out and must see the trajectory
change: the comparison can fail.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resume_cases as rc
from conftest import HAS_EXT, ROOT, SUPPORT, backends

# Triton's interpreter divides the masked-off lanes of adam's Jacobian 0 by 0 before dropping them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


BACKENDS = backends("reference", "cpp", "triton")


def _env():
    # the same intra-op thread count as this process, which ran the uninterrupted run
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SUPPORT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env  # TRITON_INTERPRET, when conftest set it, is inherited


_REFERENCE_RUNS: dict = {}


def uninterrupted(case: str, backend: str) -> list[dict]:
    """θ and λ after each of the ITERS iterations of one run without any checkpoint (cached)."""
    key = (case, backend)
    if key not in _REFERENCE_RUNS:
        run, record = rc.Run(case, backend), []
        run.iterate(rc.ITERS, record)
        _REFERENCE_RUNS[key] = record
    return _REFERENCE_RUNS[key]


def resume_in_new_process(ckpt: dict, tmp_path: Path, drop: str | None = None) -> list[dict]:
    path, out = tmp_path / "checkpoint.pt", tmp_path / "resumed.pt"
    torch.save(ckpt, path)
    cmd = [sys.executable, str(SUPPORT / "resume_cases.py"), str(path), str(out)] + (["--drop", drop] if drop else [])
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return torch.load(out)


def differences(reference: list[dict], resumed: list[dict]) -> list[str]:
    """'iteration k: name' for every θ or λ tensor of the resumed run that is not bit-identical."""
    out = []
    for snap in resumed:
        ref = reference[snap["iteration"] - 1]
        assert snap["iteration"] == ref["iteration"]
        for what in ("theta", "raw"):
            assert ref[what].keys() == snap[what].keys()
            out += [f"iteration {snap['iteration']}: {what} {n}" for n in ref[what]
                    if not torch.equal(ref[what][n], snap[what][n])]
        if (snap["steps"], snap["hyper_steps"]) != (ref["steps"], ref["hyper_steps"]):
            out.append(f"iteration {snap['iteration']}: counters")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,phase,k", rc.CHECKPOINTS, ids=lambda x: str(x))
def test_resume_in_a_new_process_is_bit_identical(backend, case, phase, k, tmp_path):
    ckpt = rc.run_to_checkpoint(case, backend, phase, k)
    assert (ckpt["opt"]["stash"] is not None) == rc.hyper_due_at(case, phase, k)  # the matrix covers both
    reference = uninterrupted(case, backend)
    resumed = resume_in_new_process(ckpt, tmp_path)
    first = k if phase == "after_step" else k + 1
    assert [s["iteration"] for s in resumed] == list(range(first, rc.ITERS + 1))
    assert differences(reference, resumed) == []
    # θ and λ go on changing after the checkpoint (the identity is not that of a stalled run)
    for what in ("theta", "raw"):
        assert any(not torch.equal(resumed[0][what][n], resumed[-1][what][n]) for n in resumed[-1][what]), what


# -- negative controls: the same comparison, with one piece of the checkpoint left out --------
NEGATIVE = [
    # the hyper-optimizer's (Adam) moments: λ moves differently from the next hyper step on
    ("hyper_state", ("sgd-every1-fd", "after_iter", 4)),
    # the generator state of the stashed T1 step: the noise replay of the pending hyper step draws
    # other dropout masks than the T1 step did
    ("stash_rng", ("sgd-every1-fd", "after_step", 4)),
    # torch's global generator (the script's part of the checkpoint): other dropout masks
    ("torch_rng", ("adam-every3-exact", "after_iter", 5)),
]


@pytest.mark.parametrize("drop,where", NEGATIVE, ids=[d for d, _ in NEGATIVE])
def test_resume_without_part_of_the_state_diverges(drop, where, tmp_path):
    case, phase, k = where
    backend = "cpp" if HAS_EXT else "reference"
    ckpt = rc.run_to_checkpoint(case, backend, phase, k)
    resumed = resume_in_new_process(ckpt, tmp_path, drop=drop)
    diff = differences(uninterrupted(case, backend), resumed)
    assert any(": raw " in d for d in diff), diff
    assert any(": theta " in d for d in diff), diff


# -- in-process details of state_dict / load_state_dict ----------------------------------------
def _loaded(ckpt, **changes):
    run = rc.Run(ckpt["case"], ckpt["backend"])
    for k, v in changes.items():
        setattr(run.opt, k, v)
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["opt"])
    return run


def test_a_loaded_stash_keeps_its_generator_state_for_the_next_checkpoint():
    """Resume twice: the state_dict of an optimizer that loaded a stash still carries the T1 step's
    generator state (it is not lost with the closure)."""
    ckpt = rc.run_to_checkpoint("sgd-every1-fd", "reference", "after_step", 3)
    saved = ckpt["opt"]["stash"]["noise"]["rng"]
    assert saved is not None and saved[0].dtype == torch.uint8
    again = _loaded(ckpt).opt.state_dict()["stash"]["noise"]["rng"]
    assert torch.equal(again[0], saved[0]) and again[1] is None


def test_hyper_step_with_train_uses_the_generator_state_of_the_step():
    """hyper_step(val, train=closure) after step(closure) replays the step's dropout masks, so it gives
    the hypergradient of hyper_step(val) bit for bit."""
    out = []
    for explicit in (False, True):
        run = rc.Run("sgd-every1-fd", "reference")
        run.iterate(2)
        run.t1()
        vidx = torch.randint(rc.N_VAL, (rc.BATCH,), generator=run.val_gen)
        train = run.closure(run.pending, run.x, run.y) if explicit else None
        run.opt.hyper_step(run.closure(vidx, run.xv, run.yv), train=train)
        out.append(run.opt.last_hypergrad)
    assert out[0].keys() == out[1].keys() and all(torch.equal(out[0][n], out[1][n]) for n in out[0])
    assert any(float(out[0][n].abs().sum()) > 0 for n in out[0] if n.startswith("noise"))


def test_the_hyper_group_and_extra_counters_travel_with_the_state():
    run = rc.Run("sgd-every1-fd", "reference")
    run.iterate(2)
    run.opt.hyper_lr, run.opt.fd_eps, run.opt.skipped = 0.0125, 2e-3, 3  # changed mid-run (a schedule, the guard)
    ckpt = run.checkpoint("after_iter")
    opt = _loaded(ckpt).opt
    assert (opt.hyper_lr, opt.fd_eps, opt.skipped) == (0.0125, 2e-3, 3)


@pytest.mark.parametrize("setting,value", [("seed", 8), ("hyper_every", 2), ("optimizer_name", "adam")])
def test_loading_into_an_optimizer_with_other_settings_is_refused(setting, value):
    ckpt = rc.run_to_checkpoint("sgd-every1-fd", "reference", "after_iter", 2)
    run = rc.Run("sgd-every1-fd", "reference")
    setattr(run.opt, setting, value)
    before = copy.deepcopy(run.opt.state_dict())
    with pytest.raises(ValueError, match="other settings"):
        run.opt.load_state_dict(ckpt["opt"])
    after = run.opt.state_dict()  # refused before anything was overwritten
    assert after["steps"] == before["steps"] == 0
    assert all(torch.equal(after["raw"][n], before["raw"][n]) for n in before["raw"])


def test_a_state_dict_without_the_new_keys_still_loads():
    """state_dicts saved before settings / hyper_group / counters / the stash RNG existed load as before."""
    ckpt = rc.run_to_checkpoint("sgd-every1-fd", "reference", "after_step", 3)
    old = {k: v for k, v in ckpt["opt"].items() if k not in ("settings", "hyper_group", "counters")}
    old["stash"] = {**old["stash"], "noise": {k: v for k, v in old["stash"]["noise"].items() if k != "rng"}}
    run = rc.Run("sgd-every1-fd", "reference")
    run.opt.load_state_dict(old)
    assert run.opt.hyper_due and run.opt.steps == 3
