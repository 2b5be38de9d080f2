"""``cartpole``: DQN on gymnasium's CartPole-v1 with this agent's own physics.

Read top to bottom, in the spirit of CleanRL's ``dqn.py``: an MLP Q-network, a replay
buffer, a target network, an epsilon schedule, the Huber loss and Adam. The replay
buffer, optimizer and step counter stay on the device across rounds; when a global
model arrives it replaces the online network *and* the target network (as the paper
does). ``budget`` is the number of environment steps per round.

Recipes (``preset``), chosen with the ablation in docs/results.md:

* ``stable`` (default): rl-baselines3-zoo's CartPole-v1 DQN (lr 2.3e-3, batch 64,
  buffer 100k, 1,000 steps before learning, 128 gradient steps every 256 environment
  steps, the target copied every 10 environment steps -- i.e. once per training phase --,
  epsilon 1 -> 0.04 over the first 16 % of ``total_steps``, 256x256 MLP, grad-norm clip 10)
  plus a learning rate that decays linearly to 0 at ``total_steps`` (without the decay
  the greedy policy keeps falling from 500 to ~100 and back) and 3-step TD targets
  (``n_step``: the end of an episode reaches the values of the states before it three
  times faster; with five heterogeneous agents it is what makes the global model hold
  500 on every pole length).
* ``paper``: the authors' protocol (arXiv 2506.15825, ``ch4/main.py``): 4-128-128-2
  without biases, Adam 1e-4, batch 256, buffer 10,000, one gradient step per environment
  step, epsilon = 0.05 + 0.85 exp(-t/1000), 1-step TD targets, no local target copies
  (the global model, every 100 steps, replaces the target).

Heterogeneity: each agent's environment is ``env`` (``length=0.5,masspole=0.1,
masscart=1.0,force_mag=10``; any subset), ``pole_length`` being the short form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from edge_agent.tasks.base import StateDict, Task, TrainResult

MAX_STEPS = 500  # CartPole-v1's cap; evaluation episodes stop there too
ENV_PARAMS = ("length", "masspole", "masscart", "force_mag")  # CartPoleEnv attributes an agent may change


@dataclass(frozen=True)
class DQNConfig:
    """DQN hyperparameters; the defaults are the ``stable`` preset."""

    learning_rate: float = 2.3e-3
    lr_end_fraction: float = 0.0  # lr decays linearly to this x learning_rate at total_steps (1: constant)
    total_steps: int = 60_000  # the run's length in environment steps, for the schedules
    buffer_size: int = 100_000
    gamma: float = 0.99
    target_network_frequency: int = 10  # env steps between target copies; 0: never (the global model replaces it)
    batch_size: int = 64
    start_e: float = 1.0
    end_e: float = 0.04
    epsilon_schedule: str = "linear"  # linear over exploration_fraction * total_steps | exp: decay time epsilon_decay
    exploration_fraction: float = 0.16
    epsilon_decay: float = 1000.0
    learning_starts: int = 1_000
    train_frequency: int = 256  # env steps between training phases
    gradient_steps: int = 128  # gradient steps per training phase
    hidden: int = 256
    bias: bool = True
    double_dqn: bool = False
    max_grad_norm: float = 10.0  # 0: no clipping
    reset_optimizer: bool = False  # clear Adam's moments when a global model arrives (they belong to the old one)
    prox_mu: float = 0.0  # FedProx (Li et al. 2020): + mu/2 ||w - w_global||^2 in the local loss; 0: off
    center_penalty: float = 0.0  # training reward 1 - c (x / 2.4)^2: a cost for drifting off centre; 0: off
    n_step: int = 3  # TD targets over n environment steps: sum_{i<n} gamma^i r_i + gamma^n max Q(s_n)
    obs_scale: bool = False  # divide observations by (2.4, 3, 0.21, 3.5), their typical ranges, in the network


PRESETS: dict[str, dict[str, Any]] = {
    "stable": {},
    "paper": {"learning_rate": 1e-4, "lr_end_fraction": 1.0, "buffer_size": 10_000, "batch_size": 256,
              "hidden": 128, "bias": False, "start_e": 0.9, "end_e": 0.05, "epsilon_schedule": "exp",
              "epsilon_decay": 1000.0, "learning_starts": 256, "train_frequency": 1, "gradient_steps": 1,
              "target_network_frequency": 0, "max_grad_norm": 0.0, "n_step": 1},
}


def dqn_config(preset: str = "stable", **overrides: Any) -> DQNConfig:
    """The preset's config with ``overrides`` (values from the CLI arrive as strings)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown cartpole preset {preset!r}: use one of {', '.join(PRESETS)}")
    cfg = replace(DQNConfig(), **PRESETS[preset])
    types = {f.name: type(getattr(cfg, f.name)) for f in fields(DQNConfig)}
    clean: dict[str, Any] = {}
    for key, value in overrides.items():
        kind = types[key]
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                clean[key] = value.lower() in ("true", "1")
            else:
                clean[key] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"cartpole option {key}={value!r} is not a {kind.__name__}") from None
    cfg = replace(cfg, **clean)
    if cfg.epsilon_schedule not in ("linear", "exp"):
        raise ValueError(f"epsilon_schedule must be linear or exp, got {cfg.epsilon_schedule!r}")
    if cfg.total_steps < 1 or cfg.batch_size < 1 or cfg.buffer_size < cfg.batch_size:
        raise ValueError("total_steps and batch_size must be >= 1 and buffer_size >= batch_size")
    return cfg


