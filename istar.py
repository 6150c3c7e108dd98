"""iStar: implicit step rewards for agentic RL (arXiv 2509.19199, ICLR 2026; METHOD.md §4).

Outcome rewards say how a trajectory ended, not which of its steps helped. iStar learns that credit without step
labels and without extra rollouts. An implicit process reward model (PRM) π_φ, a causal LM initialised from the
policy and trained alongside it with its own optimizer, is fitted with a trajectory-level DPO objective to prefer the
group's successful trajectories over its failed ones; its log-ratio to the rollout policy π_θold, summed over the
tokens of a step, is that step's reward. The paper shows that the optimum of this DPO objective is a Bradley-Terry
model whose trajectory score is the sum of these step rewards, so step rewards are what the PRM learns.

A step is one assistant segment of the trajectory, its reasoning and its tool call together (rollout.Trajectory.steps);
tool-response tokens are the environment's and never count. Notation: τ a trajectory of group g (G rollouts of one
prompt), a_t its step t, y ∈ a_t the step's sampled tokens, β = 0.05, π_θold the policy snapshot that sampled the
batch (rolling: it is the policy before this iteration's update, not a frozen reference).

    Eq. 1  step reward       r_φ(a_t) = β Σ_{y ∈ a_t} [log π_φ(y) − log π_θold(y)]
           trajectory        z(τ) = Σ_{sampled y ∈ τ} [log π_φ(y) − log π_θold(y)] = Σ_t r_φ(a_t) / β
    Eq. 2  PRM loss (DPO)    L(φ) = − mean over pairs (τ⁺, τ⁻) of log σ(β z(τ⁺) − β z(τ⁻))
                             pairs: every success × failure of the same group (success: outcome reward > threshold)
           episode advantage A^E(τ) = (R(τ) − mean_g R) / (std_g R + 1e-6)        GRPO: vspo.group_advantages
    Eq. 4  step advantage    A^S(a_t) = (r_φ(a_t) − mean(R_s)) / (std(R_s) + 1e-6),
                             R_s = the rewards of all steps of all trajectories of the group
    Eq. 5  combined          A(y) = A^E(τ) + α A^S(a_t) for every sampled token y of step a_t, α = 1

One iteration: roll out; score outcomes; `ImplicitPRM.score_and_update` computes the PRM's log-probs, takes the step
rewards from that forward pass, then takes one DPO step of the PRM; A^E and A^S combine (Eq. 5) into the advantages
of the policy loss (PPO-clip, no KL: vspo.policy_loss with kl_beta=0).

The PRM must learn faster than the policy moves (`prm_learning_rate`). r_φ is a log-ratio against π_θold, and π_θold
is the policy, which learns from the same outcomes: a step the policy has come to prefer more than the PRM has gets a
negative reward. The paper trains the PRM at 1e-6 and the policy at 5e-7, one optimizer step each per iteration, so
the PRM moves twice as far per iteration as the policy. A PRM left at 1e-6 beside a policy at 2e-5 ranks failures
above successes: its step rewards measure the policy's drift, with the sign that undoes what the policy learned.

How it composes with the other two methods of this project:
- PRS (prs.py), or any outcome reward: the reward feeds A^E as usual, and the `threshold` on it decides which
  trajectories are successes for the DPO pairs. With binary EM any threshold in [0, 1) gives the same pairs.
- VSPO (vspo.py), or any sampling mode (GRPO, DAPO-style filtering): those decide which groups make up the batch;
  iStar changes only the advantages. A^E is whatever the sampling mode's episode advantage is (VSPO's, after its
  value-smoothing clip). A dead group (all rewards equal) has A^E = 0 and no DPO pair, but its steps still get A^S.

Memory. The PRM is a second full model with its own AdamW state. In fp32 its weights and two Adam moments take 3x
the policy's parameter bytes (12 bytes per parameter, 16 while its gradients exist during the update), plus the
activations of its forward and backward passes: ~2.2 GB for SmolLM2-135M, ~25 GB for Qwen2.5-1.5B (1.54B parameters),
whose policy and PRM together (~50 GB; iStar loads no reference model) fit one 80 GB GPU; at 3B they do not. To fit
one GPU: give the PRM the policy's micro-batch size; turn on activation checkpointing
(`prm.model.activation_checkpointing_enable()` and `prm.model.train()`; rollout.response_logprobs then stops sharing
the prompt prefix by itself); keep fp32 weights, since a bf16 weight cannot hold a 1e-6 update.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from vspo import broadcast_to_tokens, group_advantages

# ---- How fast the PRM learns ----


def prm_learning_rate(policy_lr: float, policy_steps_per_iteration: int = 1, ratio: float = 2.0) -> float:
    """The PRM's learning rate: `ratio` times the distance the policy moves per iteration, the policy's learning rate
    times its optimizer steps per iteration (Adam moves each weight by about its learning rate per step).

    The paper: policy 5e-7 with one optimizer step per iteration, PRM 1e-6 with one DPO step: ratio 2.

    >>> prm_learning_rate(5e-7), prm_learning_rate(2e-5, policy_steps_per_iteration=2)
    (1e-06, 8e-05)
    """
    # OUR READING: the paper gives the two rates for its setup, not a rule; we keep the ratio of how far each model
    # moves per iteration, since the step reward compares the two. A PRM at half the policy's pace ranks failed steps
    # above successful ones on a controlled task (tests/test_istar.py); at twice the pace it ranks them right.
    return ratio * policy_lr * policy_steps_per_iteration


# ---- Steps and implicit step rewards (Eq. 1) ----


def step_index(steps_per_row: list[list[tuple[int, int]]], width: int) -> torch.Tensor:
    """For every response token, the index of the step (assistant segment) it belongs to; -1 on tool-response tokens
    and padding. Returns a LongTensor [N, R] aligned with the batch's per-response-token tensors (column j = response
    token j, as in rollout.TokenBatch).

    steps_per_row: per trajectory its Trajectory.steps, [start, end) spans into response_ids; width: R.

    >>> step_index([[(0, 2), (4, 5)], [(0, 3)]], width=6)
    tensor([[ 0,  0, -1, -1,  1, -1],
            [ 0,  0,  0, -1, -1, -1]])
    """
    step_ids = torch.full((len(steps_per_row), width), -1, dtype=torch.long)  # [N, R]
    for row, steps in enumerate(steps_per_row):
        for step, (start, end) in enumerate(steps):
            if not 0 <= start <= end <= width:
                raise ValueError(f"row {row}, step {step}: span [{start}, {end}) does not fit a response of width "
                                 f"{width}; pass width = batch.response_ids.shape[1] of the batch the steps came from")
            step_ids[row, start:end] = step
    return step_ids


def step_rewards(
    prm_logprobs: torch.Tensor, old_logprobs: torch.Tensor, step_ids: torch.Tensor, beta: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit step rewards r_t = β Σ_{tokens of step t} (log π_φ − log π_θold) (Eq. 1).

    prm_logprobs, old_logprobs: [N, R] per response token; step_ids: [N, R] from step_index. Only tokens with a step
    id >= 0 count, whatever the log-probs hold elsewhere (NaN included). Returns (rewards [N, S], step_mask [N, S]),
    S = the most steps of any row; step_mask is True on a row's real steps (a step with no token is not real).
    Row 0 below: step 0 gains 0.5 + 0.5 nats, step 1 gains 0.5, the tool token (9.0 vs 0.0) is ignored.

    >>> prm = torch.tensor([[-1.0, -2.0, 9.0, -0.5], [-1.0, -3.0, 0.0, 0.0]])
    >>> old = torch.tensor([[-1.5, -2.5, 0.0, -1.0], [-2.0, -2.0, 0.0, 0.0]])
    >>> step_rewards(prm, old, torch.tensor([[0, 0, -1, 1], [0, 0, -1, -1]]), beta=0.1)
    (tensor([[0.1000, 0.0500],
            [0.0000, 0.0000]]), tensor([[ True,  True],
            [ True, False]]))
    """
    num_steps = int(step_ids.max()) + 1 if step_ids.numel() else 0  # S
    in_step = step_ids >= 0  # [N, R]
    # torch.where before the sum: garbage on tool tokens never reaches it, not even as NaN * 0.
    log_ratio = torch.where(in_step, prm_logprobs - old_logprobs, 0.0)  # [N, R]
    one_hot = step_ids.unsqueeze(-1) == torch.arange(num_steps, device=step_ids.device)  # [N, R, S]
    rewards = beta * torch.einsum("nr,nrs->ns", log_ratio, one_hot.to(log_ratio.dtype))  # [N, S]
    return rewards, one_hot.any(dim=1)  # [N, S], [N, S]


