"""VSPO: Value-based Sampling Policy Optimization (arXiv 2512.07478; METHOD.md §3).

VSPO is GRPO with two changes. A group whose rollouts all earned the same reward has zero advantage and gives no
gradient (a dead group); VSPO rolls out, in its place, a prompt drawn from a buffer with probability proportional to
a task value that balances difficulty and uncertainty. And because the buffer's best prompts come back again and
again, their advantages are clipped harder the more often they were replayed (value-smoothing clipping), so that a
few prompts cannot dominate the gradient. The policy loss is PPO-clip with a k3 KL penalty to a frozen reference;
CISPO is the baseline loss.

This file holds the math as pure functions over tensors and masks; train.py owns the models, the data stream and the
rollouts. Notation: r_i the reward of rollout i, g its group (one prompt, G rollouts), k the prompt's replay count,
m_t the loss mask (1 on tokens the policy sampled, 0 on prompt, tool-response and padding tokens).

    GRPO advantage         A_i = (r_i - mean_g) / (std_g + 1e-6)              std_g the sample std (divide by G - 1)
    dead group             std_g < 1e-6  =>  A_i = 0
    task value             V_q = (R_max - mean_q) * std_q                     difficulty times uncertainty
    value-based sampling   P(pick q) ∝ V_q over buffer prompts not in the batch, without replacement
    value-smoothing clip   A_i <- clip(A_i, -c_k, c_k),  c_k = c_max / sqrt(1 + k)
    token ratio            rho_t = exp(log pi_theta(y_t) - log pi_old(y_t))
    PPO-clip               l_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)
    CISPO                  l_t = -sg[clip(rho_t, 1 - eps_low, 1 + eps_high)] A_t log pi_theta(y_t)
    k3 KL to reference     k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    loss (token-mean)      L = sum_t m_t (l_t + beta k3_t) / sum_t m_t

Only the paper's abstract is public. The task value comes from a secondary summary of it; the sampling and clipping
rules are our reading (METHOD.md §3). Every choice the paper does not make is marked `# OUR READING:`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

# ---- GRPO advantages over ragged groups ----


class GroupStats(NamedTuple):
    """Reward statistics per group; `stats.mean[stats.index]` gives every sample its own group's mean."""

    ids: torch.Tensor  # [G] the distinct group ids, sorted
    index: torch.Tensor  # [N] row of each sample's group in ids, mean, std and size
    mean: torch.Tensor  # [G]
    std: torch.Tensor  # [G] sample std (divide by size - 1); 0 for a group of one
    size: torch.Tensor  # [G] number of samples


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    """Mean, sample std and size of each group's rewards (METHOD.md §3.1, GRPO advantage).

    rewards: float [N]; group_ids: int [N], any values in any order, groups of any size.

    >>> stats = group_stats(torch.tensor([1., 0., 0., 0., 0., 1., 1.]), torch.tensor([7, 7, 7, 7, 7, 3, 3]))
    >>> stats.ids, stats.mean, stats.std, stats.size
    (tensor([3, 7]), tensor([1.0000, 0.2000]), tensor([0.0000, 0.4472]), tensor([2, 5]))
    """
    ids, index = torch.unique(group_ids, return_inverse=True)  # [G], [N]
    size = torch.bincount(index, minlength=len(ids))  # [G]
    zeros = rewards.new_zeros(len(ids))  # [G]
    mean = zeros.index_add(0, index, rewards) / size  # [G]
    squares = zeros.index_add(0, index, (rewards - mean[index]) ** 2)  # [G]
    # OUR READING: one reward has no spread; std 0 makes a group of one dead (advantage 0) instead of NaN.
    std = (squares / (size - 1).clamp(min=1)).sqrt()  # [G]
    return GroupStats(ids, index, mean, std, size)


