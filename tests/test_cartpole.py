"""The cartpole task: presets, heterogeneous physics, evaluation on held-out environments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_agent.tasks import get_task
from edge_agent.tasks.cartpole import (
    DQNConfig,
    NStep,
    dqn_config,
    epsilon_at,
    greedy_episodes,
    greedy_return,
    learning_rate_at,
    make_env,
    parse_env,
)


def test_paper_preset_is_the_authors_protocol() -> None:
    cfg = dqn_config("paper")
    assert (cfg.hidden, cfg.bias, cfg.learning_rate, cfg.lr_end_fraction) == (128, False, 1e-4, 1.0)
    assert (cfg.batch_size, cfg.buffer_size, cfg.gamma) == (256, 10_000, 0.99)
    assert (cfg.train_frequency, cfg.gradient_steps, cfg.target_network_frequency, cfg.n_step) == (1, 1, 0, 1)
    for t in (0, 500, 1000, 5000):  # epsilon = 0.05 + 0.85 exp(-t / 1000)
        assert epsilon_at(cfg, t) == pytest.approx(0.05 + 0.85 * np.exp(-t / 1000))
    task = get_task("cartpole", preset="paper", seed=0)
    names = list(task.initial_weights())
    assert names == ["net.0.weight", "net.2.weight", "net.4.weight"]  # 4-128-128-2, no biases
    assert task.initial_weights()["net.0.weight"].shape == (128, 4)


def test_stable_preset_schedules() -> None:
    cfg = DQNConfig()
    assert (cfg.n_step, cfg.reset_optimizer, cfg.obs_scale, cfg.center_penalty) == (3, False, False, 0.0)
    assert epsilon_at(cfg, 0) == 1.0 and epsilon_at(cfg, int(0.16 * cfg.total_steps)) == pytest.approx(0.04)
    assert learning_rate_at(cfg, 0) == cfg.learning_rate and learning_rate_at(cfg, cfg.total_steps) == 0.0
    assert learning_rate_at(dqn_config(total_steps="1000"), 500) == pytest.approx(cfg.learning_rate / 2)


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="unknown cartpole preset 'zoo'"):
        dqn_config("zoo")
    with pytest.raises(ValueError, match="batch_size='many' is not a int"):
        dqn_config(batch_size="many")
    with pytest.raises(ValueError, match="bad cartpole env parameter 'gravity=3'"):
        parse_env("gravity=3")
    with pytest.raises(ValueError, match="positive"):
        parse_env("length=-1")


@pytest.mark.parametrize("param", ["length", "masspole", "masscart", "force_mag"])
def test_env_parameters_change_the_dynamics(param: str) -> None:
    paths = []
    for scale in (1.0, 3.0):
        base = {"length": 0.5, "masspole": 0.1, "masscart": 1.0, "force_mag": 10.0}
        base[param] *= scale
        env = make_env(**base)
        cp = env.unwrapped
        assert cp.polemass_length == pytest.approx(cp.masspole * cp.length)
        assert cp.total_mass == pytest.approx(cp.masspole + cp.masscart)
        obs, _ = env.reset(seed=0)
        path = [obs]
        for _ in range(6):
            obs, *_ = env.step(1)
            path.append(obs)
        paths.append(np.array(path))
    assert np.allclose(paths[0][0], paths[1][0]) and not np.allclose(paths[0][-1], paths[1][-1])


def test_evaluation_covers_trained_and_held_out_settings() -> None:
    task = get_task("cartpole", seed=0, env="length=0.3,masspole=0.2", eval_lengths="0.3,1.25",
                    eval_envs="length=0.4,masscart=2;force_mag=5", eval_episodes=1)
    assert task.env_params == {"length": 0.3, "masspole": 0.2}
    out = task.evaluate(task.initial_weights())
    assert set(out) == {"return@0.3", "return@1.25", "return@length=0.4,masscart=2", "return@force_mag=5",
                        "mean_return"}
    assert all(1 <= v <= 500 for v in out.values())


def test_the_papers_metric_is_recorded_from_the_agents_training() -> None:
    from sim.evaluator import training_metrics

    task = get_task("cartpole", seed=0, learning_starts=10_000)  # no learning: episodes end fast
    res = task.train(task.initial_weights(), 300)
    assert res.metrics["last_episode_return"] >= 1 and res.metrics["episode_return_ma50"] >= 1
    got = training_metrics({"a": {"episode_return_ma50": 20.0, "last_episode_return": 10.0},
                            "b": {"episode_return_ma50": 40.0, "last_episode_return": 30.0}, "c": {}})
    assert got == {"episode_return_ma50": 30.0, "last_episode_return": 20.0}


class _Push(torch.nn.Module):
    """A constant policy: always action ``a`` (the pole falls, or the cart runs off)."""

    def __init__(self, a: int) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0 - self.a, float(self.a)])


def test_greedy_episodes_say_how_each_episode_ends() -> None:
    ends = greedy_episodes(_Push(1), 0.5, 3, seed=0)
    assert len(ends) == 3 and all(n < 100 and end == "angle" for n, end in ends)
    # a very long, heavy pole falls slowly: pushing one way runs the cart off the track first
    ends = greedy_episodes(_Push(0), 0.5, 2, seed=0, length=50.0, masspole=50.0)
    assert [end for _, end in ends] == ["cart", "cart"]
    assert greedy_return(_Push(1), 0.5, 3, seed=0) == np.mean([n for n, _ in greedy_episodes(_Push(1), 0.5, 3, 0)])


def test_in_process_federation_bench_reports_every_length_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import fedrl

    fedrl.main(["--json", "--rounds", "2", "--local-steps", "60", "--pole-lengths", "0.3,0.9", "--held-out", "0.6",
                "--episodes", "2", "--option", "learning_starts=20", "--option", "train_frequency=20",
                "--option", "gradient_steps=2", "--why"])
    out = json.loads(capsys.readouterr().out)
    assert [c["version"] for c in out["curve"]] == [1, 2]
    assert set(out["curve"][-1]) == {"version", "return@0.3", "return@0.6", "return@0.9", "mean_return"}
    assert {k: sum(v.values()) for k, v in out["episode_ends"].items()} == {"0.3": 2, "0.6": 2, "0.9": 2}
    assert set(out["local_models"]) == {"0.3", "0.9"}  # each agent's own last model, evaluated like the global
    with pytest.raises(SystemExit, match="cartpole option gradient_steps='many' is not a int"):
        fedrl.main(["--rounds", "1", "--option", "gradient_steps=many"])


def test_n_step_transitions_sum_discounted_rewards_and_stop_at_episode_ends() -> None:
    g = 0.5
    ns = NStep(3, g)
    assert ns.push("s0", 0, 1.0, "s1", False, False) == []
    assert ns.push("s1", 1, 2.0, "s2", False, False) == []
    (t,) = ns.push("s2", 0, 4.0, "s3", False, False)  # (s0, a0, 1 + 0.5*2 + 0.25*4, s3, not done, 0.5^3)
    assert t == ("s0", "s3", 0, 3.0, False, g ** 3)
    # termination: every pending step gets a shorter return and no bootstrap
    out = ns.push("s3", 1, 8.0, "end", True, False)
    assert [(o[0], o[3], o[4], o[5]) for o in out] == [("s1", 2 + 2 + 2.0, True, g ** 3), ("s2", 4 + 4.0, True, g ** 2),
                                                       ("s3", 8.0, True, g)]
    # truncation: the pending steps bootstrap from the last observation (not a terminal state)
    ns.push("a", 0, 1.0, "b", False, False)
    out = ns.push("b", 0, 1.0, "c", False, True)
    assert [(o[0], o[1], o[3], o[4], o[5]) for o in out] == [("a", "c", 1.5, False, g ** 2), ("b", "c", 1.0, False, g)]
    assert NStep(1, 0.9).push("x", 1, 1.0, "y", False, False) == [("x", "y", 1, 1.0, False, 0.9)]  # plain DQN


def test_input_scaling_and_centre_penalty_keep_the_federated_weights_and_the_measured_return() -> None:
    plain = get_task("cartpole", seed=0)
    scaled = get_task("cartpole", seed=0, obs_scale="true", center_penalty="2", n_step="3", learning_starts="50",
                      train_frequency="50", gradient_steps="2")
    assert {k: v.shape for k, v in plain.initial_weights().items()} == \
        {k: v.shape for k, v in scaled.initial_weights().items()}  # the scale is a constant, not a parameter
    w = scaled.initial_weights()
    x = torch.tensor([[2.4, 3.0, 0.21, 3.5]])
    plain.q.load_state_dict(w)
    scaled.q.load_state_dict(w)
    assert torch.allclose(scaled.q(x), plain.q(torch.ones(1, 4)))
    assert scaled._training_reward(1.0, np.array([1.2, 0, 0, 0])) == pytest.approx(1.0 - 2 * 0.25)
    result = scaled.train(w, 120)  # episode returns stay the environment's (whole steps), not the shaped reward
    assert result.metrics["episodes"] >= 2 and all(r == int(r) for r in scaled.recent_returns)
    assert float(scaled.rb.rewards[: len(scaled.rb)].min()) < 1.0  # ... while what is learnt from is shaped
    discounts = {round(float(d), 6) for d in scaled.rb.discounts[: len(scaled.rb)]}
    assert 0.970299 in discounts and discounts <= {0.99, 0.9801, 0.970299}
