"""`t1t2 train`, interrupted: ``python interrupt_train.py STOP train ...`` raises KeyboardInterrupt
(what Ctrl-C raises) when T1 step STOP + 1 begins, in every process of a torchrun job alike: a run
stopped mid-way. Used by tests/apps/test_cli_resume.py (which patches in-process runs the same way)."""
import sys

from t1t2_fast import T1T2
from t1t2_fast.apps import cli


def interrupting_step(stop: int, step=T1T2.step):
    """T1T2.step that raises KeyboardInterrupt instead of taking step ``stop`` + 1."""

    def interrupted(self, *args, **kwargs):
        if self.steps == stop:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    return interrupted


if __name__ == "__main__":
    T1T2.step = interrupting_step(int(sys.argv[1]))
    sys.exit(cli.main(sys.argv[2:]))
