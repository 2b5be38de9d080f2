"""The task plugin interface: build a model, train it for a budget, evaluate it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: naming or checking a task (``fedwb aggregator --task bogus``) needs none
StateDict = dict[str, "torch.Tensor"]


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
        import torch

        self.seed = seed
        self.device = torch.device(device)
        self.options = options

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A fresh model, initialized from ``seed``."""

    def initial_weights(self) -> StateDict:
        """Version 0 of the global model."""
        import torch

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

    def layer_chain(self) -> list[tuple[str, str | None, int]] | None:
        """The model's layers in order, for fusion over neurons: ``(weight, bias, in_block)`` each.

        ``weight`` has units first; ``bias`` may be ``None``; ``in_block`` is how many inputs
        of this layer each unit of the previous layer feeds (1 after a Linear, H*W after a
        flattened Conv2d). The last entry is the output layer (never permuted). ``None``
        (the default) means the model cannot be aligned unit by unit: such fusions fall
        back to FedAvg and say so. Declare every float tensor of the model here.
        """
        return None

    def interrupt(self) -> None:  # noqa: B027 - optional hook
        """Ask a running ``train`` to stop at its next local boundary."""
