"""Integrations with training frameworks (each imports its framework when used; the library never
imports this package): ``t1t2_fast.integrations.lightning`` for PyTorch Lightning,
``t1t2_fast.integrations.hf`` for the Hugging Face Trainer."""