def dead_groups(rewards: torch.Tensor, group_ids: torch.Tensor, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Which groups are dead: sample std < tol, all rewards equal, every advantage 0 (METHOD.md §3.1, dead group).

    Returns (ids [G] sorted, dead [G] bool) aligned with each other: `ids[dead]` are the groups to replace.

    >>> dead_groups(torch.tensor([1., 0., 1., 1., 0.5]), torch.tensor([4, 4, 9, 9, 2]))
    (tensor([2, 4, 9]), tensor([ True, False,  True]))
    """
    stats = group_stats(rewards, group_ids)
    return stats.ids, stats.std < tol


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, tol: float = 1e-6
) -> torch.Tensor:
    """GRPO advantage A_i = (r_i - mean_g) / (std_g + eps), sample std, 0 in dead groups (METHOD.md §3.1).

    rewards: float [N]; group_ids: int [N] (ragged groups, any ids, any order). Returns [N].
    Ids 7 and 3 below: one success in five (sample std 0.4472), and a dead group of two.

    >>> group_advantages(torch.tensor([1., 0., 0., 0., 0., 1., 1.]), torch.tensor([7, 7, 7, 7, 7, 3, 3]))
    tensor([ 1.7889, -0.4472, -0.4472, -0.4472, -0.4472,  0.0000,  0.0000])
    """
    stats = group_stats(rewards, group_ids)
    mean, std = stats.mean[stats.index], stats.std[stats.index]  # [N], [N]
    advantages = (rewards - mean) / (std + eps)  # [N]
    # OUR READING (METHOD.md §3.1, dead group): std < tol gives exactly 0. Without it, rounding leaves r - mean and std
    # both ~6e-8 (seven float32 0.9s), and (r - mean) / (std + eps) comes out near -0.06 instead of 0.
    return torch.where(std < tol, 0.0, advantages)  # [N]


def broadcast_to_tokens(advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Each trajectory's advantage on its sampled tokens, 0 on prompt, tool and padding tokens (METHOD.md §3.1).

    advantages: [N]; loss_mask: [N, T] (1 = sampled by the policy). Returns [N, T].

    >>> broadcast_to_tokens(torch.tensor([1.5, -0.5]), torch.tensor([[0, 1, 1, 0], [0, 1, 0, 1]]))
    tensor([[ 0.0000,  1.5000,  1.5000,  0.0000],
            [ 0.0000, -0.5000,  0.0000, -0.5000]])
    """
    return torch.where(loss_mask.bool(), advantages.unsqueeze(-1), 0.0)  # [N, T]


# ---- Task value and value-based sampling ----


def task_value(rewards, r_max: float = 1.0, tol: float = 1e-6) -> float:
    """Task value V = (R_max - mean) * std of one prompt's rollout rewards (METHOD.md §3.2, task value).

    rewards: a 1-D tensor or list, each <= r_max. (R_max - mean) is the difficulty, std the uncertainty; V is never
    negative and is 0 for a dead group. For 0/1 rewards with success rate p, V = (1 - p) * sqrt(p (1 - p)): it peaks
    at p = 1/4, not 1/2, because the difficulty factor favours the harder of two equally uncertain prompts.

    >>> round(task_value([1, 0, 0, 0, 0]), 4), round(task_value([1, 1, 0, 0]), 4), task_value([0, 0, 0])
    (0.32, 0.25, 0.0)
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64)  # [G]
    if (rewards > r_max).any():
        raise ValueError(f"reward {rewards.max().item()} exceeds r_max={r_max}; pass the reward's true upper bound")
    # OUR READING: population std (divide by G, not G - 1), so V depends only on the rewards' distribution and
    # values from groups of different sizes are comparable in one buffer. Advantages keep the sample std.
    std = rewards.std(correction=0)
    if std < tol:
        return 0.0
    return ((r_max - rewards.mean()) * std).item()


@dataclass
class ValueBuffer:
    """Per-prompt task value (EMA-smoothed) and replay count, the memory of value-based sampling (METHOD.md §3.3).

    Keys are prompt ids (str). state_dict() is a plain JSON-able dict, so a checkpoint can save and restore it.

    >>> buffer = ValueBuffer(ema_alpha=0.5)
    >>> buffer.update("q1", 0.32); buffer.update("q1", 0.0); buffer.mark_replayed("q1")
    >>> buffer.values["q1"], buffer.replay_count("q1"), buffer.replay_count("q2")
    (0.16, 1, 0)
    """

    ema_alpha: float = 0.5
    """weight of the newest observation: value <- (1 - ema_alpha) * value + ema_alpha * new_value"""
    values: dict[str, float] = field(default_factory=dict)
    """EMA-smoothed task value of every prompt scored so far"""
    replays: dict[str, int] = field(default_factory=dict)
    """how many times each prompt was drawn again as a replacement"""

    def __post_init__(self):
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha={self.ema_alpha} must be in (0, 1]; 1 keeps only the newest value")

    def update(self, key: str, value: float) -> None:
        """Fold a new task value of prompt `key` into its EMA; the first observation sets it."""
        # OUR READING: alpha 0.5 by default. A prompt comes back rarely and the policy has moved since its last
        # visit, so recent values should dominate; each older visit counts half as much as the next.
        old = self.values.get(key)
        self.values[key] = float(value) if old is None else (1 - self.ema_alpha) * old + self.ema_alpha * float(value)

    def mark_replayed(self, key: str) -> None:
        """Count one more replay of prompt `key` (call it for each replacement actually rolled out)."""
        self.replays[key] = self.replays.get(key, 0) + 1

    def replay_count(self, key: str) -> int:
        """How many times prompt `key` was replayed; 0 for a prompt never replayed."""
        return self.replays.get(key, 0)

    def state_dict(self) -> dict:
        """A plain dict of str, float and int that json.dumps accepts and from_state_dict restores exactly."""
        return {"ema_alpha": self.ema_alpha, "values": dict(self.values), "replays": dict(self.replays)}

    @classmethod
    def from_state_dict(cls, state: dict) -> ValueBuffer:
        """The buffer that wrote `state`."""
        return cls(ema_alpha=state["ema_alpha"], values=dict(state["values"]), replays=dict(state["replays"]))


REPLACEMENT_MODES = ("value", "random", "filter", "none")


def choose_replacements(
    buffer: ValueBuffer, num_needed: int, exclude: Collection[str], rng: np.random.Generator, mode: str = "value"
) -> list[str | None]:
    """Prompts to roll out in place of a batch's dead groups (METHOD.md §3.3, value-based sampling and its ablations).

    value   VSPO: buffer prompts with value > 0 and not in `exclude`, drawn without replacement with probability
            proportional to value (each draw among the prompts left).
    random  the same draw, uniform over buffer prompts not in `exclude` (values ignored, zeros included).
    filter  DAPO-style dynamic sampling: every replacement is a fresh prompt.
    none    GRPO: no replacement; returns [].

    Returns num_needed entries (none: 0): distinct buffer keys, then None for each slot where no candidate was left,
    meaning "take a fresh prompt from the data stream" (so an empty buffer gives all None). Never a key in `exclude`.
    Deterministic given rng's state. It does not count replays: call buffer.mark_replayed for each key rolled out.

    >>> buffer = ValueBuffer(values={"q1": 0.32, "q2": 0.0, "q3": 0.25})
    >>> choose_replacements(buffer, 3, exclude={"q3"}, rng=np.random.default_rng(0))
    ['q1', None, None]
    """
    if mode not in REPLACEMENT_MODES:
        raise ValueError(f"unknown replacement mode {mode!r}; expected one of {', '.join(REPLACEMENT_MODES)}")
    if mode == "none":
        return []
    if mode == "filter":
        return [None] * num_needed
    # OUR READING: the paper says only "prompts selected by a task-value metric". We draw without replacement
    # (a batch holds a prompt once), skip value 0 (a prompt last seen dead or never uncertain teaches nothing), and
    # sort the candidates, so the picks depend on the buffer's contents and the rng state only.
    candidates = sorted(key for key in buffer.values if key not in exclude)
    if mode == "value":
        candidates = [key for key in candidates if buffer.values[key] > 0]
    weights = np.array([buffer.values[key] if mode == "value" else 1.0 for key in candidates])
    num_picks = min(num_needed, len(candidates))
    picks = rng.choice(len(candidates), size=num_picks, replace=False, p=weights / weights.sum()) if num_picks else []
    return [candidates[i] for i in picks] + [None] * (num_needed - num_picks)


def max_group_advantage(group_size: int) -> float:
    """(G - 1) / sqrt(G): the largest |A| a GRPO group of G can produce (one reward apart from G - 1 equal ones).

    >>> round(max_group_advantage(5), 4)
    1.7889
    """
    return (group_size - 1) / math.sqrt(group_size)


def value_smoothing_clip(advantages: torch.Tensor, replay_counts: torch.Tensor, c_max: float) -> torch.Tensor:
    """Value-smoothing clipping: clip A to ±c_k, c_k = c_max / sqrt(1 + k), k the replay count (METHOD.md §3.4).

    advantages and replay_counts share a shape, e.g. [N] per trajectory; k is the number of times the sample's prompt
    was drawn as a replacement, counting this rollout (0 for a fresh prompt). Keeps the sign, never grows |A|, never
    exceeds c_max, and leaves A unchanged at k = 0 when |A| <= c_max. Pass c_max = max_group_advantage(G) for your
    group size G: then a fresh group is never clipped, only replays are (a c_max for G = 5, 1.789, would clip fresh
    groups of 8, whose |A| reaches 2.47).

    >>> value_smoothing_clip(torch.tensor([1.5, -0.5, 1.5, -1.5]), torch.tensor([0, 0, 1, 3]), max_group_advantage(5))
    tensor([ 1.5000, -0.5000,  1.2649, -0.8944])
    """
    # OUR READING: c_max = max_group_advantage(G), 1.789 at the paper's G = 5: a fresh group (k = 0) is never clipped.
    if (replay_counts < 0).any():
        raise ValueError(f"replay counts must be >= 0, got {replay_counts.min().item()}")
    # OUR READING: 1 / sqrt(1 + k) decays smoothly from 1, and a prompt replayed K times then adds at most about
    # 2 c_max sqrt(K + 1) of |A| in total, against c_max (K + 1) unclipped: replays cannot dominate the gradient.
    c_k = c_max / torch.sqrt(1 + replay_counts.to(advantages.dtype))  # same shape as advantages
    return torch.clamp(advantages, min=-c_k, max=c_k)


# ---- Policy losses over per-token tensors [batch, seq_len] ----

REDUCTIONS = ("token-mean", "seq-mean")


def masked_reduce(
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    reduction: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar mean of per-token values over sampled tokens only (METHOD.md §3.5: token-mean over the batch).

    token-mean  sum of values on sampled tokens / normalizer (default: the number of sampled tokens here).
    seq-mean    sum over sequences of each one's mean over its sampled tokens / normalizer (default: batch size).
    Gradient accumulation: give every micro-batch the whole batch's normalizer (its sampled-token count, or its
    number of sequences) and the micro-batch results sum to the whole batch's. Masked values, even NaN, never count.

    >>> values, mask = torch.tensor([[1., 2., 9.], [3., 9., 9.]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> masked_reduce(values, mask), masked_reduce(values, mask, "seq-mean")  # (1 + 2 + 3) / 3, (1.5 + 3) / 2
    (tensor(2.), tensor(2.2500))
    >>> masked_reduce(values[:1], mask[:1], normalizer=3) + masked_reduce(values[1:], mask[1:], normalizer=3)
    tensor(2.)
    """
    if values.shape != loss_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and loss_mask {tuple(loss_mask.shape)} must have one shape")
    mask = loss_mask.bool()  # [B, T]
    values = torch.where(mask, values, 0.0)  # [B, T]
    if reduction == "token-mean":
        total, default = values.sum(), mask.sum().clamp(min=1)
    elif reduction == "seq-mean":
        total, default = (values.sum(-1) / mask.sum(-1).clamp(min=1)).sum(), mask.shape[0]
    else:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    return total / (default if normalizer is None else normalizer)


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    reduction: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO-clip: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = pi_theta / pi_old (METHOD.md §3.5).

    All inputs [B, T]; only logprobs carries gradient. Masked tokens get neither loss nor gradient, whatever their
    values (NaN and inf included). A token whose ratio left the trust region on the side its advantage pushes toward
    gets no gradient (the second token below: A > 0, rho = 1.8 > 1.2).

    >>> logprobs = torch.log(torch.tensor([[0.5, 0.9, 0.3]])).requires_grad_()
    >>> old_logprobs, advantages = torch.log(torch.tensor([[0.5, 0.5, 0.5]])), torch.ones(1, 3)
    >>> loss = ppo_clip_loss(logprobs, old_logprobs, advantages, torch.tensor([[1, 1, 0]]))
    >>> loss.backward(); loss.detach(), logprobs.grad  # (-1 - 1.2) / 2; -rho A / 2 on the unclipped token
    (tensor(-1.1000), tensor([[-0.5000,  0.0000,  0.0000]]))
    """
    mask = loss_mask.bool()  # [B, T]
    # torch.where before exp: masked garbage never reaches a function whose derivative could turn it into NaN.
    logratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # [B, T]
    advantages = torch.where(mask, advantages, 0.0)  # [B, T]
    ratio = torch.exp(logratio)  # [B, T]
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # [B, T]
    per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)  # [B, T]
    return masked_reduce(per_token, mask, reduction, normalizer)


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    reduction: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """CISPO (MiniMax-M1): -sg[clip(rho, 1 - eps_low, 1 + eps_high)] A log pi_theta, the baseline of METHOD.md §3.5.

    All inputs [B, T]. Unlike PPO-clip no token loses its gradient: the clipped importance weight only scales it,
    gradient = -clip(rho) A grad(log pi_theta) / normalizer. Masked tokens count for nothing, NaN and inf included.
    The loss value only carries that gradient; it is not comparable with PPO-clip's.

    >>> logprobs = torch.log(torch.tensor([[0.5, 0.9, 0.3]])).requires_grad_()
    >>> old_logprobs, advantages = torch.log(torch.tensor([[0.5, 0.5, 0.5]])), torch.ones(1, 3)
    >>> cispo_loss(logprobs, old_logprobs, advantages, torch.tensor([[1, 1, 0]])).backward()
    >>> logprobs.grad  # -1 * 1 / 2 and -1.2 * 1 / 2: the second token is scaled down, not dropped
    tensor([[-0.5000, -0.6000,  0.0000]])
    """
    # OUR READING: MiniMax-M1 leaves the lower bound open (a large eps_low) and tunes eps_high; we default to PPO's
    # ±0.2 so the two baselines differ only in how they treat clipped tokens. eps_low=1.0 gives MiniMax-M1's form.
    mask = loss_mask.bool()  # [B, T]
    logprobs = torch.where(mask, logprobs, 0.0)  # [B, T]
    old_logprobs = torch.where(mask, old_logprobs, 0.0)  # [B, T]
    advantages = torch.where(mask, advantages, 0.0)  # [B, T]
    weight = torch.clamp(torch.exp(logprobs - old_logprobs), 1 - eps_low, 1 + eps_high).detach()  # [B, T]
    return masked_reduce(-weight * advantages * logprobs, mask, reduction, normalizer)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 (METHOD.md §3.5, KL term).

    Any shape, unreduced and unmasked (reduce with masked_reduce). Always >= 0, and 0 where the two log-probs agree.

    >>> kl_k3(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0]))  # e - 2 on the second token
    tensor([0.0000, 0.7183])
    """
    delta = ref_logprobs - logprobs  # same shape as logprobs, e.g. [B, T]
    # expm1(d) - d rather than exp(d) - d - 1, which can round to a tiny negative number when |d| is near 1e-8.
    return torch.expm1(delta) - delta  # same shape as logprobs


LOSS_KINDS = ("ppo", "cispo")


@torch.no_grad()
def loss_diagnostics(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    kind: str = "ppo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> dict[str, float]:
    """Floats to log for one policy update, each a mean over the sampled tokens of the tensors given.

    clip_fraction  share of tokens the clip acts on: for ppo, ratio beyond 1 + eps_high with A > 0 or below
                   1 - eps_low with A < 0 (their gradient is cut); for cispo, ratio outside [1 - eps_low, 1 + eps_high].
    approx_kl      k3 estimate of KL(pi_old || pi_theta) from tokens pi_old sampled: rho - 1 - log rho (cleanrl's).
    ratio_mean     mean of rho = pi_theta / pi_old.
    kl_ref         mean k3 to the reference (only when ref_logprobs is given).
    entropy        mean of the per-token entropy (only when entropy is given).

    >>> logprobs, old_logprobs = torch.log(torch.tensor([[0.5, 0.9, 0.3]])), torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    >>> diagnostics = loss_diagnostics(logprobs, old_logprobs, torch.ones(1, 3), torch.tensor([[1, 1, 0]]))
    >>> {name: round(value, 4) for name, value in diagnostics.items()}
    {'clip_fraction': 0.5, 'approx_kl': 0.1061, 'ratio_mean': 1.4}
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown policy loss {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
    mask = loss_mask.bool()  # [B, T]
    logratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # [B, T]
    ratio = torch.exp(logratio)  # [B, T]
    above, below = ratio > 1 + eps_high, ratio < 1 - eps_low  # [B, T], [B, T]
    if kind == "ppo":
        clipped = (above & (advantages > 0)) | (below & (advantages < 0))  # [B, T]
    else:
        clipped = above | below  # [B, T]
    diagnostics = {
        "clip_fraction": masked_reduce(clipped.float(), mask).item(),
        "approx_kl": masked_reduce(torch.expm1(logratio) - logratio, mask).item(),  # rho - 1 - log rho
        "ratio_mean": masked_reduce(ratio, mask).item(),
    }
    if ref_logprobs is not None:
        diagnostics["kl_ref"] = masked_reduce(kl_k3(logprobs, ref_logprobs), mask).item()
    if entropy is not None:
        diagnostics["entropy"] = masked_reduce(entropy, mask).item()
    return diagnostics


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    kind: str = "ppo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    reduction: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of METHOD.md §3.5: PPO-clip (kind="ppo") or CISPO (kind="cispo") plus kl_beta * k3 to the
    reference, token-mean over the batch (or reduction="seq-mean").

    All tensors [B, T]: logprobs with gradient, old_logprobs from the rollout policy, advantages already broadcast to
    tokens, loss_mask 1 on sampled tokens. `normalizer` is the whole batch's (see masked_reduce) when the batch is split
    into micro-batches. Returns (loss, diagnostics); diagnostics are described in loss_diagnostics.

    >>> logprobs, old_logprobs = torch.log(torch.tensor([[0.5, 0.9, 0.3]])), torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    >>> loss, diagnostics = policy_loss(logprobs, old_logprobs, torch.ones(1, 3), torch.tensor([[1, 1, 0]]))
    >>> loss, diagnostics["clip_fraction"]
    (tensor(-1.1000), 0.5)
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown policy loss {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
    if kl_beta and ref_logprobs is None:
        raise ValueError(f"kl_beta={kl_beta} needs ref_logprobs from the reference model; pass them or set kl_beta=0")
    loss_fn = ppo_clip_loss if kind == "ppo" else cispo_loss
    clip = {"eps_low": eps_low, "eps_high": eps_high}
    loss = loss_fn(logprobs, old_logprobs, advantages, loss_mask, **clip, reduction=reduction, normalizer=normalizer)
    if kl_beta:
        mask = loss_mask.bool()  # [B, T]
        kl = kl_k3(torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0))  # [B, T]
        loss = loss + kl_beta * masked_reduce(kl, mask, reduction, normalizer)
    diagnostics = loss_diagnostics(
        logprobs, old_logprobs, advantages, loss_mask, kind=kind, **clip, ref_logprobs=ref_logprobs, entropy=entropy
    )
    return loss, diagnostics


# ---- The method and its baselines, as settings of the pieces above (train.py's --algorithm) ----

# name -> (dead-group replacement mode of choose_replacements, value-smoothing clipping on, policy loss kind)
ALGORITHMS = {
    "vspo": ("value", True, "ppo"),  # the paper's method (METHOD.md §3)
    "grpo": ("none", False, "ppo"),  # no replacement, no clipping (METHOD.md §3.5, the baseline)
    "dapo": ("filter", False, "ppo"),  # dead groups dropped and refilled with fresh prompts (METHOD.md §3.3)
    "cispo": ("none", False, "cispo"),  # GRPO sampling with the CISPO loss (METHOD.md §3.5)
}
