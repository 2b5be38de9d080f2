"""The task plugin interface: build a model, train it for a budget, evaluate it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


@dataclass
class TrainResult:
    """What one local training call produced."""

    weights: StateDict
    num_samples: int  # examples seen (MNIST) or environment steps (CartPole)
    metrics: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """A federated task. ``options`` are the task's own CLI options (``--pole-length`` ...)."""

    name: str = "task"

    def __init__(self, seed: int = 0, device: str = "cpu", **options: Any) -> None:
        self.seed = seed
        self.device = torch.device(device)
        self.options = options

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A fresh model, initialized from ``seed``."""

    def initial_weights(self) -> StateDict:
        """Version 0 of the global model."""
        torch.manual_seed(self.seed)
        return {k: v.detach().cpu().clone() for k, v in self.build_model().state_dict().items()}

    @abstractmethod
    def train(self, weights: StateDict, budget: int) -> TrainResult:
        """Train from ``weights`` for ``budget`` (epochs or steps) and return the result.

        ``weights`` are the decoded global model, not copied again for the task: load them
        (``load_state_dict`` copies) or compute new tensors; do not keep them across rounds.
        """

    @abstractmethod
    def evaluate(self, weights: StateDict) -> dict[str, float]:
        """Metrics of ``weights`` (accuracy, returns per pole length, ...)."""

    def interrupt(self) -> None:  # noqa: B027 - optional hook
        """Ask a running ``train`` to stop at its next local boundary."""
