"""Digits with a BatchNorm model: the same data as examples/digits, with integer buffers in the state_dict.

BatchNorm1d keeps `num_batches_tracked` as an int64 buffer next to its float running statistics; this task
exists so that weights travel, average and export with mixed dtypes intact. `python task.py` trains it
centrally and prints the test accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

Split = tuple[np.ndarray, np.ndarray]


def model() -> nn.Module:
    """64 pixel intensities in, 10 class logits out, with a BatchNorm layer after the hidden layer."""
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def load_data() -> tuple[Split, Split]:
    """The whole data set, split like examples/digits (pixels scaled to [0, 1], stratified 80/20, seed 0)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return (x_train, y_train), (x_test, y_test)


def example_input() -> torch.Tensor:
    """Export sample: four test rows."""
    return torch.from_numpy(load_data()[1][0][:4])


if __name__ == "__main__":
    torch.manual_seed(0)
    net = model()
    (x_train, y_train), (x_test, y_test) = load_data()
    train = torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(10):
        net.train()
        for xb, yb in torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, drop_last=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(torch.from_numpy(x_test)).argmax(dim=1) == torch.from_numpy(y_test)).float().mean()
    print(f"test accuracy {accuracy.item():.4f}")
