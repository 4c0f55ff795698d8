"""`t1t2 train --checkpoint / --resume`: a run stopped mid-way and resumed in a new process
ends with the same log, accuracies, θ and λ as one that was never stopped; checkpoints are written
atomically; a checkpoint of a run with other settings is refused; under torchrun rank 0 writes and
every rank resumes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interrupt_train import interrupting_step
from t1t2_fast import T1T2
from t1t2_fast.apps import cli
from t1t2_fast.apps.data import BatchStream
from t1t2_fast.apps.train import write_checkpoint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TINY = ["--width", "16", "--batch-size", "32", "--quiet", "--steps", "40"]
# two settings: sgd-momentum, a T2 step every step, fd noise, L2+L1 per layer; adam, a T2 step every
# 3 steps, exact noise and a tuned label smoothing (a Tunable of the loss), L2 per unit
CONFIGS = {
    "sgd-fd": ["--noise", "input,hidden", "--l1", "1e-4", "--checkpoint-every", "20"],
    "adam-exact": ["--optimizer", "adam", "--hyper-every", "3", "--noise", "input", "--noise-hypergrad", "exact",
                   "--label-smoothing-tune", "--per", "unit", "--checkpoint-every", "15"],
}
STOP = {"sgd-fd": 27, "adam-exact": 34}     # interrupted when this many steps are done
SAVED = {"sgd-fd": 20, "adam-exact": 30}    # the last checkpoint before that
RESULTS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_accuracy", "train_loss",
           "hyperparameters", "steps_done", "hyper_steps", "initial_hyperparameters")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def train(out, *args):
    return cli.main(["train", "--out", str(out), *TINY, *args])


def train_in_new_process(out, *args, timeout=300):
    cmd = [sys.executable, "-m", "t1t2_fast.apps", "train", "--out", str(out), *TINY, *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_final_state(a, b):
    """The θ, optimizer state, λ and hyper-optimizer state of two checkpoints, bit for bit."""
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "θ"
    oa, ob = a["opt"], b["opt"]
    assert oa["raw"].keys() == ob["raw"].keys() and all(torch.equal(oa["raw"][k], ob["raw"][k]) for k in oa["raw"])
    for group in ("state", "hyper_state"):
        assert oa[group].keys() == ob[group].keys()
        for name in oa[group]:
            assert all(torch.equal(torch.as_tensor(oa[group][name][k]), torch.as_tensor(ob[group][name][k]))
                       for k in oa[group][name]), (group, name)
    assert (oa["steps"], oa["hyper_steps"]) == (ob["steps"], ob["hyper_steps"])


@pytest.fixture(scope="module", params=list(CONFIGS))
def runs(request, tmp_path_factory):
    """An uninterrupted run, and the same command stopped mid-way; both with --checkpoint."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    flags = CONFIGS[name]
    assert train(tmp / "full", *flags, "--checkpoint", str(tmp / "full.pt")) == 0
    mp = pytest.MonkeyPatch()
    mp.setattr(T1T2, "step", interrupting_step(STOP[name]))
    try:
        assert train(tmp / "stopped", *flags, "--checkpoint", str(tmp / "stopped.pt")) == 130  # "interrupted"
    finally:
        mp.undo()
    return name, tmp


def test_a_resumed_run_ends_like_an_uninterrupted_one(runs):
    name, tmp = runs
    stopped = load(tmp / "stopped.pt")
    assert stopped["step"] == SAVED[name]  # the last checkpoint before the interrupt, intact
    assert not (tmp / "stopped" / "metrics.json").exists()
    done = train_in_new_process(tmp / "resumed", *CONFIGS[name], "--checkpoint", str(tmp / "resumed.pt"),
                                "--resume", str(tmp / "stopped.pt"))
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    full, resumed = metrics(tmp / "full"), metrics(tmp / "resumed")
    assert {k: resumed[k] for k in RESULTS} == {k: full[k] for k in RESULTS}
    assert (tmp / "resumed" / "log.csv").read_bytes() == (tmp / "full" / "log.csv").read_bytes()
    assert_same_final_state(load(tmp / "full.pt"), load(tmp / "resumed.pt"))
    # θ and λ did move on after the checkpoint (the comparison is not of two stalled runs)
    final = load(tmp / "full.pt")
    assert full["steps_done"] == 40 and final["step"] == 40
    assert any(not torch.equal(final["opt"]["raw"][k], stopped["opt"]["raw"][k]) for k in final["opt"]["raw"])
    assert any(not torch.equal(final["model"][k], stopped["model"][k]) for k in final["model"])


def test_resuming_with_another_data_order_is_detected(runs, tmp_path):
    """Negative control: the same resume with the training batch order restarted from the first
    pass ends elsewhere, and the comparison above sees it."""
    name, tmp = runs
    ckpt = load(tmp / "stopped.pt")
    ckpt["train_batches"] = {**ckpt["train_batches"], "start": None, "pos": 0}
    torch.save(ckpt, tmp_path / "reordered.pt")
    assert train(tmp_path / "out", *CONFIGS[name], "--resume", str(tmp_path / "reordered.pt")) == 0
    assert metrics(tmp_path / "out")["hyperparameters"] != metrics(tmp / "full")["hyperparameters"]
    assert (tmp_path / "out" / "log.csv").read_bytes() != (tmp / "full" / "log.csv").read_bytes()


