"""Real negotiation with yagna up to ActivityCreated: a second yagna identity plays a REST-only provider.

Central net on one daemon, inside a loopback-only network namespace (GOLEM.md). The provider offers a VM,
counters, approves the agreement and reports its activity initialised, but has no exe-unit, so the VM never
starts: the backend must say that providers agreed but none could start the image.
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
    return run_scenario(tmp_path_factory.mktemp("negotiation"), "negotiation")


def test_negotiation_reaches_an_agreement_and_an_activity(scenario: dict[str, dict[str, Any]]) -> None:
    result = scenario["negotiation"]
    assert result["provider"] != result["requestor"]
    for event in ("ProposalReceived", "ProposalConfirmed", "AgreementCreated", "AgreementConfirmed", "ActivityCreated"):
        assert event in result["events"], f"{event} never happened: {result['events']}"
    assert result["provider_agreements"] >= 1 and result["provider_activities"] >= 1


def test_a_provider_that_cannot_start_the_vm_is_named(scenario: dict[str, dict[str, Any]]) -> None:
    result = scenario["negotiation"]
    assert result["error"] == "Unavailable"
    assert "signed an agreement" in result["message"] and "none could start the VM image" in result["message"]
    assert "endpoint address not found" in result["message"] or "last error" in result["message"]
    assert 25 <= result["seconds"] < 40


def test_nothing_leaves_loopback(scenario: dict[str, dict[str, Any]]) -> None:
    assert scenario["namespace"]["only_loopback"] and scenario["end"]["only_loopback"]
    assert scenario["negotiation"]["peers"] == [] and scenario["end"]["peers"] == []
