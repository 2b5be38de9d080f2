"""``cartpole``: DQN on gymnasium's CartPole-v1 with this agent's own pole half-length.

Read top to bottom, in the spirit of CleanRL's ``dqn.py``: an MLP Q-network, a replay
buffer, a target network, a linear epsilon schedule, the Huber loss and Adam. The
replay buffer, optimizer and step counter stay on the device across rounds; when a
global model arrives it replaces the online network *and* the target network (as the
paper does). ``budget`` is the number of environment steps per round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from edge_agent.tasks.base import StateDict, Task, TrainResult

MAX_STEPS = 500  # CartPole-v1's cap; evaluation episodes stop there too


@dataclass
class DQNConfig:
    """DQN hyperparameters (tuned to solve CartPole within a few minutes on 2 cores)."""

    learning_rate: float = 5e-4
    buffer_size: int = 50_000
    gamma: float = 0.99
    target_network_frequency: int = 500  # steps between target-network copies
    batch_size: int = 64
    start_e: float = 1.0
    end_e: float = 0.05
    exploration_steps: int = 10_000  # steps over which epsilon decays linearly
    learning_starts: int = 1_000
    train_frequency: int = 1
    hidden: int = 128


def make_env(pole_length: float = 0.5, seed: int | None = None) -> gym.Env:
    """CartPole-v1 with pole half-length ``pole_length`` (``polemass_length`` updated too)."""
    env = gym.make("CartPole-v1")
    cp = env.unwrapped
    cp.length = float(pole_length)
    cp.polemass_length = cp.masspole * cp.length  # easy to miss: the dynamics use this product
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int = 4, n_actions: int = 2, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ReplayBuffer:
    """A fixed-size ring buffer of transitions (bounded memory)."""

    def __init__(self, size: int, obs_dim: int, rng: np.random.Generator) -> None:
        self.obs = np.zeros((size, obs_dim), np.float32)
        self.next_obs = np.zeros((size, obs_dim), np.float32)
        self.actions = np.zeros(size, np.int64)
        self.rewards = np.zeros(size, np.float32)
        self.dones = np.zeros(size, np.float32)
        self.size, self.pos, self.full, self.rng = size, 0, False, rng

    def add(self, obs, next_obs, action: int, reward: float, done: bool) -> None:
        i = self.pos
        self.obs[i], self.next_obs[i], self.actions[i] = obs, next_obs, action
        self.rewards[i], self.dones[i] = reward, float(done)
        self.pos = (i + 1) % self.size
        self.full = self.full or self.pos == 0

    def __len__(self) -> int:
        return self.size if self.full else self.pos

    def sample(self, n: int) -> tuple[torch.Tensor, ...]:
        idx = self.rng.integers(0, len(self), n)
        return (torch.from_numpy(self.obs[idx]), torch.from_numpy(self.actions[idx]),
                torch.from_numpy(self.rewards[idx]), torch.from_numpy(self.next_obs[idx]),
                torch.from_numpy(self.dones[idx]))


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    return max(end_e, start_e + (end_e - start_e) * t / max(1, duration))


def greedy_return(q: nn.Module, pole_length: float, episodes: int, seed: int) -> float:
    """Mean undiscounted return of the greedy policy, episodes capped at 500 steps."""
    env = make_env(pole_length)
    total = 0.0
    with torch.no_grad():
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            for _ in range(MAX_STEPS):
                action = int(q(torch.as_tensor(obs, dtype=torch.float32)).argmax())
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                if terminated or truncated:
                    break
    env.close()
    return total / episodes


class CartPoleTask(Task):
    name = "cartpole"

    def __init__(self, seed: int = 0, device: str = "cpu", pole_length: float = 0.5,
                 eval_lengths: Any = None, eval_episodes: int = 5, **options: Any) -> None:
        cfg_fields = {k: options.pop(k) for k in list(options) if k in DQNConfig.__dataclass_fields__}
        super().__init__(seed, device, **options)
        self.cfg = DQNConfig(**cfg_fields)
        self.pole_length = float(pole_length)
        if isinstance(eval_lengths, str):
            eval_lengths = [float(x) for x in eval_lengths.split(",") if x]
        self.eval_lengths = [float(x) for x in (eval_lengths or [self.pole_length])]
        self.eval_episodes = eval_episodes
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.env = make_env(self.pole_length, seed)
        self.obs, _ = self.env.reset(seed=seed)
        self.q = QNetwork(hidden=self.cfg.hidden).to(self.device)
        self.target = QNetwork(hidden=self.cfg.hidden).to(self.device)
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=self.cfg.learning_rate)
        self.rb = ReplayBuffer(self.cfg.buffer_size, 4, self.rng)
        self.global_step = 0
        self.episode_return = 0.0

    def build_model(self) -> nn.Module:
        return QNetwork(hidden=self.cfg.hidden)

    def load_global(self, weights: StateDict) -> None:
        """A global model replaces the online and the target network; the buffer stays."""
        self.q.load_state_dict(weights)
        self.target.load_state_dict(weights)

    def train(self, weights: StateDict, budget: int) -> TrainResult:
        """``budget`` environment steps of DQN from ``weights``."""
        self.load_global(weights)
        cfg, returns, losses = self.cfg, [], []
        for _ in range(max(1, budget)):
            epsilon = linear_schedule(cfg.start_e, cfg.end_e, cfg.exploration_steps, self.global_step)
            if self.rng.random() < epsilon:
                action = int(self.rng.integers(2))
            else:
                with torch.no_grad():
                    action = int(self.q(torch.as_tensor(self.obs, device=self.device)).argmax())
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            self.episode_return += float(reward)
            # easy to miss: a truncated episode is not a terminal state for the TD target
            self.rb.add(self.obs, next_obs, action, float(reward), terminated)
            self.obs = next_obs
            if terminated or truncated:
                returns.append(self.episode_return)
                self.episode_return = 0.0
                self.obs, _ = self.env.reset()
            self.global_step += 1
            if self.global_step > cfg.learning_starts and self.global_step % cfg.train_frequency == 0:
                obs, actions, rewards, nxt, dones = (t.to(self.device) for t in self.rb.sample(cfg.batch_size))
                with torch.no_grad():
                    td_target = rewards + cfg.gamma * self.target(nxt).max(dim=1).values * (1 - dones)
                q_value = self.q(obs).gather(1, actions[:, None]).squeeze(1)
                loss = nn.functional.smooth_l1_loss(q_value, td_target)  # Huber
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                losses.append(float(loss.detach()))
            if self.global_step % cfg.target_network_frequency == 0:
                self.target.load_state_dict(self.q.state_dict())
        out = {k: v.detach().cpu().clone() for k, v in self.q.state_dict().items()}
        metrics = {"epsilon": linear_schedule(cfg.start_e, cfg.end_e, cfg.exploration_steps, self.global_step),
                   "episodes": float(len(returns)), "global_step": float(self.global_step)}
        if returns:
            metrics["episode_return"] = float(np.mean(returns))
        if losses:
            metrics["td_loss"] = float(np.mean(losses))
        return TrainResult(out, num_samples=max(1, budget), metrics=metrics)

    def evaluate(self, weights: StateDict) -> dict[str, float]:
        """Greedy mean return for every pole length in ``eval_lengths``."""
        q = self.build_model()
        q.load_state_dict(weights)
        q.eval()
        out = {f"return@{length:g}": greedy_return(q, length, self.eval_episodes, self.seed + 10_000)
               for length in self.eval_lengths}
        out["mean_return"] = float(np.mean(list(out.values())))
        return out
