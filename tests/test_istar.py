"""Tests for istar.py: each checks a property METHOD.md §4 states against an independent computation (a plain Python
loop, a closed form, finite differences, a one-graph reference update), never the module's own output copied back.

The model tests run the real tiny model (2 layers, SmolLM2's tokenizer) on hand-made trajectories: a shared prompt
prefix, then steps of sampled tokens separated by tool responses, exactly the layout rollout.py records.
"""

import copy
import doctest
import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import istar
import prs
import train
from data import Example
from istar import (
    ImplicitPRM,
    combine_advantages,
    dpo_loss,
    dpo_pairs,
    step_advantages,
    step_index,
    step_rewards,
    trajectory_log_ratio,
)
from settings import TrainArgs, algorithm_of
from rollout import Trajectory, collate, recompute_logprobs, response_logprobs
from vspo import ValueBuffer, broadcast_to_tokens

FAST = settings(deadline=None, max_examples=40)


def test_docstring_examples_are_true():
    result = doctest.testmod(istar)
    assert result.attempted >= 9 and result.failed == 0


# ---------------------------------------------------------------------------------------------------------------------
# Random step layouts: steps of sampled tokens, tool responses between them, padding after
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def layouts(draw, max_rows=5):
    """(steps_per_row, loss_mask [N, R]): 0 to 4 steps per row (0: a prompt too long to answer), 1 to 4 tokens each,
    a tool response of 1 to 3 tokens between two steps, and 0 to 2 columns of padding after the longest row."""
    steps_per_row, masks = [], []
    for _ in range(draw(st.integers(1, max_rows))):
        steps, mask = [], []
        for step in range(draw(st.integers(0, 4))):
            if step:
                mask += [0] * draw(st.integers(1, 3))
            length = draw(st.integers(1, 4))
            steps.append((len(mask), len(mask) + length))
            mask += [1] * length
        steps_per_row.append(steps)
        masks.append(mask)
    width = max(len(m) for m in masks) + draw(st.integers(0, 2))
    loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long)
    return steps_per_row, loss_mask


