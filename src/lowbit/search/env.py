"""ReLeQ's environment (seed 001; the authors' he-actlab/releq): one step per quantized layer.

Observation at layer ``l`` (8 numbers, the authors' state)::

    [l / L, b_l / b_max, sum(b) / (b_max·L), acc / acc_fp, n_l, c_l, k_l, std(w_l)]

``b_l`` is layer ``l``'s bits before the action (``start_bits``, the largest allowed by default,
since every episode starts from the same assignment: the authors' code did not reset it, a bug
METHODS.md says not to copy), ``sum(b)`` runs over the current assignment (chosen layers and the
not-yet-visited ones at ``start_bits``), ``acc`` is the validation accuracy of the current
assignment, and ``n, c, k`` (out channels, in channels, kernel size; 0 for a linear layer) are
min-max normalised over the searched layers; ``std(w_l)`` is the weight's standard deviation.

Action: an index into the allowed bit widths (default {2, 3, 4, 5, 8}); it sets layer ``l``'s bits.
Reward (the authors' ``calculate_reward_shaping``, METHODS.md)::

    x = sum(b) / (b_max·L) - b_min / b_max        (the offset: 2/8 for the default set)
    y = acc / acc_fp
    R = 2·((1 - x^0.8)·y^(1/y) - 0.5),   R = -1 if y < 0.1

With ``reward="step"`` (the authors') every step evaluates the current assignment and pays R;
with ``reward="final"`` only the last step does (the others pay 0 and keep the last accuracy).
A budget wall (:func:`lowbit.search.bitcost.budget_wall`) is applied to the assignment after the
last layer's action, as HAQ does; ``info["bits"]`` is the assignment that was evaluated.
"""

from __future__ import annotations

from typing import Callable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ..errors import ConfigError

DEFAULT_BITS = (2, 3, 4, 5, 8)
OBS_NAMES = ("layer", "bits", "avg_bits", "acc_ratio", "n", "c", "k", "std")


def releq_reward(acc: float, acc_fp: float, bits: Sequence[int], choices: Sequence[int] = DEFAULT_BITS) -> float:
    """ReLeQ's reward of an assignment (module docstring); x uses the offset b_min/b_max."""
    if acc_fp <= 0:
        raise ConfigError(f"acc_fp must be > 0, got {acc_fp}")
    b_max, b_min = max(choices), min(choices)
    y = acc / acc_fp
    if y < 0.1:
        return -1.0
    x = max(sum(bits) / (b_max * len(bits)) - b_min / b_max, 0.0)
    return float(2.0 * ((1.0 - x ** 0.8) * y ** (1.0 / y) - 0.5))


def layer_features(model, layers: Sequence[str]) -> np.ndarray:
    """(L, 4): n, c, k min-max normalised over the layers, and std of the (latent) weight."""
    from torch import nn
    from torch.nn.utils import parametrize

    mods = dict(model.named_modules())
    rows = []
    for name in layers:
        m = mods[name]
        w = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
        if isinstance(m, nn.Linear):
            n, c, k = m.out_features, m.in_features, 0
        else:
            n, c, k = m.out_channels, m.in_channels, int(np.prod(m.kernel_size)) ** 0.5
        rows.append([n, c, k, float(w.detach().float().std())])
    f = np.asarray(rows, dtype=np.float64)
    for j in range(3):
        lo, hi = f[:, j].min(), f[:, j].max()
        f[:, j] = (f[:, j] - lo) / (hi - lo) if hi > lo else 0.0
    return f


class ReleqEnv(gym.Env):
    """One episode = one pass over the searched layers (module docstring).

    ``acc_fn(bits) -> accuracy`` (a :class:`~lowbit.search.evaluator.BitEvaluator`'s ``accuracy``),
    ``acc_fp`` the full-precision accuracy, ``features`` the (L, 4) array of :func:`layer_features`,
    ``wall(bits) -> bits`` an optional budget wall applied after the last layer.
    """

    metadata = {"render_modes": []}

    def __init__(self, acc_fn: Callable[[tuple], float], acc_fp: float, features: np.ndarray,
                 choices: Sequence[int] = DEFAULT_BITS, start_bits: int | None = None,
                 wall: Callable[[tuple], tuple] | None = None, reward: str = "step",
                 on_episode: Callable[[dict], None] | None = None):
        super().__init__()
        choices = tuple(sorted(set(int(b) for b in choices)))
        if len(choices) < 2 or choices[0] < 1 or choices[-1] > 32:
            raise ConfigError(f"bits must hold at least two widths in 1..32, got {list(choices)}")
        if reward not in ("step", "final"):
            raise ConfigError(f"reward must be 'step' or 'final', got '{reward}'")
        self.acc_fn, self.acc_fp, self.choices, self.wall = acc_fn, float(acc_fp), choices, wall
        self.features = np.asarray(features, dtype=np.float64)
        self.L = len(self.features)
        if self.L < 1 or self.features.shape[1] != 4:
            raise ConfigError(f"features must be (L >= 1, 4), got {self.features.shape}")
        self.start_bits = int(start_bits if start_bits is not None else choices[-1])
        if self.start_bits not in choices:
            raise ConfigError(f"start_bits {self.start_bits} is not in {list(choices)}")
        self.reward_mode = reward
        self.on_episode = on_episode
        self.action_space = spaces.Discrete(len(choices))
        high = np.array([1, 32 / choices[-1], 32 / choices[-1], 2, 1, 1, 1, 10], dtype=np.float32)
        self.observation_space = spaces.Box(np.zeros(8, dtype=np.float32), high, dtype=np.float32)
        self._start_acc: float | None = None

    # -- helpers ------------------------------------------------------------------------------------
    def _obs(self) -> np.ndarray:
        l = min(self.layer, self.L - 1)
        b_max = self.choices[-1]
        o = [l / self.L, self.bits[l] / b_max, sum(self.bits) / (b_max * self.L), self.acc / self.acc_fp,
             *self.features[l]]
        return np.clip(np.asarray(o, dtype=np.float32), self.observation_space.low, self.observation_space.high)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.layer = 0
        self.bits = [self.start_bits] * self.L
        if self._start_acc is None:
            self._start_acc = float(self.acc_fn(tuple(self.bits)))
        self.acc = self._start_acc
        self.rewards: list[float] = []
        return self._obs(), {}

    def step(self, action):
        if not self.action_space.contains(int(action)):
            raise ConfigError(f"action {action} is not in 0..{len(self.choices) - 1}")
        self.bits[self.layer] = self.choices[int(action)]
        last = self.layer == self.L - 1
        if last and self.wall is not None:
            self.bits = list(self.wall(tuple(self.bits)))
        if last or self.reward_mode == "step":
            self.acc = float(self.acc_fn(tuple(self.bits)))
            reward = releq_reward(self.acc, self.acc_fp, self.bits, self.choices)
        else:
            reward = 0.0
        self.rewards.append(reward)
        self.layer += 1
        info = {"bits": tuple(self.bits), "acc": self.acc, "avg_bits": sum(self.bits) / self.L}
        if last:
            info["episode_reward"] = sum(self.rewards)
            info["final_reward"] = reward
            if self.on_episode is not None:
                self.on_episode(dict(info))
        return self._obs(), float(reward), last, False, info
