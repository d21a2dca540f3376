"""One-command experiments: ``splitlbi demo`` (:func:`run_demo`) and the paper's figures."""

from splitlbi.experiments.demo import run_demo

__all__ = ["run_demo"]
