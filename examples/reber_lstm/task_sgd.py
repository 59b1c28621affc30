"""The embedded Reber task (task.py) with plain SGD on the workers, for rounds of a few local steps.

With `local_steps = 1` a round's average of the workers' updates is one minibatch gradient step on the pooled
data, and a server optimizer (`strategy = "fedadam"`) turns those steps into Adam's: the task's own Adam on the
workers would send sign-like first steps instead (a fresh Adam's first step is about lr x sign(gradient)), which
on this task's strongly label-skewed Dirichlet 0.1 partitions stays at chance (README.md, "Dirichlet 0.1"). Use
it with `module = "task_sgd"`; everything else is task.py's.
"""

from __future__ import annotations

import torch
from task import example_input, load_data, model

__all__ = ["example_input", "load_data", "model", "optimizer"]


def optimizer(params: object, lr: float) -> torch.optim.Optimizer:
    """Plain SGD (no momentum): with one local step the update is -lr x the minibatch gradient."""
    return torch.optim.SGD(params, lr=lr)  # type: ignore[arg-type]