def parse_env(spec: str | dict[str, float] | None, pole_length: float | None = None) -> dict[str, float]:
    """``length=0.5,masspole=0.1`` -> ``{"length": 0.5, "masspole": 0.1}``; ``pole_length`` sets length."""
    if isinstance(spec, dict):
        out = {k: float(v) for k, v in spec.items()}
    else:
        out = {}
        for part in (spec or "").replace(";", ",").split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in ENV_PARAMS:
                raise ValueError(f"bad cartpole env parameter {part.strip()!r}: "
                                 f"use {', '.join(ENV_PARAMS)} as KEY=VALUE")
            try:
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"cartpole env parameter {key} needs a number, got {value!r}") from None
    if pole_length is not None:
        out["length"] = float(pole_length)
    bad = {k: v for k, v in out.items() if not (math.isfinite(v) and v > 0) or k not in ENV_PARAMS}
    if bad:
        raise ValueError(f"cartpole env parameters must be known and positive, got {bad}")
    return out


def env_spec(params: dict[str, float]) -> str:
    """``length=0.5,masspole=0.2``: what ``parse_env`` reads back, keys in ``ENV_PARAMS`` order."""
    return ",".join(f"{k}={params[k]:g}" for k in ENV_PARAMS if k in params)


def env_label(params: dict[str, float]) -> str:
    """``0.5`` for a pole length alone, else ``env_spec``: the key of its evaluation."""
    if set(params) <= {"length"}:
        return f"{params.get('length', 0.5):g}"
    return env_spec(params)


def make_env(pole_length: float = 0.5, seed: int | None = None, **params: float) -> gym.Env:
    """CartPole-v1 with pole half-length ``pole_length`` and other ``ENV_PARAMS`` changed.

    The derived quantities the dynamics use are updated too: ``polemass_length =
    masspole * length`` and ``total_mass = masspole + masscart``.
    """
    env = gym.make("CartPole-v1")
    cp = env.unwrapped
    cp.length = float(params.pop("length", pole_length))
    for key, value in params.items():
        setattr(cp, key, float(value))
    cp.polemass_length = cp.masspole * cp.length  # easy to miss: the dynamics use this product
    cp.total_mass = cp.masspole + cp.masscart  # and this sum
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


OBS_RANGE = (2.4, 3.0, 0.21, 3.5)  # cart position, velocity, pole angle, angular velocity: typical magnitudes


class QNetwork(nn.Module):
    """obs -> Q(obs, .): two hidden ReLU layers; ``obs_scale`` divides inputs by ``OBS_RANGE`` first
    (a constant, not a parameter: the state dict, and so what is federated, is the same)."""

    def __init__(self, obs_dim: int = 4, n_actions: int = 2, hidden: int = 256, bias: bool = True,
                 obs_scale: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden, bias=bias), nn.ReLU(),
                                 nn.Linear(hidden, hidden, bias=bias), nn.ReLU(),
                                 nn.Linear(hidden, n_actions, bias=bias))
        # a non-persistent buffer: it follows the module to its device and stays out of the state dict
        scale = torch.tensor(OBS_RANGE, dtype=torch.float32) if obs_scale else None
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x / self.scale
        return self.net(x)


