"""PyTorch Lightning: T1T2Callback with a T1T2 from configure_optimizers, in automatic and manual
optimization, against the same run written as a plain PyTorch loop (bit-identical θ and λ: same
initial weights, same batches in the same order, and Lightning's closures are recognised by
T1T2.step, so the update is the one a forward-only closure gives)."""
import copy
import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import t1t2_fast as t1t2

from conftest import ROOT, needs_gloo
from lightning_cases import module_class

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="PyTorch Lightning is not installed (pip install lightning)")

STEPS, HYPER_EVERY = 12, 3


def data():
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(64, 6, generator=g), torch.randn(32, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    train = TensorDataset(x, (x @ w).argmax(1))
    val = TensorDataset(xv, (xv @ w).argmax(1))
    return DataLoader(train, batch_size=8), DataLoader(val, batch_size=8)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def noisy_mlp():
    torch.manual_seed(0)
    return nn.Sequential(t1t2.GaussianNoise(0.2), nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


class TunableScale(nn.Module):
    """y = s·x with s a Tunable of the model (hyperparameter ``tunable.<name>.s``)."""

    def __init__(self):
        super().__init__()
        self.s = t1t2.Tunable(1.0)

    def forward(self, x):
        return x * self.s()


def tunable_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), TunableScale(), nn.Linear(16, 3))


def make_opt(model, opt_name):
    kw = dict(optimizer="sgd", lr=0.2, momentum=0.9) if opt_name == "momentum" else dict(optimizer="adam", lr=0.02)
    return t1t2.T1T2(model, [t1t2.L2(0.01, per="layer"), t1t2.L1(0.001)], hyper_every=HYPER_EVERY,
                     hyper_lr=0.05, backend="reference", **kw)


def cycled(loader):
    """The loader's batches in order, restarted when exhausted (as Lightning's epochs and the
    callback's validation batches are)."""
    while True:
        yield from loader


def plain_loop(opt_name, net=mlp):
    """The same run as a plain PyTorch loop."""
    train, val = data()
    model = net()
    opt = make_opt(model, opt_name)
    batches, val_batches = cycled(train), cycled(val)
    for _ in range(STEPS):
        x, y = next(batches)
        opt.step(lambda: F.cross_entropy(model(x), y))
        if opt.hyper_due:
            xv, yv = next(val_batches)
            opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))
    return model, opt


def lightning_run(opt_name, manual, val_out=lambda loss: loss, loss_fn=None, net=mlp, trainer_kw=None,
                  **callback_kw):
    import lightning as L

    from t1t2_fast.integrations.lightning import T1T2Callback

    Module = module_class(net, lambda model: make_opt(model, opt_name), manual, val_out)

    train, val = data()
    module = Module()
    callback = T1T2Callback(val, loss_fn=loss_fn, **callback_kw)
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        num_sanity_val_steps=0, limit_val_batches=0, **(trainer_kw or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        trainer.fit(module, train)
    return module, trainer, callback


@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_matches_the_plain_loop(manual, opt_name):
    module, trainer, callback = lightning_run(opt_name, manual)
    opt = trainer.optimizers[0]
    opt = getattr(opt, "_optimizer", opt)
    assert isinstance(opt, t1t2.T1T2)
    assert opt.steps == STEPS and opt.hyper_steps == STEPS // HYPER_EVERY == callback.val_batches
    model, ref = plain_loop(opt_name)
    start = make_opt(mlp(), opt_name).raw_hyperparameters()
    got, want = opt.raw_hyperparameters(), ref.raw_hyperparameters()
    assert all(not torch.equal(got[k], start[k]) for k in start)  # λ moved
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(a, b) for a, b in zip(module.net.parameters(), model.parameters()))
    metrics = trainer.callback_metrics
    for name, value in opt.hyperparameters().items():
        assert float(metrics[name]) == pytest.approx(float(torch.as_tensor(value).float().mean()))


def test_noise_hyperparameters():
    """Automatic optimization: the replay reruns Lightning's closure. Manual: nothing to rerun, so
    the callback needs train_loss_fn (and says so without it)."""
    model, ref = plain_loop("adam", noisy_mlp)
    want = ref.raw_hyperparameters()
    train_loss = lambda m, batch: F.cross_entropy(m.net(batch[0]), batch[1])  # noqa: E731
    for manual, kw in ((False, {}), (True, {"train_loss_fn": train_loss})):
        module, trainer, _ = lightning_run("adam", manual, net=noisy_mlp, **kw)
        got = trainer.optimizers[0].raw_hyperparameters()
        assert float(got["noise.0"]) != 0.2  # the noise level moved
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(a, b) for a, b in zip(module.net.parameters(), model.parameters()))
    with pytest.raises(RuntimeError, match=r"noise hyperparameters.*hyper_step\(val_closure, train=train_closure\)"):
        lightning_run("adam", True, net=noisy_mlp)