def test_resuming_the_final_checkpoint_rewrites_the_same_outputs(runs, tmp_path):
    name, tmp = runs
    assert train(tmp_path / "again", *CONFIGS[name], "--resume", str(tmp / "full.pt"),
                 "--checkpoint", str(tmp_path / "again.pt")) == 0
    assert (tmp_path / "again" / "log.csv").read_bytes() == (tmp / "full" / "log.csv").read_bytes()
    assert {k: metrics(tmp_path / "again")[k] for k in RESULTS} == {k: metrics(tmp / "full")[k] for k in RESULTS}
    assert_same_final_state(load(tmp / "full.pt"), load(tmp_path / "again.pt"))


@pytest.mark.parametrize("change, message", [
    (["--l2", "2e-3"], "l2: 0.001 there, 0.002 here"),
    (["--seed", "1"], "seed: 0 there, 1 here"),
    (["--steps", "50"], "steps: 40 there, 50 here"),
    (["--threads", "2"], "threads: 1 there, 2 here"),  # other thread counts may round otherwise
])
def test_a_checkpoint_of_other_settings_is_refused(runs, tmp_path, capsys, change, message):
    name, tmp = runs
    args = [*CONFIGS[name], "--resume", str(tmp / "stopped.pt"), *change]
    assert cli.main(["train", "--out", str(tmp_path / "o"), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert "checkpoint was written by a run with other settings" in err and message in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_missing_or_foreign_resume_file_is_refused(tmp_path, capsys):
    assert train(tmp_path / "o", "--resume", str(tmp_path / "nothing.pt")) == 2
    assert "no such file" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "other.pt")
    assert train(tmp_path / "o", "--resume", str(tmp_path / "other.pt")) == 2
    assert "not a checkpoint written by `t1t2 train --checkpoint`" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert train(tmp_path / "o", "--resume", str(tmp_path / "junk.pt")) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    write_checkpoint(str(path), {"step": 1, "x": torch.arange(3)})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(str(path), {"step": 2, "x": torch.arange(4)})
    monkeypatch.undo()
    assert load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left behind


def test_batch_stream_state_restarts_the_same_sequence():
    a = BatchStream(10, 4, seed=3, device="cpu")
    seen = [next(a) for _ in range(5)]  # passes of 4 + 4 + 2
    assert [len(i) for i in seen] == [4, 4, 2, 4, 4]
    b = BatchStream(10, 4, seed=3, device="cpu")
    b.load_state_dict(a.state_dict())
    c = BatchStream(10, 4, seed=3, device="cpu")  # the negative control: no state loaded
    ahead = [next(a) for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(ahead, [next(b) for _ in range(6)]))
    assert not all(torch.equal(x, y) for x, y in zip(ahead, [next(c) for _ in range(6)]))


# -- torchrun: rank 0 writes, every rank resumes ------------------------------------------------
def _torchrun(tmp_path, script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script, "train",
           "--steps", "12", "--width", "8", "--batch-size", "16", "--noise", "input", "--quiet",
           "--dist-timeout", "60", "--checkpoint-every", "6", *args]
    return subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_checkpoint_and_resume(tmp_path):
    full = _torchrun(tmp_path, ["-m", "t1t2_fast.apps"], "--out", "full", "--checkpoint", "full.pt")
    assert full.returncode == 0, full.stdout + full.stderr[-6000:]
    stopped = _torchrun(tmp_path, [str(HERE / "interrupt_train.py"), "9"], "--out", "stopped",
                        "--checkpoint", "stopped.pt")
    assert stopped.returncode != 0  # interrupted at step 10 on both ranks
    assert load(tmp_path / "stopped.pt")["step"] == 6
    assert load(tmp_path / "stopped.pt")["settings"]["world_size"] == 2
    resumed = _torchrun(tmp_path, ["-m", "t1t2_fast.apps"], "--out", "resumed", "--checkpoint", "resumed.pt",
                        "--resume", "stopped.pt")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-6000:]
    assert resumed.stdout.count("test accuracy") == 1  # rank 0 only
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == ["full.pt", "resumed.pt", "stopped.pt"]
    assert {k: metrics(tmp_path / "resumed")[k] for k in RESULTS} == {k: metrics(tmp_path / "full")[k] for k in RESULTS}
    assert_same_final_state(load(tmp_path / "full.pt"), load(tmp_path / "resumed.pt"))
    # one process cannot continue a 2-process run: its shards and noise seeds differ
    one = train_in_new_process(tmp_path / "single", "--resume", str(tmp_path / "stopped.pt"))
    assert one.returncode == 2 and "world-size: 2 there, 1 here" in one.stderr