def trajectory_log_ratio(
    prm_logprobs: torch.Tensor, old_logprobs: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """z(τ) = Σ over a trajectory's sampled tokens of (log π_φ − log π_θold), the DPO implicit reward over β (Eq. 2).

    All inputs [N, R]; loss_mask is 1 on sampled tokens. Returns [N]. When the steps tile the sampled tokens (as
    rollout.py records them), β z(τ) equals the sum of the trajectory's step rewards (Eq. 1).

    >>> prm = torch.tensor([[-1.0, -2.0, 9.0, -0.5]])
    >>> trajectory_log_ratio(prm, torch.tensor([[-1.5, -2.5, 0.0, -1.0]]), torch.tensor([[1, 1, 0, 1]]))
    tensor([1.5000])
    """
    return torch.where(loss_mask.bool(), prm_logprobs - old_logprobs, 0.0).sum(dim=-1)  # [N]


# ---- The PRM's objective: trajectory-level DPO over success x failure pairs (Eq. 2) ----


def dpo_pairs(outcome_rewards: torch.Tensor, group_ids: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every (success, failure) pair of rows within a group: LongTensor [P, 2] of (τ⁺ index, τ⁻ index) (Eq. 2).

    outcome_rewards: [N]; group_ids: [N], any ids in any order. Success: reward > threshold; failure: reward <=
    threshold. A group without both gives no pair. Pairs come sorted by success index, then failure index.
    Below, group 7 has one success (row 0) and two failures, group 3 one of each, group 9 no success.

    >>> dpo_pairs(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.0]), torch.tensor([7, 7, 3, 3, 7, 9]), threshold=0.5)
    tensor([[0, 1],
            [0, 4],
            [3, 2]])
    """
    # OUR READING: a NaN reward (a sample the judge could not score) is neither a success nor a failure, so it never
    # enters a pair; METHOD.md §2.4 excludes unscored samples from the update.
    success, failure = outcome_rewards > threshold, outcome_rewards <= threshold  # [N], [N]
    same_group = group_ids.unsqueeze(1) == group_ids.unsqueeze(0)  # [N, N]
    return (same_group & success.unsqueeze(1) & failure.unsqueeze(0)).nonzero()  # [P, 2]


def dpo_loss(log_ratio: torch.Tensor, pairs: torch.Tensor, beta: float = 0.05) -> torch.Tensor:
    """Trajectory DPO loss: mean over pairs of −log σ(β (z⁺ − z⁻)) (Eq. 2), via logsigmoid (stable for any margin).

    log_ratio: z [N] from trajectory_log_ratio; pairs: [P, 2] from dpo_pairs. Returns a scalar; with no pair it is
    exactly 0 and still part of z's graph, so backward() runs and gives zero gradients.
    Below, margins β (z⁺ − z⁻) = 0.5 and 1.0: (log(1 + e^-0.5) + log(1 + e^-1)) / 2 = (0.4741 + 0.3133) / 2.

    >>> dpo_loss(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([[0, 1], [0, 2]]), beta=0.5)
    tensor(0.3937)
    """
    if len(pairs) == 0:
        return log_ratio[:0].sum()  # exactly 0, connected to log_ratio's graph
    margins = beta * (log_ratio[pairs[:, 0]] - log_ratio[pairs[:, 1]])  # [P]
    return -F.logsigmoid(margins).mean()


# ---- Advantages (Eq. 4, Eq. 5) ----


def step_advantages(
    rewards: torch.Tensor, step_mask: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, tol: float = 1e-6
) -> torch.Tensor:
    """A^S = (r − mean) / (std + eps) over all real steps of all trajectories of a group (Eq. 4); 0 on non-steps.

    rewards, step_mask: [N, S] from step_rewards (trajectories may have different step counts); group_ids: [N].
    A group whose steps all have the same reward (std < tol), or that has a single step, gets 0. Returns [N, S].
    Below, one group of three steps (0.1, 0.05, 0.2): mean 0.1167, sample std 0.0764.

    >>> step_advantages(torch.tensor([[0.1, 0.05], [0.2, 0.0]]), torch.tensor([[True, True], [True, False]]),
    ...                 torch.tensor([4, 4]))
    tensor([[-0.2182, -0.8729],
            [ 1.0911,  0.0000]])
    """
    # OUR READING: the paper writes std(R_s) without saying which; we take the sample std (divide by count - 1), the
    # convention of the episode advantage (vspo.group_advantages, METHOD.md §3.1), so A^E and A^S are on one scale.
    # With 5 trajectories of 3 steps the two conventions differ by sqrt(15 / 14), 3.5%. Also vspo's: a group of equal
    # step rewards (std < tol) gets exactly 0, where dividing by std + eps would turn rounding noise into ±1.
    step_groups = group_ids.unsqueeze(1).expand_as(step_mask)[step_mask]  # [number of real steps]
    advantages = torch.zeros_like(rewards)  # [N, S]
    advantages[step_mask] = group_advantages(rewards[step_mask], step_groups, eps=eps, tol=tol)
    return advantages


def combine_advantages(
    episode_advantages: torch.Tensor,
    step_advantages: torch.Tensor,
    step_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Per-token advantage A = A^E + α A^S (Eq. 5): the trajectory's A^E plus α times its step's A^S on each sampled
    token, 0 on prompt, tool and padding tokens.

    episode_advantages: [N] (GRPO, vspo.group_advantages); step_advantages: [N, S] (Eq. 4); step_ids, loss_mask:
    [N, R]. Returns [N, R], ready for vspo.policy_loss. With alpha = 0 it is vspo.broadcast_to_tokens(A^E, loss_mask).
    Below, row 0's two steps get 1 + 0.5 and 1 - 0.5, row 1's one step gets -1 + 2; tool tokens and padding get 0.

    >>> combine_advantages(torch.tensor([1.0, -1.0]), torch.tensor([[0.5, -0.5], [2.0, 0.0]]),
    ...                    torch.tensor([[0, -1, 1, -1], [0, 0, -1, -1]]), torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]]))
    tensor([[1.5000, 0.0000, 0.5000, 0.0000],
            [1.0000, 1.0000, 0.0000, 0.0000]])
    """
    # Column 0 holds a 0 for tokens outside any step (id -1), so the gather below needs no special case.
    padded = torch.cat([step_advantages.new_zeros(len(step_advantages), 1), step_advantages], dim=1)  # [N, S + 1]
    per_token = padded.gather(1, step_ids + 1)  # [N, R]
    return broadcast_to_tokens(episode_advantages, loss_mask) + alpha * torch.where(loss_mask.bool(), per_token, 0.0)