def test_tunable_hyperparameters():
    """A Tunable inside the model is replayed like a noise level: automatic optimization reruns
    Lightning's closure, manual needs train_loss_fn; both match the plain loop bit for bit."""
    model, ref = plain_loop("adam", tunable_mlp)
    want = ref.raw_hyperparameters()
    assert "tunable.2.s" in want
    train_loss = lambda m, batch: F.cross_entropy(m.net(batch[0]), batch[1])  # noqa: E731
    for manual, kw in ((False, {}), (True, {"train_loss_fn": train_loss})):
        module, trainer, _ = lightning_run("adam", manual, net=tunable_mlp, **kw)
        got = trainer.optimizers[0].raw_hyperparameters()
        assert float(got["tunable.2.s"]) != 0.0  # s = exp(λ) moved from 1
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(a, b) for a, b in zip(module.net.parameters(), model.parameters()))
    with pytest.raises(RuntimeError, match=r"tunable hyperparameters.*hyper_step\(val_closure, train=train_closure\)"):
        lightning_run("adam", True, net=tunable_mlp)


def test_gradient_accumulation():
    """accumulate_grad_batches=2: Lightning backwards the first micro-batch outside the optimizer
    step and the second inside its closure, without zeroing; the step sees both."""
    module, trainer, callback = lightning_run("momentum", False, trainer_kw={"accumulate_grad_batches": 2})
    opt = trainer.optimizers[0]
    assert opt.steps == STEPS and opt.hyper_steps == STEPS // HYPER_EVERY
    train, val = data()
    model = mlp()
    ref = make_opt(model, "momentum")
    batches, val_batches = cycled(train), cycled(val)
    for _ in range(STEPS):
        pair = [next(batches), next(batches)]
        ref.zero_grad()
        for x, y in pair:
            (F.cross_entropy(model(x), y) / 2).backward()
        ref.step()
        if ref.hyper_due:
            xv, yv = next(val_batches)
            ref.hyper_step(lambda: F.cross_entropy(model(xv), yv))
    got, want = opt.raw_hyperparameters(), ref.raw_hyperparameters()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(a, b) for a, b in zip(module.net.parameters(), model.parameters()))


def test_dict_validation_step_and_loss_fn():
    a = lightning_run("adam", False, val_out=lambda loss: {"loss": loss, "n": 8})[1]
    b = lightning_run("adam", False, val_out=lambda loss: None,
                      loss_fn=lambda m, batch: F.cross_entropy(m.net(batch[0]), batch[1]), prefix="hp/")[1]
    ra, rb = (getattr(t.optimizers[0], "_optimizer", t.optimizers[0]).raw_hyperparameters() for t in (a, b))
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    assert all(("hp/" + k) in b.callback_metrics for k in ra)


def test_validation_step_returning_neither_tensor_nor_loss_dict():
    with pytest.raises(TypeError, match="validation_step.*must return the loss tensor or a dict with a 'loss'"):
        lightning_run("adam", False, val_out=lambda loss: {"val_loss": loss})


def test_importing_the_library_does_not_import_lightning():
    import subprocess
    import sys
    code = ("import sys, t1t2_fast, t1t2_fast.integrations.lightning; "
            "print(any(m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')) for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@needs_gloo
@pytest.mark.parametrize("mode", ["automatic", "manual"])
def test_two_process_ddp(tmp_path, mode):
    """Lightning's "ddp" strategy on CPU (gloo), 2 processes, the optimizer built from the unwrapped
    module in configure_optimizers: T1T2 reduces over the default group, so λ and θ are identical on
    both ranks and equal (to rounding: the full-batch gradient is summed in another order) a
    one-process run on the union of the ranks' batches."""
    import subprocess
    import sys

    script = ROOT / "tests" / "integrations" / "lightning_ddp.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), mode], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    import lightning_ddp as run  # the script's data, model and optimizer
    for r in ranks:
        assert r["world_size"] == 2 and r["steps"] == run.STEPS and r["hyper_steps"] == run.STEPS // run.HYPER_EVERY
    a, b = ranks
    assert all(torch.equal(a["raw"][k], b["raw"][k]) for k in a["raw"])
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))
    # One process on the union of the ranks' batches: Lightning deals the training set with
    # DistributedSampler(shuffle=True, seed=0) (it always shuffles the training loader under DDP);
    # every rank validates on the same batches, the callback's loader.
    from torch.utils.data.distributed import DistributedSampler
    train, val = run.data()
    dealt = [list(DistributedSampler(train, num_replicas=run.WORLD, rank=r, shuffle=True, seed=0))
             for r in range(run.WORLD)]
    model = run.mlp()
    opt = run.make_opt(model)
    start = {k: v.clone() for k, v in opt.raw_hyperparameters().items()}
    val_batches = iter(DataLoader(val, batch_size=run.BATCH))
    for k in range(run.STEPS):
        x, y = train[torch.tensor([i for d in dealt for i in d[k * run.BATCH:(k + 1) * run.BATCH]])]
        opt.step(lambda: F.cross_entropy(model(x), y))
        if opt.hyper_due:
            xv, yv = next(val_batches)
            opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))
    for k, want in opt.raw_hyperparameters().items():
        assert not torch.equal(want, start[k])  # λ moved
        torch.testing.assert_close(a["raw"][k], want, rtol=1e-12, atol=1e-15)
    for p, q in zip(a["params"], model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-15)
