"""``noop``: a configurable set of tensors and no training, for load tests and benchmarks.

"Training" returns the received weights plus tiny Gaussian noise (std ``noise``);
evaluation reports the mean absolute weight. Default: one 1000x1000 float32 tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from edge_agent.tasks.base import StateDict, Task, TrainResult

NOISE = 1e-3  # default std of the noise "training" adds (bench.vs_flower gives Flower's clients the same)


def parse_shapes(spec: str | list[list[int]] | None) -> list[list[int]]:
    """``"1000x1000,10"`` -> ``[[1000, 1000], [10]]``."""
    if spec is None:
        return [[1000, 1000]]
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)  # --task-option shapes=10 arrives as JSON's 10: one tensor of 10, as the string "10"
    if not isinstance(spec, str | list):
        raise ValueError(f"bad noop shapes {spec!r}: use e.g. 1000x1000,10 or [[1000, 1000], [10]]")
    if isinstance(spec, list):  # from JSON (--task-option shapes=[[784, 200], [200]]): the same rules
        if not spec:
            raise ValueError("bad noop shapes []: give at least one shape, e.g. [[1000, 1000]]")
        for dims in spec:
            if (not isinstance(dims, list) or not dims
                    or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims)):
                raise ValueError(f"bad noop shape {dims!r}: a shape is a list of positive integers, e.g. [1000, 1000]")
        return spec
    shapes = []
    for part in spec.split(","):
        try:
            dims = [int(d) for d in part.strip().lower().split("x")]
        except ValueError:
            raise ValueError(f"bad noop shape {part!r}: use e.g. 1000x1000,10") from None
        if not dims or any(d <= 0 for d in dims):
            raise ValueError(f"bad noop shape {part!r}: dimensions must be positive")
        shapes.append(dims)
    return shapes


class _Params(torch.nn.Module):
    def __init__(self, shapes: list[list[int]]) -> None:
        super().__init__()
        for i, shape in enumerate(shapes):
            self.register_parameter(f"t{i}", torch.nn.Parameter(torch.randn(*shape).mul_(0.1)))


class NoopTask(Task):
    name = "noop"

    def __init__(self, seed: int = 0, device: str = "cpu", shapes: Any = None,
                 noise: float = NOISE, **options: Any) -> None:
        super().__init__(seed, device, **options)
        self.shapes = parse_shapes(shapes)
        self.noise = noise
        self._gen = torch.Generator().manual_seed(seed)

    def build_model(self) -> torch.nn.Module:
        return _Params(self.shapes)

    def initial_weights(self) -> StateDict:
        """Version 0 without the base class's copy: this task is what big-model benches load, and a
        second copy would double the aggregator's peak memory for nothing (the module is dropped)."""
        torch.manual_seed(self.seed)
        return {k: v.detach() for k, v in self.build_model().state_dict().items()}

    def train(self, weights: StateDict, budget: int) -> TrainResult:
        out = {k: self._noisy(v) if v.is_floating_point() else v.clone() for k, v in weights.items()}
        return TrainResult(out, num_samples=max(1, budget), metrics={"loss": 0.0})

    def _noisy(self, v: torch.Tensor) -> torch.Tensor:
        """``v + noise * N(0, 1)`` in one new tensor (the noise drawn into it, scaled and added in
        place): the same values as the expression, without its two model-sized temporaries."""
        out = torch.randn(v.shape, generator=self._gen, dtype=v.dtype)
        return out.mul_(self.noise).add_(v)

    def evaluate(self, weights: StateDict) -> dict[str, float]:
        vals = [v.float().abs().mean().item() for v in weights.values() if v.is_floating_point()]
        return {"mean_abs_weight": sum(vals) / max(1, len(vals))}
