"""Pure fusion math: FedAvg, exact and entropic FedWB, FedWB over neurons, policies. No I/O, no MQTT."""

from aggregator.fusion.barycenter import barycenter_1d, barycenter_objective
from aggregator.fusion.fedavg import fedavg_tensor, normalize_weights
from aggregator.fusion.fuse import METHODS, SOLVERS, FusionReport, check_models, fuse, fuse_with_report, pick_solver
from aggregator.fusion.neurons import Layer, chain_from_spec, chain_problem, fedwb_neurons
from aggregator.fusion.policy import Choice, PolicyState, decide, dispersion, needs_dispersion
from aggregator.fusion.sinkhorn import SinkhornInfo, log_gauss_conv, sinkhorn_barycenter_1d

__all__ = [
    "METHODS",
    "SOLVERS",
    "Layer",
    "chain_from_spec",
    "chain_problem",
    "fedwb_neurons",
    "Choice",
    "FusionReport",
    "PolicyState",
    "SinkhornInfo",
    "barycenter_1d",
    "barycenter_objective",
    "check_models",
    "decide",
    "dispersion",
    "fedavg_tensor",
    "fuse",
    "fuse_with_report",
    "log_gauss_conv",
    "needs_dispersion",
    "normalize_weights",
    "pick_solver",
    "sinkhorn_barycenter_1d",
]