class ReplayBuffer:
    """A fixed-size ring buffer of transitions (bounded memory)."""

    def __init__(self, size: int, obs_dim: int, rng: np.random.Generator) -> None:
        self.obs = np.zeros((size, obs_dim), np.float32)
        self.next_obs = np.zeros((size, obs_dim), np.float32)
        self.actions = np.zeros(size, np.int64)
        self.rewards = np.zeros(size, np.float32)
        self.dones = np.zeros(size, np.float32)
        self.discounts = np.zeros(size, np.float32)  # gamma^n of an n-step transition
        self.size, self.pos, self.full, self.rng = size, 0, False, rng

    def add(self, obs, next_obs, action: int, reward: float, done: bool, discount: float = 1.0) -> None:
        i = self.pos
        self.obs[i], self.next_obs[i], self.actions[i] = obs, next_obs, action
        self.rewards[i], self.dones[i], self.discounts[i] = reward, float(done), discount
        self.pos = (i + 1) % self.size
        self.full = self.full or self.pos == 0

    def __len__(self) -> int:
        return self.size if self.full else self.pos

    def sample(self, n: int) -> tuple[torch.Tensor, ...]:
        idx = self.rng.integers(0, len(self), n)
        return (torch.from_numpy(self.obs[idx]), torch.from_numpy(self.actions[idx]),
                torch.from_numpy(self.rewards[idx]), torch.from_numpy(self.next_obs[idx]),
                torch.from_numpy(self.dones[idx]), torch.from_numpy(self.discounts[idx]))


class NStep:
    """Turns 1-step transitions into n-step ones: (s_0, a_0, sum_{i<m} gamma^i r_i, s_m, done, gamma^m),
    m = n, or fewer where the episode ended (terminated: done; truncated: bootstrap from s_m)."""

    def __init__(self, n: int, gamma: float) -> None:
        self.n, self.gamma, self.pending = n, gamma, []

    def push(self, obs, action: int, reward: float, next_obs, terminated: bool, truncated: bool) -> list[tuple]:
        self.pending.append((obs, action, reward))
        out = []
        if len(self.pending) == self.n:
            out.append(self._emit(next_obs, terminated))
            self.pending.pop(0)
        if terminated or truncated:
            while self.pending:
                out.append(self._emit(next_obs, terminated))
                self.pending.pop(0)
        return out

    def _emit(self, next_obs, terminated: bool) -> tuple:
        ret = sum(self.gamma ** i * r for i, (_, _, r) in enumerate(self.pending))
        obs, action, _ = self.pending[0]
        return obs, next_obs, action, ret, terminated, self.gamma ** len(self.pending)


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    return max(end_e, start_e + (end_e - start_e) * t / max(1, duration))


def epsilon_at(cfg: DQNConfig, t: int) -> float:
    """Exploration rate after ``t`` environment steps."""
    if cfg.epsilon_schedule == "exp":  # the paper's: end + (start - end) exp(-t / decay)
        return cfg.end_e + (cfg.start_e - cfg.end_e) * math.exp(-t / cfg.epsilon_decay)
    return linear_schedule(cfg.start_e, cfg.end_e, int(cfg.exploration_fraction * cfg.total_steps), t)


def learning_rate_at(cfg: DQNConfig, t: int) -> float:
    """Linear decay from ``learning_rate`` to ``lr_end_fraction * learning_rate`` at ``total_steps``."""
    frac = min(1.0, t / cfg.total_steps)
    return cfg.learning_rate * (1.0 - frac * (1.0 - cfg.lr_end_fraction))


