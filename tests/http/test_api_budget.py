"""The server page's budget figures come from the golem backend's own ledger (no Golem network needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deml_server.backends.golem_config import GolemConfig
from deml_server.backends.local import LocalBackend
from deml_server.http.api import backend_budget

golem = pytest.importorskip("deml_server.backends.golem", reason="the golem extra is not installed")


def test_budget_spent_and_left_follow_the_ledger(tmp_path: Path) -> None:
    # Prepare
    backend = golem.GolemBackend(config=GolemConfig(budget_glm=2.0), work_dir=tmp_path)
    before = backend_budget(backend)
    # Execute: a task's usage, then its agreement's invoice replacing it
    backend.costs.record_activity("activity-1", "agreement-1")
    backend.costs.record_task("job j round 1 worker 0", "activity-1", 3.0, 0.25)
    used = backend_budget(backend)
    backend.costs.record_invoice("agreement-1", 0.5)
    invoiced = backend_budget(backend)
    # Assert
    assert before == {"budget_glm": 2.0, "spent_glm": 0.0, "left_glm": 2.0}
    assert used == {"budget_glm": 2.0, "spent_glm": 0.25, "left_glm": 1.75}
    assert invoiced == {"budget_glm": 2.0, "spent_glm": 0.5, "left_glm": 1.5}


def test_a_free_backend_has_no_budget(tmp_path: Path) -> None:
    assert backend_budget(LocalBackend(workers=1, work_dir=tmp_path)) is None
