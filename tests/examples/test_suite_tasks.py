"""The suite's task modules: the Reber generator against the grammar, the encodings, the models' sizes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# The embedded Reber grammar written as a regular expression, independently of the generator's automaton:
# the inner string either ends from the state after V (P T* V V) or loops X T* V P between its two middle
# states and ends with S or X T* V V.
_INNER = r"(PT*VV|(TS*X|PT*VP)(XT*VP)*(S|XT*VV))"
EMBEDDED = re.compile(rf"^B(T B{_INNER}E T|P B{_INNER}E P)E$".replace(" ", ""))


def _task(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"suite_{name}", EXAMPLES / name / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reber_strings_follow_the_grammar_and_both_branches_occur() -> None:
    # Prepare
    reber = _task("reber_lstm")

    # Execute
    strings = reber.strings(2000, seed=7)

    # Assert
    assert all(EMBEDDED.match(s) for s in strings), [s for s in strings if not EMBEDDED.match(s)][:3]
    assert max(len(s) for s in strings) <= reber.MAX_LENGTH
    assert {s[1] for s in strings} == {"T", "P"}
    assert 0.45 < sum(s[1] == "T" for s in strings) / len(strings) < 0.55
    assert strings == reber.strings(2000, seed=7)
    assert strings != reber.strings(2000, seed=8)
    # The pattern itself rejects an inner string that cannot end (S S from the first state), and a repeated
    # symbol that differs from the second one.
    assert EMBEDDED.match("BTBTXSETE")
    assert not EMBEDDED.match("BTBTSSETE")
    assert not EMBEDDED.match("BTBTXSEPE")


def test_reber_encoding_keeps_the_prefix_and_labels_the_repeated_symbol() -> None:
    # Prepare
    reber = _task("reber_lstm")
    strings = ["BTBTSXSETE", "BPBPVVEPE"]

    # Execute
    x, y = reber.encode(strings)

    # Assert: left-padded one-hot rows decode back to the string without its last two symbols
    assert x.shape == (2, reber.STEPS, 7) and x.dtype == np.float32
    for row, string in zip(x, strings, strict=True):
        used = row.sum(axis=1) == 1.0
        assert not used[: reber.STEPS - len(string) + 2].any()
        assert "".join(reber.SYMBOLS[i] for i in row[used].argmax(axis=1)) == string[:-2]
    assert y.tolist() == [0, 1]


def test_suite_models_have_tens_of_thousands_of_parameters_and_export_shapes() -> None:
    # Prepare
    torch.manual_seed(0)
    reber, mnist = _task("reber_lstm"), _task("mnist_cnn")

    # Execute
    outputs = {name: (task.model(), task.example_input()) for name, task in (("reber", reber), ("mnist", mnist))}

    # Assert
    for name, (net, sample) in outputs.items():
        params = sum(p.numel() for p in net.parameters())
        assert params >= 20_000, (name, params)
        with torch.no_grad():
            out = net(sample)
        assert out.shape == (sample.shape[0], 2 if name == "reber" else 10)