def greedy_episodes(q: nn.Module, pole_length: float, episodes: int, seed: int,
                    **params: float) -> list[tuple[int, str]]:
    """Each greedy episode's length and how it ended: ``cap`` (500 steps), ``angle`` (the pole
    passed 12 degrees) or ``cart`` (|x| passed 2.4, the pole still up)."""
    env = make_env(pole_length, **params)
    cp, out = env.unwrapped, []
    with torch.no_grad():
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            steps, terminated = 0, False
            while steps < MAX_STEPS and not terminated:
                action = int(q(torch.as_tensor(obs, dtype=torch.float32)).argmax())
                obs, _, terminated, truncated, _ = env.step(action)
                steps += 1
                if truncated:
                    break
            end = "cap" if not terminated else ("angle" if abs(obs[2]) > cp.theta_threshold_radians else "cart")
            out.append((steps, end))
    env.close()
    return out


def greedy_return(q: nn.Module, pole_length: float, episodes: int, seed: int, **params: float) -> float:
    """Mean undiscounted return of the greedy policy (one per step), episodes capped at 500 steps."""
    return float(np.mean([n for n, _ in greedy_episodes(q, pole_length, episodes, seed, **params)]))


def _eval_envs(eval_envs: Any, eval_lengths: Any, own: dict[str, float]) -> list[dict[str, float]]:
    """Environments to evaluate on: ``eval_envs`` (``;``-separated specs) and ``eval_lengths``, or our own."""
    out: list[dict[str, float]] = []
    if isinstance(eval_lengths, str):
        eval_lengths = [float(x) for x in eval_lengths.split(",") if x]
    out += [{"length": float(x)} for x in (eval_lengths or [])]
    if isinstance(eval_envs, str):
        eval_envs = [e for e in eval_envs.split(";") if e.strip()]
    out += [parse_env(e) for e in (eval_envs or [])]
    return out or [own]


