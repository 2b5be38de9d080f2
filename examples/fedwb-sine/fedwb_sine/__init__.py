"""``sine``: each device fits y = sin(x + phase) with its own phase; a fedwb task plugin.

Data never leaves the device: it is generated from the device's seed. The shared target is
the wave with phase 0; devices see phases spread over [-max_phase, max_phase], so their
local optima differ (heterogeneous clients) and their average is the global optimum.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from edge_agent.tasks import StateDict, Task, TrainResult


class _Net(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(1, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class SineTask(Task):
    """Options: ``samples`` (per device, 256), ``hidden`` (32), ``max_phase`` (0.5 rad), ``lr`` (1e-2)."""

    name = "sine"

    def __init__(self, seed: int = 0, device: str = "cpu", samples: int = 256, hidden: int = 32,
                 max_phase: float = 0.5, lr: float = 1e-2, **options: Any) -> None:
        super().__init__(seed, device, **options)
        self.hidden, self.lr = int(hidden), float(lr)
        gen = torch.Generator().manual_seed(seed)
        self.phase = (torch.rand(1, generator=gen).item() * 2 - 1) * max_phase
        self.x = torch.rand(int(samples), 1, generator=gen) * 2 * math.pi - math.pi
        self.y = torch.sin(self.x + self.phase)
        self.x_test = torch.linspace(-math.pi, math.pi, 200).unsqueeze(1)
        self.y_test = torch.sin(self.x_test)

    def build_model(self) -> torch.nn.Module:
        return _Net(self.hidden)

    def train(self, weights: StateDict, budget: int) -> TrainResult:
        model = self.build_model()
        model.load_state_dict(weights)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        for _ in range(max(1, budget) * 20):  # one "epoch" = 20 full-batch steps
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(self.x), self.y)
            loss.backward()
            opt.step()
        return TrainResult({k: v.detach().clone() for k, v in model.state_dict().items()},
                           num_samples=len(self.x), metrics={"loss": float(loss.detach())})

    def evaluate(self, weights: StateDict) -> dict[str, float]:
        model = self.build_model()
        model.load_state_dict(weights)
        with torch.no_grad():
            return {"mse": float(torch.nn.functional.mse_loss(model(self.x_test), self.y_test))}

    def layer_chain(self) -> list[tuple[str, str | None, int]]:
        return [("fc1.weight", "fc1.bias", 1), ("fc2.weight", "fc2.bias", 1), ("out.weight", "out.bias", 1)]