# ---- The implicit PRM: a second causal LM and its optimizer ----


class ImplicitPRM:
    """The implicit PRM π_φ, its AdamW optimizer and the iStar settings (METHOD.md §4.2).

    model          π_φ, a causal LM with the policy's tokenizer, trained here and nowhere else
    lr             the PRM's learning rate: twice as fast as the policy moves (prm_learning_rate; the paper: 1e-6
                   beside a policy at 5e-7); restoring a state_dict keeps it
    beta           β of Eq. 1 and Eq. 2 (the paper: 0.05)
    threshold      a trajectory is a success for the DPO pairs when its outcome reward is above it
    max_grad_norm  the PRM's gradient is clipped to this global norm before its step
    weight_decay   AdamW's decoupled weight decay
    temperature    the PRM's log-probs are taken at this temperature; it must be the one old_logprobs were taken at
    logprobs_fn    logprobs_fn(model, micro_batch) -> [n, r] log-probs of the micro-batch's response tokens, with
                   gradients when they are enabled. Default: rollout.response_logprobs at `temperature` (imported when
                   first used, so that the math above needs only vspo.py). Another trainer passes its own.

    A batch is anything with len(), row slicing (`batch[start:stop]`, a micro-batch), `.to(device)` and `.loss_mask`
    [N, R] (1 on sampled tokens), as rollout.TokenBatch has. Create the PRM once from the policy with
    `ImplicitPRM.from_policy(policy)` (a deep copy: same weights, separate parameters), or from a saved PRM folder
    with `ImplicitPRM(AutoModelForCausalLM.from_pretrained(folder))`. Then, every iteration, after the rollout and
    its outcome rewards and before the policy update:

        old_logprobs = recompute_logprobs(policy, batch, micro_batch_size, prm.temperature)  # π_θold, [N, R]
        step_ids = step_index([t.steps for t in trajectories], batch.response_ids.shape[1])
        rewards, step_mask, diagnostics = prm.score_and_update(batch, old_logprobs, outcome_rewards, group_ids,
                                                               step_ids, micro_batch_size=micro_batch_size)

    Checkpoints: the caller saves the model with `prm.model.save_pretrained(folder / "prm")` and the optimizer with
    `prm.state_dict()`; restoring is the constructor on that folder, then `load_state_dict`.
    """

    def __init__(
        self,
        model,
        *,
        lr: float = 1e-6,
        beta: float = 0.05,
        threshold: float = 0.5,
        max_grad_norm: float = 1.0,
        weight_decay: float = 0.01,
        temperature: float = 1.0,
        logprobs_fn=None,
    ):
        # OUR READING: METHOD.md §4.2 leaves the success threshold open; 0.5 splits a reward in [0, 1] (PRS, EM) in
        # the middle, and binary EM gives the same pairs with any threshold in [0, 1).
        # OUR READING: gradient clipping at 1.0 and weight decay 0.01 are verl's actor defaults, which the authors'
        # code builds on; the paper gives only the learning rate.
        # OUR READING: the PRM scores tokens at the temperature old_logprobs were computed at (the sampling one), so
        # log π_φ − log π_θold is exactly 0 while φ = θ_old.
        self.model, self.lr = model, lr
        self.beta, self.threshold, self.max_grad_norm, self.temperature = beta, threshold, max_grad_norm, temperature
        self.logprobs_fn = logprobs_fn or _response_logprobs_at(temperature)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)

    @classmethod
    def from_policy(cls, policy, **settings) -> ImplicitPRM:
        """A PRM initialised from the policy (a deep copy of it) with the given settings (METHOD.md §4.2)."""
        return cls(copy.deepcopy(policy), **settings)

    def score_and_update(
        self,
        batch,
        old_logprobs: torch.Tensor,
        outcome_rewards: torch.Tensor,
        group_ids: torch.Tensor,
        step_ids: torch.Tensor,
        *,
        micro_batch_size: int = 8,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Step rewards from the current PRM (Eq. 1), then one DPO step of the PRM on this batch (Eq. 2).

        batch: the iteration's N trajectories (rollout.collate); old_logprobs: [N, R] under π_θold, computed with
        recompute_logprobs(policy, batch, micro_batch_size, self.temperature), the same micro-batch size and
        temperature, so that at the first iteration (φ = θ_old) every step reward is exactly 0 and not float noise
        that Eq. 4 would blow up to ±1;
        outcome_rewards, group_ids: [N]; step_ids: [N, R] from step_index.

        Returns (step_rewards [N, S], step_mask [N, S], diagnostics). The step rewards come from the PRM as it was
        before this call's update, as in the authors' code. Diagnostics (floats, all from before the update), to tell
        credit from drift:
            dpo_loss, pairs       Eq. 2's loss and its number of pairs
            pair_accuracy         share of pairs with z⁺ > z⁻ (NaN without pairs): below 0.5 is reversed credit
            outcome_correlation   within groups, between a trajectory's summed step rewards β z(τ) and its
                                  outcome reward (NaN where either is constant): below 0, the PRM prefers failures
            log_ratio_mean        mean of log π_φ − log π_θold over sampled tokens, −KL(π_θold ‖ π_φ) estimated on
                                  π_θold's samples: below 0 whenever the two differ, by learning or by drift; its
                                  size is how far apart they are. With pair_accuracy below 0.5 it is drift (the
                                  policy outran the PRM): reversed credit
            step_reward_mean      over real steps
            grad_norm, skipped    the PRM's gradient norm before clipping; 1.0 when no pair left it unmoved

        The DPO loss couples trajectories of different micro-batches, so the update runs in two passes. Pass 1, no
        gradients: the log-probs of every micro-batch give z, the step rewards and dL/dz (autograd on z as a leaf
        tensor). Pass 2, with gradients: each micro-batch that holds a paired row backpropagates Σ z_mb · dL/dz_mb,
        whose gradient summed over micro-batches is exactly dL/dφ (chain rule). The price is a second forward pass;
        in exchange only one micro-batch's activations are held at a time. Rows in no pair are skipped in pass 2.
        All tensors on the CPU, as collate and recompute_logprobs give them; the model may be on any device.
        """
        prm_logprobs = self._logprobs_without_gradients(batch, micro_batch_size)  # [N, R]
        rewards, step_mask = step_rewards(prm_logprobs, old_logprobs, step_ids, self.beta)  # [N, S], [N, S]
        log_ratio = trajectory_log_ratio(prm_logprobs, old_logprobs, batch.loss_mask).requires_grad_()  # [N] z
        pairs = dpo_pairs(outcome_rewards, group_ids, self.threshold)  # [P, 2]
        loss = dpo_loss(log_ratio, pairs, self.beta)
        loss.backward()  # log_ratio.grad = dL/dz, [N]
        wins = log_ratio[pairs[:, 0]] > log_ratio[pairs[:, 1]]  # [P]
        sampled = batch.loss_mask.bool()  # [N, R]
        diagnostics = {
            "dpo_loss": loss.item(),
            "pair_accuracy": wins.float().mean().item() if len(pairs) else math.nan,
            "pairs": float(len(pairs)),
            "outcome_correlation": within_group_correlation(self.beta * log_ratio.detach(), outcome_rewards,
                                                            group_ids),
            "log_ratio_mean": (prm_logprobs - old_logprobs)[sampled].mean().item() if sampled.any() else 0.0,
            "step_reward_mean": rewards[step_mask].mean().item() if step_mask.any() else 0.0,
            "grad_norm": 0.0,
            "skipped": float(len(pairs) == 0),
        }
        if len(pairs):
            self._backpropagate(batch, old_logprobs, log_ratio.grad, micro_batch_size)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            diagnostics["grad_norm"] = grad_norm.item()
        return rewards, step_mask, diagnostics

    @torch.no_grad()
    def _logprobs_without_gradients(self, batch, micro_batch_size: int) -> torch.Tensor:
        """Pass 1 of score_and_update: [N, R] log-probs under the PRM, a micro-batch at a time, gathered on the CPU
        (the same computation as rollout.recompute_logprobs, so φ = θ_old gives exactly old_logprobs)."""
        out = torch.zeros(batch.loss_mask.shape, dtype=torch.float32)  # [N, R]
        device = next(self.model.parameters()).device
        for start in range(0, len(batch), micro_batch_size):
            micro = batch[start:start + micro_batch_size].to(device)
            logprobs = self.logprobs_fn(self.model, micro)  # [n, r]
            out[start:start + len(micro), :logprobs.shape[1]] = logprobs.float().cpu()
        return out

    def _backpropagate(self, batch, old_logprobs: torch.Tensor, dloss_dz: torch.Tensor,
                       micro_batch_size: int) -> None:
        """Pass 2 of score_and_update: accumulate dL/dφ = Σ_i dL/dz_i · dz_i/dφ, one micro-batch at a time."""
        device = next(self.model.parameters()).device
        for start in range(0, len(batch), micro_batch_size):
            rows = slice(start, start + micro_batch_size)
            if not dloss_dz[rows].any():  # no row here is in a pair: its gradient is exactly 0
                continue
            micro = batch[rows].to(device)
            logprobs = self.logprobs_fn(self.model, micro)  # [n, r]
            width = logprobs.shape[1]  # r: the micro-batch drops columns none of its rows uses
            z = trajectory_log_ratio(logprobs, old_logprobs[rows, :width].to(device), micro.loss_mask)  # [n]
            (z * dloss_dz[rows].to(device)).sum().backward()

    def state_dict(self) -> dict:
        """The optimizer's state (the model itself is saved with save_pretrained by the caller, as `prm/`)."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned, into a PRM built on the saved model; the learning rate stays this PRM's."""
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr


def within_group_correlation(scores: torch.Tensor, outcomes: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Pearson correlation of scores [N] and outcomes [N] after subtracting each group's means: how well the scores
    order trajectories within their group, which is all Eq. 4 compares. NaN outcomes (unscored) are left out; NaN
    where either side is constant within every group.

    Below, group 1's scores are all higher than group 0's, which does not count: within each group the success scores
    1 above the failure, a perfect order.

    >>> within_group_correlation(torch.tensor([0.5, -0.5, 5.5, 4.5]), torch.tensor([1.0, 0.0, 1.0, 0.0]),
    ...                          torch.tensor([0, 0, 1, 1]))
    1.0
    """
    scored = ~outcomes.isnan()  # [N]
    scores, outcomes, group_ids = scores[scored].double(), outcomes[scored].double(), group_ids[scored]
    _, index = group_ids.unique(return_inverse=True)  # [n] group of each row, 0..g-1

    def centred(values):  # [n] minus the mean of the row's group
        sums = torch.zeros(int(index.max()) + 1 if len(index) else 0, dtype=values.dtype).index_add_(0, index, values)
        counts = torch.bincount(index, minlength=len(sums)).to(values.dtype)
        return values - (sums / counts)[index]

    x, y = centred(scores), centred(outcomes)
    norm = (x.square().sum() * y.square().sum()).sqrt()
    return (x * y).sum().div(norm).item() if norm > 1e-12 else math.nan


def _response_logprobs_at(temperature: float):
    """The default logprobs_fn: rollout.response_logprobs at `temperature` (it encodes the batch's shared prompt prefix
    once, and stops sharing it by itself under activation checkpointing in training mode)."""

    def logprobs_fn(model, micro_batch):
        from rollout import response_logprobs  # here, so that importing istar needs only torch and vspo

        return response_logprobs(model, micro_batch, temperature)

    return logprobs_fn
