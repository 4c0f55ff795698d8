"""`t1t2 train --logger tensorboard`: event files in the output folder holding λ (T1T2.log_dict())."""
import sys

import pytest

from t1t2_fast.apps.cli import main

TINY = ["--width", "16", "--batch-size", "32", "--quiet"]


def test_tensorboard_event_file_holds_lambda(tmp_path):
    pytest.importorskip("tensorboard", reason="--logger tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), *TINY, "--steps", "20", "--log-every", "10", "--per", "unit",
               "--noise", "input", "--logger", "tensorboard"])
    assert rc == 0
    events = sorted(out.glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert (out / "log.csv").exists()  # the CSV log is written either way
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("t1t2/loss/train", "t1t2/loss/val", "t1t2/l2.fc1.weight/mean", "t1t2/l2.fc1.weight/max",
                "t1t2/noise.input", "t1t2/skipped/t1", "t1t2/skipped/t2"):
        assert tag in tags, sorted(tags)
    assert [e.step for e in acc.Scalars("t1t2/noise.input")] == [0, 10, 20]
    sigma = [e.value for e in acc.Scalars("t1t2/noise.input")]
    assert sigma[0] == pytest.approx(0.1, rel=1e-6) and sigma[-1] != sigma[0]  # λ moved, and it is logged
    hyper = [e.step for e in acc.Scalars("t1t2/hypergrad/noise.input")]
    assert hyper == [10, 20]  # the hypergradient exists once a hyper step has run


def test_missing_tensorboard_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    rc = main(["train", "--out", str(tmp_path / "run"), *TINY, "--steps", "2", "--logger", "tensorboard"])
    assert rc == 2
    assert "pip install tensorboard" in capsys.readouterr().err
