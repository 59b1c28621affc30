from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from deml_server.bundle import TaskBundle, check_code_package, load_xy, read_result, shard_data, unpack_code
from deml_server.errors import InvalidArgument
from provider_runtime.contract import TaskDoc


def _zip(tmp_path: Path, files: dict[str, str]) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    path = tmp_path / "code.zip"
    path.write_bytes(buffer.getvalue())
    return path


def test_a_valid_package_passes_without_running_user_code(tmp_path: Path) -> None:
    # The module would raise if executed; parsing only must not run it.
    path = _zip(tmp_path, {"task.py": "raise SystemExit('ran')\ndef model(): ...\ndef load_data(): ...\n"})
    check_code_package(path, "task", needs_loader=True)


@pytest.mark.parametrize(
    ("files", "needs_loader", "message"),
    [
        ({"task.py": "def load_data(): ...\n"}, True, "defines no model"),
        ({"task.py": "def model(): ...\n"}, True, "defines no load_data"),
        ({"other.py": "def model(): ...\n"}, False, "has no task.py"),
        ({"task.py": "def model(:\n"}, False, "does not parse"),
        ({"task.py": "def model(): ...\n", "../evil.py": ""}, False, "unsafe path"),
    ],
)
def test_bad_packages_are_named(tmp_path: Path, files: dict[str, str], needs_loader: bool, message: str) -> None:
    path = _zip(tmp_path, files)
    with pytest.raises(InvalidArgument, match=message):
        check_code_package(path, "task", needs_loader=needs_loader)


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "x.zip"
    path.write_bytes(b"not a zip")
    with pytest.raises(InvalidArgument, match="not a zip"):
        check_code_package(path, "task", needs_loader=False)


def test_unpack_code(tmp_path: Path) -> None:
    path = _zip(tmp_path, {"task.py": "def model(): ...\n", "lib/helper.py": "X = 1\n"})
    unpack_code(path, tmp_path / "code")
    assert (tmp_path / "code" / "lib" / "helper.py").read_text() == "X = 1\n"


def test_load_xy_rejects_bad_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "noy.npz", x=np.zeros((3, 2)))
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((3, 2)), y=np.zeros(4))
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(InvalidArgument, match="arrays 'x' and 'y'"):
        load_xy(tmp_path / "noy.npz", "data")
    with pytest.raises(InvalidArgument, match="same number of rows"):
        load_xy(tmp_path / "mismatch.npz", "data")
    with pytest.raises(InvalidArgument, match=r"not a readable \.npz"):
        load_xy(tmp_path / "objects.npz", "data")
    with pytest.raises(InvalidArgument, match=r"not a readable \.npz"):
        load_xy(tmp_path / "junk.npz", "data")


def test_shard_data_is_deterministic_and_complete(tmp_path: Path) -> None:
    # Prepare
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.arange(100) % 5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    kwargs = {"count": 4, "scheme": "iid", "alpha": 0.5, "seed": 3, "test_fraction": 0.2}
    # Execute
    a = shard_data(tmp_path / "d.npz", None, tmp_path / "a", **kwargs)  # type: ignore[arg-type]
    b = shard_data(tmp_path / "d.npz", None, tmp_path / "b", **kwargs)  # type: ignore[arg-type]
    # Assert
    rows = [np.load(p)["x"] for p in a.train]
    test_rows = np.load(a.test)["x"]
    assert len(test_rows) == 20
    assert sum(len(r) for r in rows) == 80
    seen = np.concatenate([*rows, test_rows])[:, 0]
    assert sorted(seen.tolist()) == sorted(x[:, 0].tolist())
    for p, q in zip(a.train, b.train, strict=True):
        assert np.array_equal(np.load(p)["x"], np.load(q)["x"])


def test_task_bundle_layout_and_result_parsing(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "task.py").write_text("def model(): ...\n")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"w")
    bundle = TaskBundle(action="train", module="task", partition_index=1, partition_count=4, seed=7, task_seed=9)
    bundle.weights = weights
    out = bundle.write(tmp_path / "in", code)
    assert (out / "code" / "task.py").exists()
    assert (out / "weights.safetensors").read_bytes() == b"w"
    doc = json.loads((out / "task.json").read_text())
    assert TaskDoc.from_dict(doc) == bundle.task_doc()
    assert doc["partition"] == {"index": 1, "count": 4, "scheme": "iid", "alpha": 0.5, "seed": 7}
    assert doc["seed"] == 9
    result_dir = tmp_path / "out"
    result_dir.mkdir()
    (result_dir / "result.json").write_text('{"status": "ok", "num_examples": 5, "metrics": {"loss": 1}}')
    result = read_result(result_dir)
    assert result.ok and result.num_examples == 5 and result.metrics == {"loss": 1.0}
    (result_dir / "result.json").write_text('{"num_examples": 1}')
    with pytest.raises(ValueError, match="lacks the field 'status'"):
        read_result(result_dir)


def test_task_bundles_link_the_jobs_read_only_code_instead_of_copying_it(tmp_path: Path) -> None:
    # Prepare: a code package unpacked once for the job
    package = tmp_path / "code.zip"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("task.py", "def model(): ...\n")
        archive.writestr("lib/helpers.py", "X = 1\n")
    code = tmp_path / "job" / "code"
    unpack_code(package, code)

    # Execute: two attempts' bundles
    first = TaskBundle(action="init", module="task").write(tmp_path / "a1", code)
    second = TaskBundle(action="init", module="task").write(tmp_path / "a2", code)

    # Assert: every bundle's file is the job's file (one inode, no bytes copied), and none can be written
    for name in ("task.py", "lib/helpers.py"):
        inodes = {(root / name).stat().st_ino for root in (code, first / "code", second / "code")}
        assert len(inodes) == 1
        assert (code / name).stat().st_mode & 0o222 == 0
    # A new bundle directory each time: what a task adds (e.g. __pycache__) stays in its own bundle
    (first / "code" / "extra.py").write_text("")
    assert not (code / "extra.py").exists()
