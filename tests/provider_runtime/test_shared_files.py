"""reserve(): files on /dev/shm sized with their pages reserved, falling back to a smaller size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from provider_runtime.contract import reserve

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm")
TOO_BIG = 1 << 50  # 1 PiB: no RAM file system here has room for it


@pytest.fixture
def fd():
    path = SHM / f"deml-test-reserve-{os.getpid()}"
    handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    yield handle
    os.close(handle)
    path.unlink()


def test_reserve_takes_the_first_size_there_is_room_for(fd) -> None:
    size = reserve(fd, [TOO_BIG, 3 << 20], 0)

    assert size == 3 << 20
    assert os.fstat(fd).st_size == 3 << 20
    assert os.fstat(fd).st_blocks * 512 >= 3 << 20  # pages allocated, not a sparse file


def test_reserve_without_room_leaves_the_file_as_it_was(fd) -> None:
    reserve(fd, [1 << 20], 0)

    with pytest.raises(OSError):
        reserve(fd, [TOO_BIG], 1 << 20)

    assert os.fstat(fd).st_size == 1 << 20
