"""The applications built on the t1t2_fast library: the ``t1t2`` command (``python -m t1t2_fast.apps``)
and the paper's experiments behind its subcommands.

- ``cli``: argument parsing and command dispatch (``train``, ``grid``, ``compare``, ``search``,
  ``peers``, ``overhead``).
- ``train``: the ``train`` run: an MLP on a built-in dataset with T1-T2 tuning its regularization,
  checkpoints and resume, torchrun (DistributedDataParallel) support.
- ``experiments`` (``grid``, ``compare``), ``search`` (T1-T2 against random search and TPE),
  ``peers`` (the one-step hypergradient against higher and torchopt), ``overhead`` (T1-T2's cost over
  plain training).
- ``models``, ``data``, ``plotting``, ``common``: the networks, the datasets and batch streams, the
  train run's figure, and what the commands share (progress bars, output files, training steps).
- ``footprint``: memory accounting for long runs (tests/apps/test_long_run.py, bench/long_run.py).

They use the library only through its public names (``import t1t2_fast as t1t2``). Their own
dependencies (tqdm, matplotlib, scikit-learn; mnist1d, higher, torchopt, Optuna for some commands) are
the ``apps``, ``mnist1d`` and ``experiments`` extras and are imported only where a command needs them,
so importing this package, or the library, loads none of them.
"""
