"""README's "Use it in your training code" scripts run as written and tune λ.

Each script follows an HTML comment ``<!-- snippet: NAME -->`` and is the ```python block right
after it: ``pytorch`` (a plain loop), ``lightning`` (PyTorch Lightning) and ``hf`` (the Hugging Face
Trainer). Each runs in a fresh interpreter (``python -c``, in an empty temporary folder, nothing
downloaded) and must exit 0 and end by printing ``opt.hyperparameters()``; every value printed must
differ from its initial value, read from the ``L2(...)`` / ``L1(...)`` / ``Tunable(...)`` calls of the script. A
deleted marker, a renamed one or a broken script fails here; the Lightning and Hugging Face scripts
are skipped where their framework is not installed.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SNIPPET = re.compile(r"<!-- snippet: (\w+) -->\n```python\n(.*?)\n```\n", re.S)
EXPECTED = ("pytorch", "lightning", "hf")
NEEDS = {"pytorch": (), "lightning": ("lightning",), "hf": ("transformers", "accelerate")}
TIMEOUT_S = 300  # each script takes seconds alone; the margin is for a loaded machine


def snippets() -> dict[str, str]:
    found = SNIPPET.findall(README.read_text(encoding="utf-8"))
    names = [name for name, _ in found]
    assert sorted(names) == sorted(EXPECTED), (
        f"README.md must hold one '<!-- snippet: NAME -->' marker followed by a ```python block for each "
        f"of {EXPECTED}; found {names}")
    return dict(found)


def test_readme_has_the_three_snippets():
    assert set(snippets()) == set(EXPECTED)


def test_readme_starts_with_the_two_commands():
    """The first code block is the install-and-run command, then the test command."""
    text = README.read_text(encoding="utf-8")
    first = re.search(r"```(\w*)\n(.*?)\n```", text, re.S)
    assert first and first.group(1) == "bash"
    commands = [line for line in first.group(2).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].startswith("python3 -m venv .venv && ") and commands[0].endswith(" && .venv/bin/t1t2 train")
    assert commands[1] == ".venv/bin/python -m pytest -q tests"


def initial_values(code: str) -> dict[str, list[float]]:
    """{"l2": [inits of the L2(...) calls], "l1": [...], "tunable": [inits of the Tunable(...) calls]}
    as written in the script."""
    return {kind.lower(): [float(v) for v in re.findall(rf"\b{kind}\(\s*([0-9.eE+-]+)", code)]
            for kind in ("L2", "L1", "Tunable")}


@pytest.mark.parametrize("name", EXPECTED)
def test_snippet_runs_and_moves_lambda(name, tmp_path):
    code = snippets()[name]
    missing = [m for m in NEEDS[name] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"README's {name} snippet needs {', '.join(missing)} (pip install -e '.[{name}]')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"README's {name} snippet failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    printed = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed, f"the {name} snippet printed no hyperparameters:\n{proc.stdout[-3000:]}"
    hyper = ast.literal_eval(printed[-1])  # the last line: print(opt.hyperparameters())
    inits = initial_values(code)
    assert hyper and all(isinstance(v, float) for v in hyper.values()), hyper
    for key, value in hyper.items():
        kind = key.split(".")[0]
        assert inits.get(kind), f"{key}: no {kind.upper()}(...) call in the {name} snippet"
        assert all(abs(value - init) > 1e-6 * init for init in inits[kind]), \
            f"{key} = {value} did not move from its initial value {inits[kind]}"
