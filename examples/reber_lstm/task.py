"""The embedded Reber grammar (Hochreiter & Schmidhuber 1997): an LSTM must remember one symbol across a string.

An embedded Reber string is B, then T or P, then a Reber string, then the same T or P again, then E. The
model reads a string up to, not including, that repeated symbol and says which of T and P comes next: the
answer is the second symbol of the string, up to about thirty steps back. The strings are made here by the
published grammar, from a fixed seed; nothing is downloaded.

DeML calls `model()` and `load_data()`; `python task.py` trains the same model centrally, for your own
testing, with the settings in deml.toml, and prints the test accuracy.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import torch
from torch import nn

Split = tuple[np.ndarray, np.ndarray]

SYMBOLS = "BTPSXVE"
# Longest string kept; longer ones (rare: about 1 in 200) are drawn again so the inputs have one length.
MAX_LENGTH = 32
STEPS = MAX_LENGTH - 2  # the input stops before the repeated symbol and the final E
TRAIN_STRINGS = 4000
TEST_STRINGS = 1000
HIDDEN = 96

# Reber's grammar as a finite automaton: state -> the two (symbol, next state) choices, each taken with
# probability 1/2; state 5 ends the string with E.
_REBER = {
    0: (("T", 1), ("P", 2)),
    1: (("S", 1), ("X", 3)),
    2: (("T", 2), ("V", 4)),
    3: (("X", 2), ("S", 5)),
    4: (("P", 3), ("V", 5)),
}


def reber_string(rng: np.random.Generator) -> str:
    """One string of the (plain) Reber grammar, B ... E."""
    out, state = ["B"], 0
    while state != 5:
        symbol, state = _REBER[state][int(rng.integers(2))]
        out.append(symbol)
    return "".join(out) + "E"


def embedded_reber_string(rng: np.random.Generator) -> str:
    """One string of the embedded Reber grammar: B, T or P, a Reber string, the same T or P, E."""
    outer = "TP"[int(rng.integers(2))]
    return "B" + outer + reber_string(rng) + outer + "E"


def encode(strings: list[str]) -> Split:
    """One-hot inputs (n, STEPS, 7), left-padded with zero rows, and labels (0: T comes next, 1: P)."""
    x = np.zeros((len(strings), STEPS, len(SYMBOLS)), dtype=np.float32)
    y = np.zeros(len(strings), dtype=np.int64)
    for row, string in enumerate(strings):
        prefix = string[:-2]
        for step, symbol in enumerate(prefix, start=STEPS - len(prefix)):
            x[row, step, SYMBOLS.index(symbol)] = 1.0
        y[row] = "TP".index(string[-2])
    return x, y


def strings(count: int, seed: int) -> list[str]:
    """`count` embedded Reber strings of at most MAX_LENGTH symbols, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < count:
        s = embedded_reber_string(rng)
        if len(s) <= MAX_LENGTH:
            out.append(s)
    return out


class ReberLSTM(nn.Module):
    """One LSTM layer over the one-hot symbols; its last output says T or P."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(len(SYMBOLS), HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def model() -> nn.Module:
    """(batch, 30, 7) one-hot symbols in, 2 logits (T, P) out; about 40,000 parameters."""
    return ReberLSTM()


def load_data() -> tuple[Split, Split]:
    """4,000 training and 1,000 test strings from fixed seeds (0 and 1); DeML partitions the training part."""
    return encode(strings(TRAIN_STRINGS, seed=0)), encode(strings(TEST_STRINGS, seed=1))


def example_input() -> torch.Tensor:
    """Two encoded strings, the sample ONNX export traces and checks against torch."""
    x, _ = encode(strings(2, seed=2))
    return torch.from_numpy(x)


def optimizer(params: object, lr: float) -> torch.optim.Optimizer:
    """Adam: with SGD (momentum 0.9) whether training leaves the 50 % plateau within 20 epochs depends on the seed."""
    return torch.optim.Adam(params, lr=lr)  # type: ignore[arg-type]


def _train_centrally() -> None:
    spec = tomllib.loads((Path(__file__).with_name("deml.toml")).read_text())["train"]
    epochs = spec["rounds"] * spec["local_epochs"]
    torch.set_num_threads(1)
    torch.manual_seed(spec["seed"])
    net = model()
    (x_train, y_train), (x_test, y_test) = load_data()
    train = torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    loader = torch.utils.data.DataLoader(train, batch_size=spec["batch_size"], shuffle=True)
    opt = optimizer(net.parameters(), spec["learning_rate"])
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        net.train()
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(net(xb), yb).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            accuracy = (net(torch.from_numpy(x_test)).argmax(dim=1) == torch.from_numpy(y_test)).float().mean()
        print(f"epoch {epoch + 1}/{epochs}: test accuracy {accuracy.item():.4f}")
    params = sum(p.numel() for p in net.parameters())
    print(f"trained {epochs} epochs on {len(x_train)} strings ({params} parameters): test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    _train_centrally()
