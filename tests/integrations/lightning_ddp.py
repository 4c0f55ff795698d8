"""A 2-process Lightning DDP run (CPU, gloo) with T1T2Callback, as a script: Lightning's "ddp"
strategy starts the other rank by running this file again, so it cannot run inside pytest's process.

    python lightning_ddp.py OUT_DIR automatic|manual

Each rank writes OUT_DIR/rank<r>.pt with its final parameters, raw λ, counts and world size.
tests/integrations/test_lightning.py::test_two_process_ddp compares the ranks with each other and
with a one-process run on the full batches.
"""
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import t1t2_fast as t1t2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from lightning_cases import module_class  # noqa: E402

WORLD, STEPS, HYPER_EVERY, BATCH = 2, 8, 2, 8  # BATCH per rank: the one-process run uses WORLD * BATCH


def data():
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(128, 6, generator=g, dtype=torch.float64), torch.randn(32, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x @ w).argmax(1)), TensorDataset(xv, (xv @ w).argmax(1))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def make_opt(model):
    return t1t2.T1T2(model, [t1t2.L2(0.01, per="layer"), t1t2.L1(0.001)], optimizer="sgd", lr=0.2, momentum=0.9,
                     hyper_every=HYPER_EVERY, hyper_lr=0.05, backend="reference")


def main(out: str, mode: str) -> None:
    import lightning as L

    from t1t2_fast.integrations.lightning import T1T2Callback

    Module = module_class(mlp, make_opt, mode == "manual")

    train, val = data()
    module = Module()
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[T1T2Callback(DataLoader(val, batch_size=BATCH))], num_sanity_val_steps=0,
                        limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        trainer.fit(module, DataLoader(train, batch_size=BATCH))  # Lightning adds a DistributedSampler
    opt = trainer.optimizers[0]
    opt = getattr(opt, "_optimizer", opt)
    torch.save({"params": [p.detach().clone() for p in module.net.parameters()],
                "raw": {k: v.detach().clone() for k, v in opt.raw_hyperparameters().items()},
                "steps": opt.steps, "hyper_steps": opt.hyper_steps, "world_size": opt.world_size,
                "rank": trainer.global_rank}, os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
