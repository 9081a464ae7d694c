"""A small CNN trained on scikit-learn's digits in seconds, saved in every format optcli reads.

    python -m optcli.examples.digits build/example
writes digits_cnn.pt (state_dict), digits_cnn.pt2 (torch.export), digits_cnn.ts.pt (TorchScript),
digits_cnn.onnx, and train/calib/test .npz files keyed by the model's input name `x`.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class DigitsCNN(nn.Module):
    """8x8 grey digits -> 10 classes; BatchNorm and a residual block so structured pruning has work to do."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = Residual(width)
        self.features = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(2 * width, 4 * width)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.pool(self.features(self.block(self.stem(x)))).flatten(1)
        return self.classifier(torch.relu(self.hidden(x)))


def build_cnn(width: int = 32, num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN(width, num_classes)


def digits_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Digits split 60/20/20 (train/calib/test), images scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    return {"x_train": x[:a], "y_train": y[:a], "x_calib": x[a:b], "y_calib": y[a:b], "x_test": x[b:], "y_test": y[b:]}


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 8, lr: float = 3e-3, seed: int = 0
) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def make_example(folder: Path, width: int = 32, epochs: int = 8, formats=("pt", "pt2", "ts", "onnx")) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = digits_arrays()
    torch.manual_seed(0)
    model = train(build_cnn(width), arrays["x_train"], arrays["y_train"], epochs=epochs)
    np.savez(folder / "digits_train.npz", x=arrays["x_train"], y=arrays["y_train"])
    np.savez(folder / "digits_calib.npz", x=arrays["x_calib"], y=arrays["y_calib"])
    np.savez(folder / "digits_test.npz", x=arrays["x_test"], y=arrays["y_test"])
    example = torch.from_numpy(arrays["x_test"][:2])
    if "pt" in formats:
        torch.save(model.state_dict(), folder / "digits_cnn.pt")
    if "pt2" in formats:
        program = torch.export.export(
            model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},)
        )
        torch.export.save(program, str(folder / "digits_cnn.pt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # users still ship TorchScript; optcli must read it
        if "ts" in formats:
            torch.jit.save(torch.jit.trace(model, example), str(folder / "digits_cnn.ts.pt"))
        if "onnx" in formats:
            torch.onnx.export(
                model,
                (example,),
                str(folder / "digits_cnn.onnx"),
                dynamo=False,
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
            )
    return {"test_accuracy": accuracy(model, arrays["x_test"], arrays["y_test"]), "folder": str(folder)}


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/example")
    info = make_example(out)
    print(f"wrote the digits example to {out}/ (fp32 test accuracy {info['test_accuracy']:.4f})")
