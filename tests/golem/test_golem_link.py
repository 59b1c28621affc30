"""Shaped provider links (shaped_link.py): a 20 MB/s link really limits what the Golem stand-in moves.

Real parts: network namespaces, veth pairs, tbf qdiscs, a file server in each namespace, TCP across the link, and
the golem backend's own worker driving the stand-in. Needs root (CI runs as root); skipped with the reason
otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("yapapi", reason="the golem extra is not installed: pip install 'deml[golem]'")

from golem_support import standin_config
from shaped_link import ShapedLinks, link_problem
from standin import StandInGolem

from deml_server.backends.base import WorkItem
from deml_server.backends.golem import GolemBackend
from deml_server.bundle import TaskBundle

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RATE = 20_000_000
SIZE = 2_000_000

TASK = """
import torch

def model():
    return torch.nn.Linear(256, 256)

def load_data():
    x = torch.randn(16, 256)
    return (x.numpy(), (x[:, 0] > 0).long().numpy()), (x.numpy(), (x[:, 0] > 0).long().numpy())
"""


@pytest.fixture
def links(tmp_path: Path) -> Iterator[ShapedLinks]:
    problem = link_problem()
    if problem:
        pytest.skip(problem)
    with ShapedLinks(1, tmp_path / "vms", rate=RATE) as made:
        yield made


async def test_two_megabytes_take_at_least_the_link_floor_each_way(tmp_path: Path, links: ShapedLinks) -> None:
    # Prepare: 2 MB of random bytes (nothing to gain from compression anywhere on the way).
    data = os.urandom(SIZE)
    target = tmp_path / "vms" / "vm-1" / "golem" / "input" / "blob"
    # Execute: up, then back down.
    started = time.monotonic()
    await links.put(0, target, data)
    up = time.monotonic() - started
    started = time.monotonic()
    back = await links.get(0, target)
    down = time.monotonic() - started
    # Assert: the bytes arrived intact, and neither direction beat 2 MB / 20 MB/s (minus tbf's 64 kB burst).
    print(f"2 MB up {up:.3f} s ({SIZE / up / 1e6:.1f} MB/s), down {down:.3f} s ({SIZE / down / 1e6:.1f} MB/s)")
    assert target.read_bytes() == data and back == data
    floor = (SIZE - 64 * 1024) / RATE
    assert up >= floor and down >= floor
    assert links.links[0].bytes_up == SIZE and links.links[0].bytes_down == SIZE


async def test_a_golem_task_moves_its_uploads_and_result_over_the_link(tmp_path: Path, links: ShapedLinks) -> None:
    # Prepare: a stand-in provider whose VM tree is served across the link, and an init task.
    standin = StandInGolem(tmp_path / "vms", providers=1, link=links)
    backend = GolemBackend(
        config=standin_config(), work_dir=tmp_path / "work", golem_factory=standin.factory, payload=object()
    )
    code = tmp_path / "code"
    code.mkdir()
    (code / "task.py").write_text(TASK)
    bundle = TaskBundle(action="init", module="task").write(tmp_path / "in", code)
    output = tmp_path / "out"
    output.mkdir()
    item = WorkItem(label="job j1 init", action="init", bundle=bundle, output=output, timeout=120.0, job_id="j1")
    # Execute
    await backend.start()
    try:
        outcome = await backend.run(item)
    finally:
        await backend.close()
    # Assert: the task succeeded; its code went up and its result came down the link (a tar of the initial
    # weights, whole).
    assert outcome.ok, outcome.error
    weights = sum(p.stat().st_size for p in output.rglob("*.safetensors"))
    link = links.links[0]
    assert link.bytes_up >= (code / "task.py").stat().st_size
    assert link.bytes_down >= 0.8 * weights and weights > 256 * 256 * 4
