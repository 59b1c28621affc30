"""Handwritten digits (scikit-learn's bundled 8x8 images): a small MLP, the task DeML trains first.

DeML calls `model()` and `load_data()`; `python task.py` trains the same model centrally, for your own
testing, with the settings in deml.toml, and prints the test accuracy.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

Split = tuple[np.ndarray, np.ndarray]


def model() -> nn.Module:
    """64 pixel intensities in, 10 class logits out."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def load_data() -> tuple[Split, Split]:
    """The whole data set as (x, y) train and test pairs; DeML partitions the training part across workers.

    Pixels (0..16) are scaled to [0, 1], so inference requests send `digits.data / 16` as float32.
    The split is fixed (stratified 80/20, seed 0) so that every worker sees the same test set.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return (x_train, y_train), (x_test, y_test)


def _train_centrally() -> None:
    spec = tomllib.loads((Path(__file__).with_name("deml.toml")).read_text())["train"]
    epochs = spec["rounds"] * spec["local_epochs"]
    torch.manual_seed(spec["seed"])
    net = model()
    (x_train, y_train), (x_test, y_test) = load_data()
    train = torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    loader = torch.utils.data.DataLoader(train, batch_size=spec["batch_size"], shuffle=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=spec["learning_rate"], momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        net.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(net(xb), yb).backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(torch.from_numpy(x_test)).argmax(dim=1) == torch.from_numpy(y_test)).float().mean()
    print(f"trained {epochs} epochs on {len(x_train)} rows: test accuracy {accuracy.item():.4f}")


if __name__ == "__main__":
    _train_centrally()
