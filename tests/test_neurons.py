"""fedwb-neurons: alignment over hidden units, against hand-made permutations and FedAvg."""

from __future__ import annotations

import pytest
import torch

from aggregator.fusion import fuse_with_report
from edge_agent.tasks.mnist import CNN, MLP

MLP_CHAIN = [("net.0.weight", "net.0.bias", 1), ("net.2.weight", "net.2.bias", 1), ("net.4.weight", "net.4.bias", 1)]
CNN_CHAIN = [("features.0.weight", "features.0.bias", 1), ("features.3.weight", "features.3.bias", 1),
             ("head.1.weight", "head.1.bias", 16), ("head.3.weight", "head.3.bias", 1)]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _permuted(model: dict[str, torch.Tensor], chain, seed: int) -> dict[str, torch.Tensor]:
    """The same network with every hidden layer's units shuffled (inputs of the next layer too)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(model)
    prev = None
    for idx, (w, b, block) in enumerate(chain):
        weight = out[w]
        if prev is not None:
            shape = weight.shape
            x = weight.reshape(shape[0], -1, block, *shape[2:])[:, prev]
            weight = x.reshape(shape)
        if idx < len(chain) - 1:
            perm = torch.randperm(weight.shape[0], generator=g)
            weight = weight[perm]
            out[b] = out[b][perm]
            prev = perm
        out[w] = weight
    return out


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    den = sum(float(b[k].double().norm() ** 2) for k in b)
    return (num / den) ** 0.5


@pytest.mark.parametrize("transport", ["exact", "entropic"])
@pytest.mark.parametrize("net,chain", [(MLP, MLP_CHAIN), (CNN, CNN_CHAIN)])
def test_a_permuted_copy_fuses_back_to_the_model(net, chain, transport: str) -> None:
    torch.manual_seed(0)
    model = _state(net())
    twin = _permuted(model, chain, seed=1)
    x = torch.rand(4, 784)
    ref, other = net(), net()
    ref.load_state_dict(model)
    other.load_state_dict(twin)
    assert torch.allclose(ref(x), other(x), atol=1e-5)  # the shuffle keeps the function
    fused, rep = fuse_with_report([model, twin], [1, 1], "fedwb-neurons", chain=chain, transport=transport)
    tol = 1e-6 if transport == "exact" else 1e-2  # entropic plans are soft
    assert _rel(fused, model) <= tol, rep.as_dict()
    avg, _ = fuse_with_report([model, twin], [1, 1], "fedavg")
    assert _rel(avg, model) > 0.3  # FedAvg of the two mixes unrelated units


def test_identical_models_and_shared_init_reduce_to_fedavg() -> None:
    torch.manual_seed(0)
    model = _state(MLP())
    same, rep = fuse_with_report([model] * 3, [1, 2, 3], "fedwb-neurons", chain=MLP_CHAIN)
    assert _rel(same, model) <= 1e-12 and rep.model_level["identity_alignment"]
    g = torch.Generator().manual_seed(1)
    stepped = [{k: v + 1e-3 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in model.items()}
               for _ in range(4)]
    fused, rep = fuse_with_report(stepped, [1, 2, 3, 4], "fedwb-neurons", chain=MLP_CHAIN)
    avg, _ = fuse_with_report(stepped, [1, 2, 3, 4], "fedavg")
    assert _rel(fused, avg) <= 1e-3 and rep.model_level["identity_alignment"]


def test_no_chain_falls_back_to_fedavg_and_says_why() -> None:
    model = _state(MLP())
    fused, rep = fuse_with_report([model, model], [1, 1], "fedwb-neurons")
    assert rep.as_dict()["fedwb-neurons"]["reason"] == "the task declares no layer chain"
    assert rep.rules == {"fedavg": 6}
    extra = {**model, "bn.running_mean": torch.zeros(3)}
    _, rep = fuse_with_report([extra, extra], [1, 1], "fedwb-neurons", chain=MLP_CHAIN)
    assert "outside the declared chain" in rep.model_level["reason"]
    with pytest.raises(ValueError, match="unknown fusion option 'chian'"):
        fuse_with_report([model, model], [1, 1], "fedwb-neurons", chian=MLP_CHAIN)
    with pytest.raises(ValueError, match="unknown neuron transport 'greedy'"):
        fuse_with_report([model, model], [1, 1], "fedwb-neurons", chain=MLP_CHAIN, transport="greedy")


def test_three_models_from_their_own_inits_beat_fedavg_on_the_function() -> None:
    """K > 2: a permuted trio of one network is fused back; FedAvg of the trio is far."""
    torch.manual_seed(3)
    model = _state(MLP())
    trio = [model, _permuted(model, MLP_CHAIN, 5), _permuted(model, MLP_CHAIN, 6)]
    fused, rep = fuse_with_report(trio, [0.5, 0.3, 0.2], "fedwb-neurons", chain=MLP_CHAIN)
    assert _rel(fused, model) <= 1e-6 and rep.model_level["iterations"] <= 3


def test_the_tasks_declare_chains_that_cover_their_models() -> None:
    from aggregator.fusion.neurons import chain_from_spec, chain_problem
    from edge_agent.tasks import get_task

    for name, opts in [("cartpole", {}), ("cartpole", {"preset": "paper"}), ("mnist", {"model": "mlp"}),
                       ("mnist", {"model": "cnn"})]:
        task = get_task(name, seed=0, **opts)
        assert chain_problem(task.initial_weights(), chain_from_spec(task.layer_chain())) is None, (name, opts)


def test_agent_first_round_from_its_own_init_or_a_file(tmp_path) -> None:
    """--init own: the first round trains from the task's own init (this agent's seed), later ones from the global."""
    from safetensors.torch import save_file

    from edge_agent.agent import Agent, AgentSettings
    from schemas import GlobalModel

    glob = GlobalModel(job="j", version=0, policy="init", weights={"t0": torch.zeros(3, 3)})
    own = Agent(AgentSettings(task="noop", task_options={"shapes": "3x3"}, seed=7, init="own", pretrain=5))
    weights, budget = own._starting_point(glob)
    assert not torch.equal(weights["t0"], glob.weights["t0"]) and budget == 1 + 5
    assert torch.equal(weights["t0"], own.task.initial_weights()["t0"])
    own.rounds = 1
    assert own._starting_point(glob)[0]["t0"].abs().sum() == 0  # later rounds: the global model
    path = tmp_path / "mine.safetensors"
    save_file({"t0": torch.ones(3, 3)}, str(path))
    weights, _ = Agent(AgentSettings(task="noop", task_options={"shapes": "3x3"}, init=str(path)))._starting_point(glob)
    assert torch.equal(weights["t0"], torch.ones(3, 3))
    save_file({"t0": torch.ones(2, 2)}, str(path))  # wrong shape: said in the log, the global model is used
    weights, _ = Agent(AgentSettings(task="noop", task_options={"shapes": "3x3"}, init=str(path)))._starting_point(glob)
    assert torch.equal(weights["t0"], glob.weights["t0"])


@pytest.mark.parametrize("args,msg", [(["--init", "mine.pt"], "--init must be global, own or a .safetensors file"),
                                      (["--init", "missing.safetensors"], "does not exist"),
                                      (["--init", "own", "--pretrain", "-1"], "--pretrain must be >= 0")])
def test_agent_cli_rejects_bad_init_in_one_line(args: list[str], msg: str) -> None:
    import subprocess

    from fedwb import executable

    result = subprocess.run([executable(), "agent", "--task", "noop", *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and msg in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("transport", ["exact", "entropic"])
def test_the_fused_model_does_not_depend_on_arrival_order(transport: str) -> None:
    """Equal weights, models from different inits: the barycenter starts from the same model whatever order
    the updates arrived in, so runs with the same seed give the same global model."""
    models = []
    for seed in range(4):
        torch.manual_seed(seed)
        models.append(_state(MLP()))
    first, _ = fuse_with_report(models, [1.0] * 4, "fedwb-neurons", chain=MLP_CHAIN, transport=transport)
    for order in ([3, 1, 0, 2], [1, 2, 3, 0]):
        again, _ = fuse_with_report([models[i] for i in order], [1.0] * 4, "fedwb-neurons", chain=MLP_CHAIN,
                                    transport=transport)
        assert _rel(again, first) <= 1e-9, order
