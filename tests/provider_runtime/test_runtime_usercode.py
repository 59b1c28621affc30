from __future__ import annotations

import sys
from pathlib import Path

import pytest

from provider_runtime.runtime import BundleError, parse_task
from provider_runtime.usercode import PartitionArgs, UserCodeError, call_load_data, user_module

ARGS = PartitionArgs(partition_id=2, num_partitions=4, partitioning="dirichlet", alpha=0.3, seed=9)


def test_load_data_receives_only_the_keywords_it_declares() -> None:
    # Prepare
    seen: dict[str, object] = {}

    def loader(partition_id: int, seed: int, **ignored: object) -> tuple[None, None]:
        seen.update(partition_id=partition_id, seed=seed, ignored=ignored)
        return None, None

    # Execute
    call_load_data(loader, ARGS)

    # Assert
    assert seen == {"partition_id": 2, "seed": 9, "ignored": {}}


def test_load_data_without_parameters_is_called_bare() -> None:
    assert call_load_data(lambda: "whole", ARGS) == "whole"


def _code(tmp_path: Path, name: str, value: str) -> Path:
    code = tmp_path / name
    code.mkdir()
    (code / "helper.py").write_text(f"VALUE = {value!r}\n")
    (code / "task.py").write_text("from helper import VALUE\n\ndef model():\n    return VALUE\n")
    return code


def test_user_module_imports_siblings_and_forgets_them_afterwards(tmp_path: Path) -> None:
    # Prepare: two bundles whose modules share names, as a warm worker sees them one after another.
    first, second = _code(tmp_path, "a", "first"), _code(tmp_path, "b", "second")
    path_before = list(sys.path)

    # Execute
    with user_module(first, "task") as mod:
        got_first = mod.model()
    with user_module(second, "task") as mod:
        got_second = mod.model()

    # Assert
    assert (got_first, got_second) == ("first", "second")
    assert "helper" not in sys.modules
    assert "task" not in sys.modules
    assert sys.path == path_before


def test_user_module_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserCodeError, match=r"code/nothere\.py"), user_module(tmp_path, "nothere"):
        pass


def test_parse_task_accepts_float_numbers_and_defaults() -> None:
    task = parse_task({"action": "train", "hyper": {"local_epochs": 2.0, "batch_size": 16.0}, "seed": 3})

    assert task.hyper.local_epochs == 2
    assert task.hyper.batch_size == 16
    assert task.partition.count == 1
    assert task.partition.seed == 3
    assert task.device == "auto"


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"action": "fly"},
        {"action": "train", "partition": {"scheme": "by-file"}},
        {"action": "train", "hyper": {"batch_size": 0}},
        {"action": "train", "hyper": {"batch_size": "many"}},
        {"action": "train", "hyper": [1]},
    ],
)
def test_parse_task_rejects_malformed_documents(raw: object) -> None:
    with pytest.raises(BundleError):
        parse_task(raw)
