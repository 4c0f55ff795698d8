"""T1T2Callback in the Hugging Face Trainer: a tiny randomly initialized BERT, synthetic batches,
CPU, nothing downloaded."""
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers "
                                                          "(pip install transformers accelerate)")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")

import t1t2_fast as t1t2  # noqa: E402
from t1t2_fast.integrations.hf import T1T2Callback  # noqa: E402

MAX_STEPS, HYPER_EVERY, BATCH, SEQ = 6, 2, 4, 8


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 100, (n, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.labels[i]}


def _tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=100, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def _train(tmp_path, loss_fn=None):
    model = _tiny_bert()
    opt = t1t2.T1T2(model, [t1t2.L2(1e-2, per="network"), t1t2.L2(1e-3, per="layer", params="classifier")],
                    optimizer="adam", lr=1e-3, hyper_every=HYPER_EVERY, hyper_lr=0.05)
    before = {n: v.clone() for n, v in opt.raw_hyperparameters().items()}
    val = torch.utils.data.DataLoader(Synthetic(2 * BATCH, seed=2), batch_size=BATCH,
                                      collate_fn=transformers.default_data_collator)  # 2 batches: cycled
    cb = T1T2Callback(opt, val, loss_fn=loss_fn)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=MAX_STEPS,
                                          per_device_train_batch_size=BATCH, report_to=[], use_cpu=True,
                                          logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Synthetic(32, seed=1),
                                   optimizers=(opt, None), callbacks=[cb])
    trainer.train()
    return opt, cb, before, trainer


def test_trainer_runs_hyper_steps_and_logs_lambda(tmp_path):
    opt, cb, before, trainer = _train(tmp_path)
    assert opt.steps == MAX_STEPS
    assert opt.hyper_steps == cb.hyper_steps == MAX_STEPS // HYPER_EVERY
    after = opt.raw_hyperparameters()
    assert all(not torch.equal(before[n], after[n]) for n in before)  # λ moved
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert len(steps) == MAX_STEPS
    for e in steps:
        assert "t1t2/l2" in e and "t1t2/l2.classifier.weight" in e and "t1t2/skipped/t1" in e
    assert "t1t2/hypergrad/l2" not in steps[0] and "t1t2/hypergrad/l2" in steps[1]  # after the first hyper step
    assert steps[-1]["t1t2/l2"] == pytest.approx(opt.hyperparameters()["l2"], rel=1e-12)
    assert steps[0]["t1t2/l2"] != steps[-1]["t1t2/l2"]


def test_loss_fn_overrides_the_validation_loss(tmp_path):
    calls = []

    def loss_fn(model, batch):
        calls.append(model.training)
        return torch.nn.functional.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])

    opt, cb, _, _ = _train(tmp_path, loss_fn)
    assert calls == [False] * (MAX_STEPS // HYPER_EVERY)  # eval mode (dropout off) for the validation loss


def test_noise_models_are_refused_with_the_reason():
    model = torch.nn.Sequential(t1t2.GaussianNoise(0.1), torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="training closure"):
        T1T2Callback(t1t2.T1T2(model, []), [])


def test_moved_first_reporters_see_lambda(tmp_path):
    """The documented reordering: callbacks after T1T2Callback (report_to integrations) get λ in logs."""
    seen = []

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append("t1t2/l2" in logs)

    model = _tiny_bert()
    opt = t1t2.T1T2(model, [t1t2.L2(1e-2, per="network")], optimizer="adam", lr=1e-3, hyper_every=1)
    val = torch.utils.data.DataLoader(Synthetic(BATCH, seed=2), batch_size=BATCH,
                                      collate_fn=transformers.default_data_collator)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=BATCH,
                                          report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Synthetic(16, seed=1),
                                   optimizers=(opt, None), callbacks=[Reporter, T1T2Callback(opt, val)])
    trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(T1T2Callback))
    trainer.train()
    assert seen and all(seen)
