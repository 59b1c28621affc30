"""The golem backend against the real yagna daemon (golem-node), in a network namespace with only loopback.

The whole scenario (daemon, requestor, checks) runs in `unshare --net`, so nothing can leave the machine; every
address yagna would use is also pointed at 127.0.0.1 (GOLEM.md). No provider exists, so the job must end with
the clear "no provider accepted the work" error within its deadline, after the demand was really posted.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("yapapi", reason="the golem extra is not installed: pip install 'deml[golem]'")

from yagna_netns import namespace_problem, run_scenario

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    return run_scenario(tmp_path_factory.mktemp("netns"), "errors")


def test_nothing_leaves_loopback(scenario: dict[str, dict[str, Any]]) -> None:
    assert scenario["namespace"]["only_loopback"] and scenario["end"]["only_loopback"]
    assert scenario["no_provider"]["peers"] == [] and scenario["end"]["peers"] == []


def test_no_provider_is_reported_within_the_deadline_after_the_demand_is_posted(
    scenario: dict[str, dict[str, Any]],
) -> None:
    result = scenario["no_provider"]
    assert result["demand_posted"], "yapapi never posted the demand to yagna's market"
    assert "golem.runtime.name=vm" in result["demand_constraints"]
    assert "golem.node.debug.subnet=deml-netns-test" in result["demand_constraints"]
    assert result["error"] == "Unavailable"
    assert result["message"].startswith("no provider accepted the work within 20 s")
    assert 20 <= result["seconds"] < 35


def test_wrong_app_key_is_named(scenario: dict[str, dict[str, Any]]) -> None:
    assert scenario["wrong_key"]["error"] == "FailedPrecondition"
    assert "rejected the app key (HTTP 401)" in scenario["wrong_key"]["message"]


def test_missing_gftp_is_named(scenario: dict[str, dict[str, Any]]) -> None:
    assert scenario["no_gftp"]["error"] == "FailedPrecondition"
    assert scenario["no_gftp"]["message"].startswith("gftp is not on PATH")


def test_refused_allocation_is_named(scenario: dict[str, dict[str, Any]]) -> None:
    assert scenario["allocation"]["error"] == "ResourceExhausted"
    assert "yagna refused the budget allocation of 0.5 GLM on erc20-hoodi" in scenario["allocation"]["message"]
    assert "yagna payment fund" in scenario["allocation"]["message"]


def test_a_gpu_demand_on_hoodi_is_refused_at_start_up(scenario: dict[str, dict[str, Any]]) -> None:
    result = scenario["gpu_on_hoodi"]
    assert result["error"] == "FailedPrecondition"
    assert result["message"].startswith("GPU providers are only on Polygon mainnet, not on 'hoodi'")
    assert "yagna payment init --sender --network=polygon" in result["message"]
    assert result["seconds"] < 5  # refused before yagna is asked anything
