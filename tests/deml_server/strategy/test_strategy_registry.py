import pytest

from deml_server.errors import InvalidArgument
from deml_server.strategy import (
    STRATEGIES,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    make_strategy,
    strategy_options,
)


def test_registry_names() -> None:
    assert {"fedavg", "fedprox", "fedadam", "fedyogi"} <= set(STRATEGIES)


def test_make_strategy_builds_with_options() -> None:
    # Execute
    prox = make_strategy("fedprox", {"proximal_mu": 0.1})
    adam = make_strategy("FedAdam", {"eta": 0.5, "tau": 1e-9})
    yogi = make_strategy("fedyogi", {})

    # Assert
    assert isinstance(prox, FedProx)
    assert prox.configure_fit(1) == {"proximal_mu": 0.1}
    assert isinstance(adam, FedAdam)
    assert (adam.eta, adam.beta_1, adam.beta_2, adam.tau) == (0.5, 0.9, 0.99, 1e-9)
    assert isinstance(yogi, FedYogi)
    assert (yogi.eta, yogi.beta_1, yogi.beta_2, yogi.tau) == (0.1, 0.9, 0.99, 1e-3)


def test_empty_name_means_fedavg() -> None:
    assert type(make_strategy("", {})) is FedAvg


def test_unknown_name_lists_known_ones() -> None:
    known = r"known: fedavg, fedprox, fedadam, fedyogi"
    with pytest.raises(InvalidArgument, match=rf"unknown strategy 'fedsgd'; {known}"):
        make_strategy("fedsgd", {})


def test_unknown_option_names_key_and_accepted_ones() -> None:
    with pytest.raises(InvalidArgument, match=r"no option 'mu'; accepted: eta, beta_1, beta_2, tau"):
        make_strategy("fedadam", {"mu": 1.0})
    with pytest.raises(InvalidArgument, match=r"no option 'eta'; accepted: none"):
        make_strategy("fedavg", {"eta": 1.0})


def test_bad_option_values() -> None:
    with pytest.raises(InvalidArgument, match="beta_1"):
        make_strategy("fedadam", {"beta_1": 1.0})
    with pytest.raises(InvalidArgument, match="finite"):
        make_strategy("fedprox", {"proximal_mu": float("nan")})
    with pytest.raises(InvalidArgument, match="eta"):
        make_strategy("fedyogi", {"eta": 0.0})


def test_strategy_options() -> None:
    assert strategy_options("fedprox") == ("proximal_mu",)
    assert strategy_options("") == ()
