"""The demand and the market: price caps as LeastExpensiveLinearPayuMS takes them, the payload's constraints,
and GPU demands refused outside Polygon mainnet (at start-up and when a job asks for the golem backend)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("yapapi", reason="the golem extra is not installed: pip install 'deml[golem]'")

from golem_support import DIGITS, standin_config
from yapapi.contrib.strategy import ProviderFilter
from yapapi.props.builder import DemandBuilder
from yapapi.props.com import Counter
from yapapi.strategy import SCORE_REJECTED, LeastExpensiveLinearPayuMS

from deml_client.client import zip_task_dir
from deml_server.artifacts import ArtifactStore
from deml_server.backends import LocalBackend, create_backend
from deml_server.backends.golem import GolemBackend, build_payload, market_strategy, price_caps
from deml_server.config import ServerConfig
from deml_server.errors import FailedPrecondition
from deml_server.jobs import JobService
from deml_server.registry import ModelRegistry
from deml_server.store import JobStore


def offer(provider: str, *, start: float, cpu_per_hour: float, duration_per_hour: float) -> SimpleNamespace:
    """An offer's pricing properties as a provider publishes them (linear coefficients per second)."""
    props = {
        "golem.com.scheme": "payu",
        "golem.com.pricing.model": "linear",
        "golem.com.usage.vector": ["golem.usage.cpu_sec", "golem.usage.duration_sec"],
        "golem.com.pricing.model.linear.coeffs": [cpu_per_hour / 3600, duration_per_hour / 3600, start],
    }
    return SimpleNamespace(id=f"offer-{provider}", issuer=provider, props=props)


def test_price_caps_are_glm_per_second_from_the_hourly_settings() -> None:
    # Prepare
    config = standin_config(
        max_start_price_glm=0.02, max_cpu_price_glm_per_hour=0.36, max_duration_price_glm_per_hour=1.8
    )
    # Execute
    caps = price_caps(config)
    # Assert
    assert caps["max_fixed_price"] == Decimal("0.02")
    assert caps["max_price_for"] == {Counter.CPU: Decimal("0.0001"), Counter.TIME: Decimal("0.0005")}
    assert caps["expected_time_secs"] > 0


async def test_offers_above_a_cap_or_from_a_blocked_provider_are_rejected() -> None:
    # Prepare: the default caps (0.01 GLM to start, 0.5 GLM per CPU hour and per hour).
    blocked = {"0xbad"}
    strategy = market_strategy(standin_config(), lambda provider: provider not in blocked)
    fair = offer("0xok", start=0.0, cpu_per_hour=0.1, duration_per_hour=0.02)
    # Execute
    scores = {
        "fair": await strategy.score_offer(fair),
        "start": await strategy.score_offer(offer("0xa", start=1.0, cpu_per_hour=0.1, duration_per_hour=0.02)),
        "cpu": await strategy.score_offer(offer("0xb", start=0.0, cpu_per_hour=2.0, duration_per_hour=0.02)),
        "duration": await strategy.score_offer(offer("0xc", start=0.0, cpu_per_hour=0.1, duration_per_hour=3.0)),
        "blocked": await strategy.score_offer(offer("0xbad", start=0.0, cpu_per_hour=0.1, duration_per_hour=0.02)),
    }
    # Assert
    assert isinstance(strategy, ProviderFilter) and isinstance(strategy.base_strategy, LeastExpensiveLinearPayuMS)
    assert scores["fair"] > SCORE_REJECTED
    assert {k: v for k, v in scores.items() if k != "fair"} == dict.fromkeys(
        ("start", "cpu", "duration", "blocked"), SCORE_REJECTED
    )


async def demand_of(**config: object) -> DemandBuilder:
    demand = DemandBuilder()
    await demand.decorate(await build_payload(standin_config(**config)))
    return demand


async def test_cpu_payload_asks_for_the_vm_runtime_and_the_machine_size() -> None:
    # Execute
    demand = await demand_of(min_mem_gib=3.0, min_storage_gib=6.0, min_cpu_threads=2)
    # Assert
    text = str(demand.constraints)
    assert "(golem.runtime.name=vm)" in text and "gpu" not in text and "capabilities" not in text
    assert "golem.inf.mem.gib>=3.0" in text and "golem.inf.storage.gib>=6.0" in text
    assert "golem.inf.cpu.threads>=2" in text
    assert demand.properties["golem.srv.comp.task_package"] == f"hash:sha3:{'0' * 56}:http://127.0.0.1:9/image.gvmi"
    assert demand.properties["golem.srv.comp.vm.package_format"] == "gvmkit-squash"


async def test_gpu_payload_asks_for_vm_nvidia_and_the_gpu_capability() -> None:
    # Execute
    demand = await demand_of(gpu=True, payment_network="polygon", min_mem_gib=8.0, min_cpu_threads=4)
    # Assert
    text = str(demand.constraints)
    assert "golem.runtime.name=vm-nvidia" in text and "golem.runtime.capabilities=!exp:gpu" in text
    assert "golem.inf.mem.gib>=8.0" in text and "golem.inf.cpu.threads>=4" in text


async def test_a_gpu_demand_on_hoodi_is_refused_at_start_up(tmp_path: Path) -> None:
    # Prepare: the server's own backend, and a server whose jobs may ask for golem.
    backend = GolemBackend(config=standin_config(gpu=True, payment_network="hoodi"), work_dir=tmp_path / "w")
    server_config = ServerConfig(data_dir=tmp_path / "server", backend="local")
    server_config.golem = standin_config(gpu=True, payment_network="hoodi")
    # Execute / Assert: both refuse before any yagna is contacted, naming Polygon and how to switch.
    for starting in (backend, create_backend("golem", server_config)):
        with pytest.raises(FailedPrecondition) as refused:
            await starting.start()
        message = refused.value.reason
        assert "GPU providers are only on Polygon mainnet, not on 'hoodi'" in message
        assert "DEML_GOLEM_PAYMENT_NETWORK=polygon" in message
        assert "yagna payment init --sender --network=polygon" in message


async def test_a_job_asking_for_golem_gpus_on_hoodi_is_refused_at_submit(tmp_path: Path) -> None:
    # Prepare: a server running the local backend, whose jobs may ask for golem (started on first use).
    config = ServerConfig(data_dir=tmp_path, backend="local", workers=1)
    config.golem = standin_config(gpu=True, payment_network="hoodi")
    store = JobStore(tmp_path / "deml.sqlite3")
    artifacts = ArtifactStore(tmp_path / "artifacts")
    local = LocalBackend(workers=1, work_dir=tmp_path / "workers")
    jobs = JobService(
        config=config,
        store=store,
        artifacts=artifacts,
        registry=ModelRegistry(store, artifacts),
        backend=local,
        backend_factory=lambda name: create_backend(name, config),
    )
    try:
        upload = jobs.begin_upload()
        upload.add("code", zip_task_dir(DIGITS))
        # Execute / Assert: refused with the Polygon message, and no job row was created.
        with pytest.raises(FailedPrecondition, match="GPU providers are only on Polygon mainnet"):
            await jobs.submit({"name": "digits", "backend": "golem"}, upload.finish())
        assert jobs.list() == []
    finally:
        await jobs.close()
        store.close()


def test_gpu_images_get_the_longer_deploy_timeout() -> None:
    assert standin_config().deploy_seconds == 20 * 60
    assert standin_config(gpu=True, payment_network="polygon").deploy_seconds == 60 * 60
    assert standin_config(deploy_timeout_seconds=90.0).deploy_seconds == 90
