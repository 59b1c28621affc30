"""The token table, the method table and the authorization decision, without a socket."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from deml_server.auth import (
    OPEN_METHODS,
    REQUIRED_ROLE,
    SERVICE_FILES,
    Authority,
    PermissionDenied,
    Role,
    Unauthenticated,
    digest,
    methods_of,
    parse_tokens,
)
from deml_server.errors import InvalidArgument
from deml_server.security import is_loopback

ADMIN = "admin-token-0123456789"
TRAIN = "train-token-0123456789"
PREDICT = "predict-token-0123456789"
TOKENS = f"""
# the operator's tokens
{ADMIN}
{TRAIN} train   # a training user
{PREDICT} PREDICT
"""


def authority() -> Authority:
    return Authority(parse_tokens(TOKENS, "tokens.txt"))


def test_every_method_of_every_service_has_a_role() -> None:
    methods = methods_of(SERVICE_FILES)
    # Prepare: the generated descriptors name every RPC the server registers (a sanity floor, not the list itself)
    assert len(methods) >= 24 and "/deml.v1.TrainingService/SubmitJob" in methods
    # Assert
    assert [m for m in methods if m not in REQUIRED_ROLE] == []
    assert {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
    } == OPEN_METHODS


def test_roles_include_the_roles_below_them() -> None:
    auth = authority()
    submit = "/deml.v1.TrainingService/SubmitJob"
    infer = "/inference.GRPCInferenceService/ModelInfer"
    assert auth.authorize(f"Bearer {ADMIN}", submit) is not None
    assert auth.authorize(f"Bearer {TRAIN}", submit) is not None
    assert auth.authorize(f"Bearer {TRAIN}", infer) is not None
    principal = auth.authorize(f"bearer {PREDICT}", infer)
    assert principal is not None and principal.role is Role.PREDICT and principal.owner == digest(PREDICT).hex()
    expected = r"a predict token may not call SubmitJob \(it needs a train or admin token\)"
    with pytest.raises(PermissionDenied, match=expected):
        auth.authorize(f"Bearer {PREDICT}", submit)


def test_a_method_without_a_role_is_for_admin_only() -> None:
    auth = authority()
    with pytest.raises(PermissionDenied, match=r"may not call NotYetWritten \(it needs an admin token\)"):
        auth.authorize(f"Bearer {TRAIN}", "/deml.v1.TrainingService/NotYetWritten")
    assert auth.authorize(f"Bearer {ADMIN}", "/deml.v1.TrainingService/NotYetWritten") is not None


def test_health_is_open_and_needs_no_token() -> None:
    assert authority().authorize(None, "/grpc.health.v1.Health/Check") is None


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing `authorization: Bearer TOKEN`"),
        ("", "must be `Bearer TOKEN`"),
        ("Bearer", "must be `Bearer TOKEN`"),
        ("Bearer ", "must be `Bearer TOKEN`"),
        (f"Basic {ADMIN}", "must be `Bearer TOKEN`"),
        (ADMIN, "must be `Bearer TOKEN`"),
        ("Bearer wrong-token-0123456789", "not valid on this server"),
        (f"Bearer {ADMIN}x", "not valid on this server"),
        ("Bearer " + "x" * 100_000, "longer than 4096"),
        ("Bearer t\u00f6ken-0123456789abcdef", "not valid on this server"),
        (b"Bearer \xff\xfe", "not ASCII"),
    ],
)
def test_bad_headers_are_unauthenticated(header: str | bytes | None, message: str) -> None:
    with pytest.raises(Unauthenticated, match=message) as err:
        authority().authorize(header, "/deml.v1.ModelService/ListModels")
    assert ADMIN not in err.value.reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no tokens"),
        ("# only a comment\n\n", "no tokens"),
        (f"{ADMIN} admin extra\n", "tokens.txt:1: expected `TOKEN \\[ROLE\\]`, found 3 fields"),
        (f"\n{ADMIN} root\n", "tokens.txt:2: unknown role 'root'"),
        ("short\n", "tokens.txt:1: the token is shorter than 16 characters"),
        (f"{ADMIN}\n{ADMIN} predict\n", "tokens.txt:2: the same token appears on an earlier line"),
        ("t\u00f6ken-0123456789abcdef\n", "tokens.txt:1: the token must be printable ASCII"),
    ],
)
def test_malformed_token_files_are_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as err:
        parse_tokens(text, "tokens.txt")
    assert ADMIN not in err.value.reason


def test_reload_replaces_tokens_and_a_bad_file_keeps_the_old_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(f"{ADMIN}\n")
    auth = Authority.from_file(path)
    method = "/deml.v1.ModelService/ListModels"
    # Execute: a new file with another token
    path.write_text(f"{TRAIN} train\n")
    assert auth.reload()
    # Assert
    assert auth.authorize(f"Bearer {TRAIN}", method) is not None
    with pytest.raises(Unauthenticated):
        auth.authorize(f"Bearer {ADMIN}", method)
    # Execute: a broken file
    path.write_text(f"{ADMIN} superuser\n")
    with caplog.at_level(logging.ERROR):
        assert not auth.reload()
    # Assert: the previous tokens stay; the log says why, without the token
    assert auth.authorize(f"Bearer {TRAIN}", method) is not None
    assert "unknown role 'superuser'" in caplog.text and ADMIN not in caplog.text and TRAIN not in caplog.text


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.org", False),
        ("", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