def random_logprobs(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return -torch.rand(shape, generator=generator, dtype=torch.float64) * 5  # [N, R] in (-5, 0]


SEEDS = st.integers(0, 2**31 - 1)


def test_step_index_marks_each_steps_tokens_and_rejects_spans_that_do_not_fit():
    step_ids = step_index([[(0, 2), (5, 7)], [], [(0, 1)]], width=8)
    assert step_ids.tolist() == [[0, 0, -1, -1, -1, 1, 1, -1], [-1] * 8, [0] + [-1] * 7]
    with pytest.raises(ValueError, match="width"):
        step_index([[(0, 3)]], width=2)


@FAST
@given(layouts(), SEEDS)
def test_step_rewards_are_zero_when_the_prm_is_the_rollout_policy(layout, seed):
    steps_per_row, loss_mask = layout
    logprobs = random_logprobs(loss_mask.shape, seed)
    rewards, step_mask = step_rewards(logprobs, logprobs.clone(), step_index(steps_per_row, loss_mask.shape[1]))
    assert (rewards == 0).all()
    assert step_mask.sum(dim=1).tolist() == [len(steps) for steps in steps_per_row]


@FAST
@given(layouts(), SEEDS, st.floats(0.01, 1.0))
def test_step_rewards_telescope_to_beta_times_the_trajectory_log_ratio(layout, seed, beta):
    steps_per_row, loss_mask = layout
    prm, old = random_logprobs(loss_mask.shape, seed), random_logprobs(loss_mask.shape, seed + 1)
    rewards, step_mask = step_rewards(prm, old, step_index(steps_per_row, loss_mask.shape[1]), beta)
    assert (rewards[~step_mask] == 0).all()
    assert torch.allclose(rewards.sum(dim=1), beta * trajectory_log_ratio(prm, old, loss_mask), atol=1e-12)
    for row, steps in enumerate(steps_per_row):  # and each step reward is its own tokens' sum, by a plain loop
        for step, (start, end) in enumerate(steps):
            expected = beta * sum(prm[row, j].item() - old[row, j].item() for j in range(start, end))
            assert rewards[row, step].item() == pytest.approx(expected, abs=1e-12)


@FAST
@given(layouts(), SEEDS)
def test_tool_and_padding_tokens_never_contribute_even_as_nan(layout, seed):
    steps_per_row, loss_mask = layout
    step_ids = step_index(steps_per_row, loss_mask.shape[1])
    prm, old = random_logprobs(loss_mask.shape, seed), random_logprobs(loss_mask.shape, seed + 1)
    outside = step_ids < 0  # [N, R] tool responses and padding
    garbage_prm = prm.masked_fill(outside, float("nan")).requires_grad_()
    garbage_old = old.masked_fill(outside, float("inf"))
    rewards, step_mask = step_rewards(garbage_prm, garbage_old, step_ids)
    clean_rewards, clean_mask = step_rewards(prm, old, step_ids)
    assert torch.equal(rewards.detach(), clean_rewards) and torch.equal(step_mask, clean_mask)
    log_ratio = trajectory_log_ratio(garbage_prm, garbage_old, loss_mask)
    assert torch.equal(log_ratio.detach(), trajectory_log_ratio(prm, old, loss_mask))
    (rewards.sum() + log_ratio.sum()).backward()
    assert torch.isfinite(garbage_prm.grad).all() and (garbage_prm.grad[outside] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# Step advantages (Eq. 4) and the combined advantage (Eq. 5)
# ---------------------------------------------------------------------------------------------------------------------

GRID_REWARD = st.integers(-20, 20).map(lambda k: k / 20)  # spreads are 0 or >= 0.05: never near the 1e-6 dead line


@st.composite
def grouped_step_rewards(draw):
    """(rewards per row, group ids): groups of 1 to 5 trajectories with distinct ids in any order, 0 to 4 steps
    each (ragged), rows of all groups shuffled together."""
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    ids = draw(st.lists(st.integers(-1000, 1000), min_size=len(sizes), max_size=len(sizes), unique=True))
    rows, group_ids = [], []
    for group_id, size in zip(ids, sizes):
        for _ in range(size):
            rows.append(draw(st.lists(GRID_REWARD, min_size=0, max_size=4)))
            group_ids.append(group_id)
    order = draw(st.permutations(range(len(rows))))
    return [rows[i] for i in order], [group_ids[i] for i in order]


def as_step_tensors(rows):
    width = max(1, max(len(r) for r in rows))
    rewards = torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64)
    step_mask = torch.tensor([[k < len(r) for k in range(width)] for r in rows])
    return rewards, step_mask


def loop_step_advantages(rows, group_ids, eps=1e-6):
    """Eq. 4 as a plain loop: each group pools the rewards of all steps of all its trajectories; sample std; a pool
    of one step or of equal rewards gives 0."""
    advantages = []
    for row, group_id in zip(rows, group_ids):
        pool = [r for other, g in zip(rows, group_ids) if g == group_id for r in other]
        std = statistics.stdev(pool) if len(pool) > 1 else 0.0
        advantages.append([0.0 if std < 1e-6 else (r - statistics.fmean(pool)) / (std + eps) for r in row])
    return advantages


@FAST
@given(grouped_step_rewards())
def test_step_advantages_equal_a_python_loop_over_ragged_groups(groups):
    rows, group_ids = groups
    rewards, step_mask = as_step_tensors(rows)
    advantages = step_advantages(rewards, step_mask, torch.tensor(group_ids))
    assert (advantages[~step_mask] == 0).all()
    for row, expected in enumerate(loop_step_advantages(rows, group_ids)):
        assert advantages[row, :len(expected)].tolist() == pytest.approx(expected, abs=1e-9)


@FAST
@given(grouped_step_rewards())
def test_step_advantages_have_zero_mean_and_unit_sample_std_over_each_groups_steps(groups):
    rows, group_ids = groups
    rewards, step_mask = as_step_tensors(rows)
    group_ids = torch.tensor(group_ids)
    advantages = step_advantages(rewards, step_mask, group_ids)
    for group_id in group_ids.unique():
        in_group = step_mask & (group_ids == group_id).unsqueeze(1)  # [N, S] the group's real steps
        values = advantages[in_group]
        if rewards[in_group].unique().numel() <= 1:  # no steps, one step, or all equal: no signal
            assert (values == 0).all()
        else:
            assert values.mean().item() == pytest.approx(0.0, abs=1e-9)
            assert statistics.stdev(values.tolist()) == pytest.approx(1.0, abs=1e-4)  # sample std, pinned


@FAST
@given(layouts(), SEEDS, st.floats(-2.0, 2.0))
def test_combined_advantage_is_episode_plus_alpha_step_on_sampled_tokens_and_zero_elsewhere(layout, seed, alpha):
    steps_per_row, loss_mask = layout
    step_ids = step_index(steps_per_row, loss_mask.shape[1])
    generator = torch.Generator().manual_seed(seed)
    num_steps = max(1, max(len(steps) for steps in steps_per_row))
    episode = torch.randn(len(steps_per_row), generator=generator)  # [N]
    steps = torch.randn(len(steps_per_row), num_steps, generator=generator)  # [N, S]
    advantages = combine_advantages(episode, steps, step_ids, loss_mask, alpha)
    assert torch.equal(combine_advantages(episode, steps, step_ids, loss_mask, 0.0),
                       broadcast_to_tokens(episode, loss_mask))  # α = 0: A^E broadcast unchanged, exactly
    assert (advantages[loss_mask == 0] == 0).all()
    for row, spans in enumerate(steps_per_row):
        for step, (start, end) in enumerate(spans):
            expected = episode[row].item() + alpha * steps[row, step].item()
            assert advantages[row, start:end].tolist() == pytest.approx([expected] * (end - start), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# DPO pairs and loss (Eq. 2)
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def outcome_groups(draw):
    """(rewards, group ids, threshold): groups of 1 to 6 rollouts, distinct ids, rows shuffled together."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    ids = draw(st.lists(st.integers(-50, 50), min_size=len(sizes), max_size=len(sizes), unique=True))
    rewards, group_ids = [], []
    for group_id, size in zip(ids, sizes):
        rewards += draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=size, max_size=size))
        group_ids += [group_id] * size
    order = draw(st.permutations(range(len(rewards))))
    return [rewards[i] for i in order], [group_ids[i] for i in order], draw(st.sampled_from([0.0, 0.5, 0.9]))


@FAST
@given(outcome_groups())
def test_dpo_pairs_are_every_success_failure_pair_of_a_group(groups):
    rewards, group_ids, threshold = groups
    pairs = dpo_pairs(torch.tensor(rewards), torch.tensor(group_ids), threshold)
    expected = [(i, j) for i in range(len(rewards)) for j in range(len(rewards))
                if group_ids[i] == group_ids[j] and rewards[i] > threshold >= rewards[j]]
    assert pairs.shape == (len(expected), 2) and pairs.dtype == torch.long
    assert sorted(map(tuple, pairs.tolist())) == sorted(expected)
    one_sided = {g for g in group_ids if len({r > threshold for r, h in zip(rewards, group_ids) if h == g}) == 1}
    assert not any(group_ids[i] in one_sided for i in pairs.flatten().tolist())  # all-success, all-failure: none


def test_an_unscored_nan_reward_is_in_no_pair():
    pairs = dpo_pairs(torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0, 0, 0]), threshold=0.5)
    assert pairs.tolist() == [[0, 2]]


def test_dpo_loss_equals_the_hand_computed_value():
    beta = 0.05
    log_ratio = torch.tensor([2.0, -1.0, 0.5, 0.5])
    loss = dpo_loss(log_ratio, torch.tensor([[0, 1], [2, 3], [0, 3]]), beta)
    by_hand = (math.log(1 + math.exp(-beta * 3.0)) + math.log(2.0) + math.log(1 + math.exp(-beta * 1.5))) / 3
    assert loss.item() == pytest.approx(by_hand, abs=1e-7)


def test_dpo_loss_gradient_matches_finite_differences_and_the_closed_form():
    log_ratio = torch.tensor([3.0, -2.0, 0.5, 1.0, -7.0], dtype=torch.float64, requires_grad=True)
    pairs = torch.tensor([[0, 1], [0, 4], [3, 2], [3, 4]])
    beta = 0.3
    assert torch.autograd.gradcheck(lambda z: dpo_loss(z, pairs, beta), (log_ratio,))
    dpo_loss(log_ratio, pairs, beta).backward()
    closed_form = torch.zeros(5, dtype=torch.float64)  # dL/dz: −β σ(−m) / P for τ⁺, +β σ(−m) / P for τ⁻
    for winner, loser in pairs.tolist():
        weight = beta * torch.sigmoid(-beta * (log_ratio[winner] - log_ratio[loser])).item() / len(pairs)
        closed_form[winner] -= weight
        closed_form[loser] += weight
    assert torch.allclose(log_ratio.grad, closed_form, atol=1e-12)


def test_dpo_loss_is_stable_for_huge_margins_and_zero_without_pairs():
    log_ratio = torch.tensor([1e5, -1e5], requires_grad=True)
    assert dpo_loss(log_ratio, torch.tensor([[0, 1]]), 0.05).item() == 0.0
    assert dpo_loss(log_ratio, torch.tensor([[1, 0]]), 0.05).item() == pytest.approx(0.05 * 2e5)  # not inf
    empty = dpo_loss(log_ratio, torch.zeros(0, 2, dtype=torch.long))
    empty.backward()
    assert empty.item() == 0.0 and (log_ratio.grad == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# The implicit PRM on the real tiny model
# ---------------------------------------------------------------------------------------------------------------------

EXAMPLE = Example("q", "Question?", ("answer",))
PREFIX = list(range(1000, 1012))  # the prompt prefix every row shares (system message and worked example)


def toy_trajectory(generator, group_id, step_lengths):
    """A trajectory with its own 3 prompt tokens, then steps of random sampled tokens with a 3-token tool response
    between two steps."""
    def tokens(n):
        return torch.randint(2000, 40000, (n,), generator=generator).tolist()

    response, loss_mask, steps = [], [], []
    for step, length in enumerate(step_lengths):
        if step:
            response += tokens(3)
            loss_mask += [0] * 3
        steps.append((len(response), len(response) + length))
        response += tokens(length)
        loss_mask += [1] * length
    return Trajectory(EXAMPLE, group_id, PREFIX + tokens(3), response, loss_mask, [0.0] * len(response), steps)


@pytest.fixture(scope="module")
def toy(tiny):
    """(trajectories, batch, outcome rewards, group ids, step ids, old log-probs): group 4 has 2 successes and 2
    failures, group 9 one success and two failures, group 1 a failure only (no pair); 1 to 3 steps per trajectory.
    The old log-probs are the tiny policy's, by recompute_logprobs with its default micro-batch size (8)."""
    generator = torch.Generator().manual_seed(0)
    layout = [(4, [3, 2], 1.0), (4, [3], 0.0), (4, [2, 2, 2], 1.0), (4, [4, 2], 0.0),
              (9, [2, 3], 0.0), (9, [4], 1.0), (9, [2, 2, 2], 0.0), (1, [3, 2], 0.0)]
    trajectories = [toy_trajectory(generator, group, lengths) for group, lengths, _ in layout]
    batch = collate(trajectories, tiny[1].pad_token_id)
    rewards = torch.tensor([reward for _, _, reward in layout])
    group_ids = torch.tensor([t.group_id for t in trajectories])
    step_ids = step_index([t.steps for t in trajectories], batch.response_ids.shape[1])
    return trajectories, batch, rewards, group_ids, step_ids, recompute_logprobs(tiny[0], batch)


def test_step_index_of_a_collated_batch_covers_exactly_the_sampled_tokens(toy):
    _, batch, _, _, step_ids, _ = toy
    assert torch.equal(step_ids >= 0, batch.loss_mask.bool())


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_dpo_steps_lower_the_loss_and_the_first_step_rewards_are_exactly_zero(tiny, toy):
    policy = tiny[0]
    trajectories, batch, rewards, group_ids, step_ids, old_logprobs = toy
    policy_weights = weights(policy)
    prm = ImplicitPRM.from_policy(policy, lr=1e-3)
    losses = []
    for iteration in range(3):  # the same micro-batch size as old_logprobs': bit-identical log-probs while φ = θ_old
        rewards_per_step, step_mask, diagnostics = prm.score_and_update(
            batch, old_logprobs, rewards, group_ids, step_ids, micro_batch_size=8)
        if iteration == 0:  # φ = θ_old: every step reward is exactly 0 (not float noise) and the loss is log 2
            assert (rewards_per_step == 0).all() and step_mask.sum().item() == sum(len(t.steps) for t in trajectories)
            assert diagnostics["dpo_loss"] == pytest.approx(math.log(2), abs=1e-7)
        assert diagnostics["pairs"] == 4 + 2 and diagnostics["skipped"] == 0.0 and diagnostics["grad_norm"] > 0
        losses.append(diagnostics["dpo_loss"])
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert diagnostics["pair_accuracy"] == 1.0
    assert torch.equal(weights(policy), policy_weights)  # the PRM is a copy: the shared fixture's policy is untouched


def test_returned_step_rewards_come_from_the_prm_before_its_update(tiny, toy):
    policy = tiny[0]
    _, batch, rewards, group_ids, step_ids, old_logprobs = toy
    prm = ImplicitPRM.from_policy(policy, lr=1e-3)
    prm.score_and_update(batch, old_logprobs, rewards, group_ids, step_ids, micro_batch_size=3)  # move φ off θ_old
    before = copy.deepcopy(prm.model)
    with torch.no_grad():
        prm_logprobs = response_logprobs(before, batch)  # one forward of the whole batch, the pre-update weights
    expected, expected_mask = step_rewards(prm_logprobs, old_logprobs, step_ids, prm.beta)
    returned, step_mask, _ = prm.score_and_update(batch, old_logprobs, rewards, group_ids, step_ids,
                                                  micro_batch_size=3)
    assert torch.equal(step_mask, expected_mask) and expected.abs().max() > 1e-3  # a real, non-zero signal
    assert torch.allclose(returned, expected, atol=1e-6)
    assert not torch.equal(weights(prm.model), weights(before))  # and then the PRM took its step


def one_graph_gradient(model, batch, old_logprobs, rewards, group_ids):
    """dL/dφ as score_and_update must take it: the DPO loss over the whole batch in one autograd graph (no
    micro-batches, no shared prefix). Returns all parameters' gradients, flattened."""
    z = trajectory_log_ratio(response_logprobs(model, batch, share_prefix=False), old_logprobs, batch.loss_mask)
    dpo_loss(z, dpo_pairs(rewards, group_ids, 0.5), 0.05).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_micro_batched_update_follows_the_gradient_of_one_graph_over_the_whole_batch(tiny, toy):
    _, batch, rewards, group_ids, step_ids, old_logprobs = toy
    start = copy.deepcopy(tiny[0])  # a PRM that differs from π_θold, so z != 0 and dL/dz differs per pair
    with torch.no_grad():
        for parameter in start.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    gradient = one_graph_gradient(copy.deepcopy(start), batch, old_logprobs, rewards, group_ids)
    # micro-batches of 1 row sharing the prompt prefix; one micro-batch of all rows with activation checkpointing,
    # which needs train mode and no shared prefix (the settings the module docstring gives for one GPU)
    for micro_batch_size, checkpointing in ((1, False), (len(batch), True)):
        prm = ImplicitPRM.from_policy(start, max_grad_norm=math.inf)
        if checkpointing:
            prm.model.activation_checkpointing_enable()
            prm.model.train()
        # SGD with lr 1 makes the step the gradient itself, so size and direction are both compared (AdamW's first
        # step is nearly lr * sign(gradient), blind to a wrong scale).
        prm.optimizer = torch.optim.SGD(prm.model.parameters(), lr=1.0)
        _, _, diagnostics = prm.score_and_update(batch, old_logprobs, rewards, group_ids, step_ids,
                                                 micro_batch_size=micro_batch_size)
        case = (micro_batch_size, checkpointing)
        assert torch.allclose(weights(start) - weights(prm.model), gradient, rtol=1e-4, atol=3e-7), case
        assert diagnostics["grad_norm"] == pytest.approx(gradient.norm().item(), rel=1e-5), case


def test_a_batch_without_pairs_leaves_the_prm_untouched(tiny, toy):
    _, batch, _, group_ids, step_ids, old_logprobs = toy
    prm = ImplicitPRM.from_policy(tiny[0], lr=1e-3)
    before = weights(prm.model)
    rewards, step_mask, diagnostics = prm.score_and_update(batch, old_logprobs, torch.zeros(len(batch)), group_ids,
                                                           step_ids)
    assert diagnostics["skipped"] == 1.0 and diagnostics["pairs"] == 0 and diagnostics["grad_norm"] == 0.0
    assert math.isnan(diagnostics["pair_accuracy"]) and diagnostics["dpo_loss"] == 0.0
    assert torch.equal(weights(prm.model), before) and rewards.shape == step_mask.shape


def test_state_dict_round_trip_through_a_saved_prm_folder(tiny, toy, tmp_path):
    _, batch, rewards, group_ids, step_ids, old_logprobs = toy
    prm = ImplicitPRM.from_policy(tiny[0], lr=1e-3)
    prm.score_and_update(batch, old_logprobs, rewards, group_ids, step_ids)
    prm.model.save_pretrained(tmp_path / "prm")  # what train.py does at a checkpoint
    torch.save(prm.state_dict(), tmp_path / "prm_optimizer.pt")

    restored = ImplicitPRM(AutoModelForCausalLM.from_pretrained(tmp_path / "prm"), lr=1e-3)
    restored.load_state_dict(torch.load(tmp_path / "prm_optimizer.pt"))
    for each in (prm, restored):  # the next step: same Adam moments and step count give the same weights
        each.score_and_update(batch, old_logprobs, rewards, group_ids, step_ids)
    assert torch.equal(weights(restored.model), weights(prm.model))
    assert restored.optimizer.state_dict()["state"][0]["step"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# A controlled task: the PRM against a policy that learns between its updates, as in train.py
# ---------------------------------------------------------------------------------------------------------------------
SUCCESS_STEP, FAILURE_STEP = [4500, 4501, 4502, 4503], [4600, 4601, 4602, 4603]


def decided_groups(generator, count=2, size=5):
    """train.Group's of hand-made trajectories whose second step decides the outcome: every trajectory opens with a
    step of 5 random tokens, then a 4-token tool response, then SUCCESS_STEP (reward 1) or FAILURE_STEP (reward 0);
    1 to 4 of a group's 5 succeed."""
    groups = []
    for group_id in range(count):
        successes = int(torch.randint(1, size, (1,), generator=generator))
        trajectories = []
        for i in range(size):
            own, first, tool = (torch.randint(2000, 40000, (n,), generator=generator).tolist() for n in (3, 5, 4))
            response = first + tool + (SUCCESS_STEP if i < successes else FAILURE_STEP)
            trajectories.append(Trajectory(EXAMPLE, group_id, PREFIX + own, response, [1] * 5 + [0] * 4 + [1] * 4,
                                           [0.0] * len(response), [(0, 5), (9, 13)]))
        group = train.Group(EXAMPLE, trajectories)
        group.results = [prs.RewardResult(float(i < successes), {}, None) for i in range(size)]
        groups.append(group)
    return groups


def test_the_prm_keeps_up_with_a_moving_policy_and_credits_the_step_that_decided(tiny):
    # The default settings, and train.py's own steps: a batch (π_θold recomputed), the step rewards and one PRM step,
    # the advantages, the policy's update. The policy learns the deciding step from the episode advantage too; a PRM
    # slower than it (the paper's absolute 1e-6 beside a policy at 2e-5) measures that drift and credits the failure
    # step (held-out pair accuracy 0.02, success step A^S -1.2, failure step +0.6).
    args = TrainArgs(credit="istar")
    policy = copy.deepcopy(tiny[0])
    prm = ImplicitPRM.from_policy(policy, **train.prm_settings(args))
    run = train.Run(args, algorithm_of(args), policy, tiny[1], None, prm, train.policy_optimizer(args, policy),
                    {}, None, {}, [], None, None, None)
    state = train.State(None, ValueBuffer(), np.random.default_rng(0), torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = train.make_batch(run, decided_groups(generator))
        credit, _ = train.implicit_step_rewards(run, batch)
        train.update(run, state, batch, train.advantages(run, batch, credit))
    wins = pairs = 0
    success, failure = [], []
    for _ in range(4):  # held-out batches, scored by a copy of the PRM so that they teach it nothing
        batch = train.make_batch(run, decided_groups(generator))
        credit, diagnostics = train.implicit_step_rewards(copy.deepcopy(run), batch)
        wins += diagnostics["istar_pair_accuracy"] * diagnostics["istar_pairs"]
        pairs += diagnostics["istar_pairs"]
        advantages = step_advantages(credit.step_rewards, credit.step_mask, batch.group_ids)  # [N, 2]
        for row, reward in enumerate(batch.rewards.tolist()):
            (success if reward == 1.0 else failure).append(advantages[row, 1].item())
    figures = (wins / pairs, statistics.fmean(success), statistics.fmean(failure))
    assert figures[0] >= 0.9 and figures[1] > 0.5 and figures[2] < -0.5, figures