class CartPoleTask(Task):
    name = "cartpole"

    def __init__(self, seed: int = 0, device: str = "cpu", pole_length: float | None = None, env: Any = None,
                 eval_lengths: Any = None, eval_envs: Any = None, eval_episodes: int = 5,
                 preset: str = "stable", **options: Any) -> None:
        cfg_fields = {k: options.pop(k) for k in list(options) if k in DQNConfig.__dataclass_fields__}
        super().__init__(seed, device, **options)
        self.cfg = dqn_config(preset, **cfg_fields)
        self.preset = preset
        self.env_params = {"length": 0.5, **parse_env(env, pole_length)}
        self.pole_length = self.env_params["length"]
        self.eval_envs = _eval_envs(eval_envs, eval_lengths, self.env_params)
        self.eval_lengths = [e.get("length", 0.5) for e in self.eval_envs]
        self.eval_episodes = int(eval_episodes)
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        params = dict(self.env_params)
        self.env = make_env(params.pop("length"), seed, **params)
        self.obs, _ = self.env.reset(seed=seed)
        self.q = self.build_model().to(self.device)
        self.target = self.build_model().to(self.device)
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=self.cfg.learning_rate)
        self.rb = ReplayBuffer(self.cfg.buffer_size, 4, self.rng)
        self.nstep = NStep(max(1, self.cfg.n_step), self.cfg.gamma)
        self.global_step = 0
        self.episode_return = 0.0
        self.anchor: list[torch.Tensor] = []  # the last global model's parameters (FedProx)
        self.recent_returns: list[float] = []  # the paper's metric: training episodes, moving average of 50

    def build_model(self) -> nn.Module:
        return QNetwork(hidden=self.cfg.hidden, bias=self.cfg.bias, obs_scale=self.cfg.obs_scale)

    def layer_chain(self) -> list[tuple[str, str | None, int]]:
        bias = self.cfg.bias
        return [(f"net.{i}.weight", f"net.{i}.bias" if bias else None, 1) for i in (0, 2, 4)]

    def load_global(self, weights: StateDict) -> None:
        """A global model replaces the online and the target network; the buffer stays."""
        self.q.load_state_dict(weights)
        self.target.load_state_dict(weights)
        if self.cfg.prox_mu > 0:  # the round's anchor: local steps are pulled back towards it
            self.anchor = [p.detach().clone() for p in self.q.parameters()]
        if self.cfg.reset_optimizer:
            self.optimizer.state.clear()

    def _act(self, epsilon: float) -> int:
        if self.rng.random() < epsilon:
            return int(self.rng.integers(2))
        with torch.no_grad():
            return int(self.q(torch.as_tensor(self.obs, device=self.device)).argmax())

    def _training_reward(self, reward: float, next_obs: np.ndarray) -> float:
        """What the TD target learns from: the environment's reward minus ``c (x / x_max)^2``.

        Episode returns (the metrics and every evaluation) stay the environment's own.
        """
        if self.cfg.center_penalty <= 0:
            return reward
        return reward - self.cfg.center_penalty * (float(next_obs[0]) / self.env.unwrapped.x_threshold) ** 2

    def _gradient_step(self) -> float:
        cfg = self.cfg
        obs, actions, rewards, nxt, dones, discounts = (t.to(self.device) for t in self.rb.sample(cfg.batch_size))
        with torch.no_grad():
            if cfg.double_dqn:  # the online net picks the action, the target net values it
                next_q = self.target(nxt).gather(1, self.q(nxt).argmax(dim=1, keepdim=True)).squeeze(1)
            else:
                next_q = self.target(nxt).max(dim=1).values
            td_target = rewards + discounts * next_q * (1 - dones)
        q_value = self.q(obs).gather(1, actions[:, None]).squeeze(1)
        loss = nn.functional.smooth_l1_loss(q_value, td_target)  # Huber
        if cfg.prox_mu > 0 and self.anchor:
            loss = loss + 0.5 * cfg.prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(self.q.parameters(),
                                                                                   self.anchor, strict=True))
        self.optimizer.zero_grad()
        loss.backward()
        if cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.q.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())

    def train(self, weights: StateDict, budget: int) -> TrainResult:
        """``budget`` environment steps of DQN from ``weights``."""
        self.load_global(weights)
        cfg, returns, losses = self.cfg, [], []
        for _ in range(max(1, budget)):
            action = self._act(epsilon_at(cfg, self.global_step))
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            self.episode_return += float(reward)
            # easy to miss: a truncated episode is not a terminal state for the TD target
            for transition in self.nstep.push(self.obs, action, self._training_reward(float(reward), next_obs),
                                              next_obs, terminated, truncated):
                self.rb.add(*transition)
            self.obs = next_obs
            if terminated or truncated:
                returns.append(self.episode_return)
                self.recent_returns = (self.recent_returns + [self.episode_return])[-50:]
                self.episode_return = 0.0
                self.obs, _ = self.env.reset()
            self.global_step += 1
            if self.global_step > cfg.learning_starts and self.global_step % cfg.train_frequency == 0:
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate_at(cfg, self.global_step)
                losses += [self._gradient_step() for _ in range(cfg.gradient_steps)]
            if cfg.target_network_frequency and self.global_step % cfg.target_network_frequency == 0:
                self.target.load_state_dict(self.q.state_dict())
        out = {k: v.detach().cpu().clone() for k, v in self.q.state_dict().items()}
        metrics = {"epsilon": epsilon_at(cfg, self.global_step), "episodes": float(len(returns)),
                   "global_step": float(self.global_step),
                   "learning_rate": learning_rate_at(cfg, self.global_step)}
        if returns:
            metrics["episode_return"] = float(np.mean(returns))
            metrics["last_episode_return"] = returns[-1]
        if self.recent_returns:
            metrics["episode_return_ma50"] = float(np.mean(self.recent_returns))
        if losses:
            metrics["td_loss"] = float(np.mean(losses))
        return TrainResult(out, num_samples=max(1, budget), metrics=metrics)

    def episodes(self, weights: StateDict) -> dict[str, list[tuple[int, str]]]:
        """Greedy episodes of ``weights`` on every evaluation environment: (length, how it ended)."""
        q = self.build_model()
        q.load_state_dict(weights)
        q.eval()
        out = {}
        for params in self.eval_envs:
            p = dict(params)
            out[env_label(params)] = greedy_episodes(q, p.pop("length", 0.5), self.eval_episodes,
                                                     self.seed + 10_000, **p)
        return out

    def evaluate(self, weights: StateDict) -> dict[str, float]:
        """Greedy mean return on every evaluation environment, and their mean."""
        out = {f"return@{label}": float(np.mean([n for n, _ in eps])) for label, eps in self.episodes(weights).items()}
        out["mean_return"] = float(np.mean(list(out.values())))
        return out
