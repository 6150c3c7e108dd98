"""Tests for vspo.py: each asserts a property METHOD.md §3 states or a bug PEERS.md lists, against an independent
computation (a plain Python loop, a closed form, autograd's gradcheck), never the module's own output copied back."""

import doctest
import json
import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vspo
from vspo import (
    ValueBuffer,
    broadcast_to_tokens,
    choose_replacements,
    cispo_loss,
    dead_groups,
    group_advantages,
    group_stats,
    kl_k3,
    loss_diagnostics,
    masked_reduce,
    max_group_advantage,
    policy_loss,
    ppo_clip_loss,
    task_value,
    value_smoothing_clip,
)

FAST = settings(deadline=None, max_examples=40)


def test_docstring_examples_are_true():
    result = doctest.testmod(vspo)
    assert result.attempted >= 12 and result.failed == 0


# ---------------------------------------------------------------------------------------------------------------------
# GRPO advantages
# ---------------------------------------------------------------------------------------------------------------------

GRID_REWARD = st.integers(0, 20).map(lambda k: k / 20)  # spreads are 0 or >= 0.05: never near the 1e-6 dead line


@st.composite
def ragged_groups(draw, reward=GRID_REWARD):
    """(rewards, group_ids): groups of 1 to 6 samples, distinct ids in any order, samples shuffled together."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=6))
    ids = draw(st.lists(st.integers(-1000, 1000), min_size=len(sizes), max_size=len(sizes), unique=True))
    rewards, group_ids = [], []
    for group_id, size in zip(ids, sizes):
        rewards += draw(st.lists(reward, min_size=size, max_size=size))
        group_ids += [group_id] * size
    order = draw(st.permutations(range(len(rewards))))
    return [rewards[i] for i in order], [group_ids[i] for i in order]


def loop_advantages(rewards, group_ids, eps=1e-6):
    """METHOD.md §3 written as a plain loop: sample std, 0 for dead groups and groups of one."""
    advantages = []
    for reward, group_id in zip(rewards, group_ids):
        members = [r for r, g in zip(rewards, group_ids) if g == group_id]
        std = statistics.stdev(members) if len(members) > 1 else 0.0
        advantages.append(0.0 if std < 1e-6 else (reward - statistics.fmean(members)) / (std + eps))
    return advantages


def as_tensors(rewards, group_ids):
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(group_ids)


def test_pinned_convention_is_sample_std_with_eps_1e6():
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]), torch.zeros(5, dtype=torch.long))
    sample_std = math.sqrt(0.2)  # population std would be 0.4, giving A_0 = 2.0
    assert advantages[0].item() == pytest.approx(0.8 / (sample_std + 1e-6), abs=1e-5)
    assert advantages[0].item() == pytest.approx(1.78885, abs=1e-5)
    assert advantages[1:].tolist() == pytest.approx([-0.2 / (sample_std + 1e-6)] * 4, abs=1e-5)


@FAST
@given(ragged_groups())
def test_vectorized_advantages_equal_a_python_loop(groups):
    rewards, group_ids = groups
    advantages = group_advantages(*as_tensors(rewards, group_ids))
    assert advantages.tolist() == pytest.approx(loop_advantages(rewards, group_ids), abs=1e-9)


@FAST
@given(ragged_groups())
def test_advantages_have_zero_mean_in_live_groups_and_are_zero_in_dead_ones(groups):
    rewards, group_ids = as_tensors(*groups)
    advantages = group_advantages(rewards, group_ids)
    for group_id in group_ids.unique():
        members = group_ids == group_id
        if rewards[members].unique().numel() == 1:
            assert (advantages[members] == 0).all()
        else:
            assert advantages[members].mean().item() == pytest.approx(0.0, abs=1e-9)


@FAST
@given(
    ragged_groups(reward=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])),
    st.floats(0.5, 10.0),
    st.floats(-10.0, 10.0),
)
def test_advantages_are_invariant_to_shift_and_positive_scale(groups, scale, shift):
    rewards, group_ids = as_tensors(*groups)
    moved = group_advantages(scale * rewards + shift, group_ids)
    assert torch.allclose(moved, group_advantages(rewards, group_ids), atol=1e-4)


def test_a_group_of_one_and_a_dead_group_get_exactly_zero():
    # In float32 the mean of seven 0.9s is not exactly 0.9: without the dead-group rule r - mean is -6e-8, std 6e-8,
    # and A = (r - mean) / (std + 1e-6) comes out near -0.056 instead of 0.
    rewards = torch.tensor([0.3] + [0.9] * 7 + [1.0, 0.0])
    advantages = group_advantages(rewards, torch.tensor([5] + [2] * 7 + [9, 9]))
    assert advantages[:8].tolist() == [0.0] * 8
    assert advantages[8] > 0 > advantages[9]


@FAST
@given(ragged_groups())
def test_group_stats_and_dead_groups_are_aligned_per_group(groups):
    rewards, group_ids = groups
    stats = group_stats(*as_tensors(rewards, group_ids))
    ids, dead = dead_groups(*as_tensors(rewards, group_ids))
    assert ids.tolist() == sorted(set(group_ids)) == stats.ids.tolist()
    for row, group_id in enumerate(ids.tolist()):
        members = [r for r, g in zip(rewards, group_ids) if g == group_id]
        std = statistics.stdev(members) if len(members) > 1 else 0.0
        assert stats.size[row].item() == len(members)
        assert stats.mean[row].item() == pytest.approx(statistics.fmean(members), abs=1e-12)
        assert stats.std[row].item() == pytest.approx(std, abs=1e-12)
        assert dead[row].item() == (len(set(members)) == 1)
    assert stats.ids[stats.index].tolist() == group_ids


def test_broadcast_puts_each_advantage_on_its_sampled_tokens_only():
    loss_mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])  # prompt, tool and padding are 0
    tokens = broadcast_to_tokens(torch.tensor([2.0, -1.0, 5.0]), loss_mask)
    expected = torch.tensor([2.0, -1.0, 5.0]).unsqueeze(1) * loss_mask
    assert torch.equal(tokens, expected)
    assert (tokens[loss_mask == 0] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# Task value
# ---------------------------------------------------------------------------------------------------------------------


@FAST
@given(st.floats(-5.0, 1.0), st.integers(1, 8))
def test_task_value_of_a_dead_group_is_zero(reward, size):
    assert task_value([reward] * size) == 0.0


@FAST
@given(st.floats(-5.0, 5.0), st.lists(st.floats(0.0, 10.0), min_size=1, max_size=8))
def test_task_value_is_never_negative_for_rewards_up_to_r_max(r_max, gaps):
    assert task_value([r_max - gap for gap in gaps], r_max=r_max) >= 0.0


@pytest.mark.parametrize("size", range(2, 13))
def test_binary_task_value_peaks_at_a_quarter_and_favours_the_harder_prompt(size):
    values = [task_value([1.0] * k + [0.0] * (size - k)) for k in range(size + 1)]
    for k, value in enumerate(values):  # closed form for 0/1 rewards: (1 - p) * sqrt(p (1 - p))
        assert value == pytest.approx((1 - k / size) * math.sqrt(k / size * (1 - k / size)), abs=1e-12)
    assert values[0] == values[-1] == 0.0
    assert int(np.argmax(values)) in {math.floor(size / 4), math.ceil(size / 4)}
    for k in range(1, (size + 1) // 2):  # same uncertainty (std), more difficulty (fewer successes): more value
        assert values[k] > values[size - k]


def test_task_value_rejects_rewards_above_r_max():
    with pytest.raises(ValueError, match="r_max"):
        task_value([0.0, 1.5], r_max=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Value buffer and replacement policy
# ---------------------------------------------------------------------------------------------------------------------


def test_value_buffer_first_observation_sets_and_later_ones_are_smoothed():
    buffer = ValueBuffer(ema_alpha=0.25)
    buffer.update("q", 0.4)
    assert buffer.values["q"] == 0.4
    buffer.update("q", 0.0)
    assert buffer.values["q"] == pytest.approx(0.75 * 0.4)
    assert buffer.replay_count("q") == 0
    buffer.mark_replayed("q")
    buffer.mark_replayed("q")
    assert buffer.replay_count("q") == 2
    with pytest.raises(ValueError, match="ema_alpha"):
        ValueBuffer(ema_alpha=0.0)


KEYS = st.text("abcdefgh", min_size=1, max_size=3)
BUFFER_VALUES = st.dictionaries(KEYS, st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), max_size=12)


@FAST
@given(BUFFER_VALUES, st.dictionaries(KEYS, st.integers(1, 50), max_size=5), st.floats(0.01, 1.0))
def test_buffer_and_rng_round_trip_through_json_for_a_checkpoint(values, replays, ema_alpha):
    buffer = ValueBuffer(ema_alpha=ema_alpha, values=values, replays=replays)
    rng = np.random.default_rng(7)
    rng.random(3)
    saved = json.dumps({"buffer": buffer.state_dict(), "rng": rng.bit_generator.state})
    checkpoint = json.loads(saved)
    restored = ValueBuffer.from_state_dict(checkpoint["buffer"])
    restored_rng = np.random.default_rng()
    restored_rng.bit_generator.state = checkpoint["rng"]
    assert restored == buffer and restored.state_dict() == buffer.state_dict()
    for mode in ("value", "random"):
        picks = choose_replacements(buffer, 4, set(), rng, mode)
        assert choose_replacements(restored, 4, set(), restored_rng, mode) == picks


@FAST
@given(BUFFER_VALUES, st.data(), st.integers(0, 15), st.sampled_from(["value", "random"]), st.integers(0, 2**32 - 1))
def test_replacements_are_distinct_buffer_keys_outside_exclude_then_fresh_slots(values, data, num_needed, mode, seed):
    exclude = data.draw(st.sets(st.sampled_from(sorted(values)) if values else st.nothing()) | st.sets(KEYS))
    picks = choose_replacements(ValueBuffer(values=values), num_needed, exclude, np.random.default_rng(seed), mode)
    keys = [key for key in picks if key is not None]
    candidates = [k for k, v in values.items() if k not in exclude and (mode == "random" or v > 0)]
    assert len(picks) == num_needed
    assert picks[: len(keys)] == keys  # fresh-prompt slots (None) only after the buffer's candidates ran out
    assert len(set(keys)) == len(keys) == min(num_needed, len(candidates))
    assert set(keys) <= set(candidates) and not set(keys) & set(exclude)


def chi_square(counts, expected):
    return sum((counts[key] - expected[key]) ** 2 / expected[key] for key in expected)


CHI2_DF3_P001 = 16.27  # the 0.999 quantile of chi-square with 3 degrees of freedom


def test_value_mode_picks_in_proportion_to_value():
    values = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "dead": 0.0, "in_batch": 5.0}
    buffer, rng, draws = ValueBuffer(values=values), np.random.default_rng(0), 4000
    counts = dict.fromkeys(values, 0)
    for _ in range(draws):
        (pick,) = choose_replacements(buffer, 1, {"in_batch"}, rng, "value")
        counts[pick] += 1
    assert counts["dead"] == counts["in_batch"] == 0
    assert chi_square(counts, {key: draws * values[key] for key in "abcd"}) < CHI2_DF3_P001


def test_random_mode_is_uniform_over_the_buffer_including_zero_values():
    values = {"a": 0.0, "b": 0.9, "c": 0.01, "d": 0.0, "in_batch": 1.0}
    buffer, rng, draws = ValueBuffer(values=values), np.random.default_rng(1), 4000
    counts = dict.fromkeys(values, 0)
    for _ in range(draws):
        (pick,) = choose_replacements(buffer, 1, ["in_batch"], rng, "random")
        counts[pick] += 1
    assert counts["in_batch"] == 0
    assert chi_square(counts, dict.fromkeys("abcd", draws / 4)) < CHI2_DF3_P001


def test_modes_filter_none_and_empty_buffer():
    buffer, rng = ValueBuffer(values={"a": 0.3, "b": 0.1}), np.random.default_rng(0)
    assert choose_replacements(buffer, 3, set(), rng, "filter") == [None, None, None]
    assert choose_replacements(buffer, 3, set(), rng, "none") == []
    assert choose_replacements(ValueBuffer(), 2, set(), rng, "value") == [None, None]
    assert choose_replacements(ValueBuffer(values={"a": 0.0}), 1, set(), rng, "value") == [None]


def test_same_seed_same_picks_whatever_the_insertion_order():
    values = {f"q{i}": (i % 7) / 7 for i in range(40)}
    shuffled = dict(reversed(list(values.items())))
    first = choose_replacements(ValueBuffer(values=values), 10, {"q3"}, np.random.default_rng(42), "value")
    again = choose_replacements(ValueBuffer(values=shuffled), 10, {"q3"}, np.random.default_rng(42), "value")
    other = choose_replacements(ValueBuffer(values=values), 10, {"q3"}, np.random.default_rng(43), "value")
    assert first == again != other


def test_unknown_mode_is_named_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'dapo'.*value, random, filter, none"):
        choose_replacements(ValueBuffer(), 1, set(), np.random.default_rng(0), "dapo")


# ---------------------------------------------------------------------------------------------------------------------
# Value-smoothing clipping
# ---------------------------------------------------------------------------------------------------------------------


@FAST
@given(st.lists(st.tuples(st.floats(-10.0, 10.0), st.integers(0, 50)), min_size=1, max_size=20), st.floats(0.1, 5.0))
def test_value_smoothing_clip_properties(pairs, c_max):
    advantages = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    counts = torch.tensor([k for _, k in pairs])
    clipped = value_smoothing_clip(advantages, counts, c_max)
    once_more = value_smoothing_clip(advantages, counts + 1, c_max)
    fresh = value_smoothing_clip(advantages, torch.zeros_like(counts), c_max)
    small = advantages.abs() <= c_max
    assert torch.equal(fresh[small], advantages[small])  # k = 0 leaves |A| <= c_max unchanged
    assert (clipped.abs() <= advantages.abs()).all()  # |A| never grows
    assert torch.equal(torch.sign(clipped), torch.sign(advantages))  # sign kept
    assert (once_more.abs() <= clipped.abs()).all()  # monotone non-increasing in k
    assert (clipped.abs() <= c_max).all()  # bounded by c_max
    assert (once_more.abs() < c_max).all()  # and k >= 1 really shrinks the bound


@pytest.mark.parametrize("k", [0, 1, 3, 8, 99])
def test_clip_bound_follows_c_max_over_sqrt_one_plus_k(k):
    # OUR READING in vspo.py: c_k = c_max / sqrt(1 + k); an advantage far above every bound lands on it.
    clipped = value_smoothing_clip(torch.tensor([50.0, -50.0], dtype=torch.float64), torch.tensor([k, k]), 1.5)
    assert clipped.tolist() == pytest.approx([1.5 / math.sqrt(1 + k), -1.5 / math.sqrt(1 + k)], abs=1e-12)


@FAST
@given(st.lists(st.floats(0.0, 1.0, width=32), min_size=5, max_size=5))
def test_c_max_of_the_group_size_never_clips_a_fresh_grpo_group_of_five(rewards):
    advantages = group_advantages(torch.tensor(rewards), torch.zeros(5, dtype=torch.long))
    assert max_group_advantage(5) == pytest.approx(4 / math.sqrt(5))
    assert torch.equal(value_smoothing_clip(advantages, torch.zeros(5, dtype=torch.long), max_group_advantage(5)),
                       advantages)


def test_c_max_has_no_default_that_could_clip_another_group_size():
    with pytest.raises(TypeError):
        value_smoothing_clip(torch.ones(2), torch.zeros(2))


@FAST
@given(st.integers(2, 16).flatmap(lambda g: st.lists(st.floats(0.0, 1.0, width=32), min_size=g, max_size=g)))
def test_max_group_advantage_bounds_every_group_and_one_outlier_reaches_it(rewards):
    g = len(rewards)
    ids = torch.zeros(g, dtype=torch.long)
    advantages = group_advantages(torch.tensor(rewards, dtype=torch.float64), ids)
    assert (advantages.abs() <= max_group_advantage(g) + 1e-9).all()
    outlier = group_advantages(torch.tensor([1.0] + [0.0] * (g - 1), dtype=torch.float64), ids)
    assert outlier.abs().max().item() == pytest.approx(max_group_advantage(g), rel=1e-5)


def test_negative_replay_count_is_rejected():
    with pytest.raises(ValueError, match="replay counts"):
        value_smoothing_clip(torch.ones(2), torch.tensor([0, -1]), 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------------------------------

# Row 0: prompt, two sampled, tool response, sampled, padding. Row 1: sampled only. Row 2: all padding.
# Row 3: prompt, sampled, tool response x2, sampled x2.
LOSS_MASK = torch.tensor(
    [[0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 1, 1]], dtype=torch.bool
)


def make_batch(seed):
    """logprobs (a leaf with grad), old_logprobs, advantages, ref_logprobs, entropy: float64 [4, 6].

    Ratios are exp(N(0, 0.3^2)), so some tokens fall outside the 0.2 trust region."""
    gen = torch.Generator().manual_seed(seed)
    shape = LOSS_MASK.shape
    logprobs = -2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 0.05
    old_logprobs = logprobs + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    ref_logprobs = logprobs + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    advantages = torch.randn(shape, generator=gen, dtype=torch.float64)
    entropy = torch.rand(shape, generator=gen, dtype=torch.float64)
    return logprobs.requires_grad_(), old_logprobs, advantages, ref_logprobs, entropy


def loss_and_grad(logprobs, old_logprobs, advantages, ref_logprobs, entropy, **options):
    logprobs = logprobs.detach().requires_grad_()
    loss, diagnostics = policy_loss(
        logprobs, old_logprobs, advantages, LOSS_MASK, ref_logprobs=ref_logprobs, entropy=entropy, **options
    )
    loss.backward()
    return loss.detach(), logprobs.grad, diagnostics


@FAST
@given(
    st.integers(0, 10_000),
    st.sampled_from(["ppo", "cispo"]),
    st.sampled_from(["token-mean", "seq-mean"]),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e4, -1e4, 0.0]),
)
def test_masked_tokens_change_neither_loss_nor_gradient_even_nan_or_inf(seed, kind, reduction, garbage):
    batch = make_batch(seed)
    dirty = [torch.where(LOSS_MASK, tensor.detach(), garbage) for tensor in batch]
    options = {"kind": kind, "reduction": reduction, "kl_beta": 0.1}
    loss, grad, diagnostics = loss_and_grad(*batch, **options)
    dirty_loss, dirty_grad, dirty_diagnostics = loss_and_grad(*dirty, **options)
    assert torch.isfinite(dirty_loss) and torch.isfinite(dirty_grad).all()
    assert torch.equal(dirty_loss, loss) and torch.equal(dirty_grad, grad)
    assert (grad[~LOSS_MASK] == 0).all()
    assert dirty_diagnostics == diagnostics


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean"])
def test_ppo_gradient_at_ratio_one_is_the_plain_policy_gradient(reduction):
    logprobs, _, advantages, _, _ = make_batch(0)
    ppo_clip_loss(logprobs, logprobs.detach(), advantages, LOSS_MASK, reduction=reduction).backward()
    mask = LOSS_MASK.double()
    if reduction == "token-mean":  # -mean over all sampled tokens of A * grad(log p)
        expected = -advantages * mask / mask.sum()
    else:  # -mean over sequences of each one's token mean
        expected = -advantages * mask / mask.sum(-1, keepdim=True).clamp(min=1) / mask.shape[0]
    assert torch.allclose(logprobs.grad, expected, atol=1e-12)


def test_ppo_clip_cuts_the_gradient_only_on_the_clipped_side():
    # ratios:   too high  too low  too low  too high  in low band  in high band (inside for eps_high=0.28 only)
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 0.9, 1.25]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    logprobs = torch.full_like(ratios, -1.0, requires_grad=True)
    old_logprobs = logprobs.detach() - ratios.log()
    mask = torch.ones_like(ratios, dtype=torch.bool)
    ppo_clip_loss(logprobs, old_logprobs, advantages, mask, eps_low=0.2, eps_high=0.28).backward()
    unclipped = -ratios * advantages / ratios.numel()  # d(-rho A)/d logp = -rho A, token-mean over 6
    keeps = torch.tensor([[False, True, False, True, True, True]])
    assert torch.allclose(logprobs.grad, torch.where(keeps, unclipped, 0.0), atol=1e-12)
    clip_fraction = loss_diagnostics(logprobs, old_logprobs, advantages, mask, eps_low=0.2, eps_high=0.28)
    assert clip_fraction["clip_fraction"] == pytest.approx(2 / 6)


@pytest.mark.parametrize("normalizer", [None, 17.0])
def test_cispo_gradient_is_clipped_weight_times_advantage(normalizer):
    logprobs, old_logprobs, advantages, _, _ = make_batch(3)
    clip = {"eps_low": 0.1, "eps_high": 0.2}
    cispo_loss(logprobs, old_logprobs, advantages, LOSS_MASK, **clip, normalizer=normalizer).backward()
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    tokens = LOSS_MASK.sum() if normalizer is None else normalizer
    expected = torch.where(LOSS_MASK, -ratio.clamp(0.9, 1.2) * advantages / tokens, 0.0)
    assert torch.allclose(logprobs.grad, expected, atol=1e-12)
    assert ((ratio > 1.2) | (ratio < 0.9))[LOSS_MASK].any()  # the case covers clipped tokens ...
    assert (logprobs.grad[LOSS_MASK] != 0).all()  # ... and none of them loses its gradient, unlike PPO-clip


@FAST
@given(st.floats(-30.0, 5.0), st.floats(-3.0, 3.0))
def test_k3_is_nonnegative_and_zero_when_the_policies_match(logprob, delta):
    logprobs = torch.tensor([logprob, logprob])
    ref = torch.tensor([logprob + delta, logprob])
    kl = kl_k3(logprobs, ref)
    assert (kl >= 0).all() and kl[1] == 0


@pytest.mark.parametrize("delta", [1e-8, -3e-8, 1e-7, -1e-7, 5e-8])
def test_k3_does_not_round_below_zero_for_tiny_differences(delta):
    logprobs = torch.linspace(-5, 0, 101)
    assert (kl_k3(logprobs, logprobs + delta) >= 0).all()


@pytest.mark.parametrize("kind", ["ppo", "cispo"])
@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean"])
def test_micro_batch_losses_sum_to_the_full_batch_loss(kind, reduction):
    logprobs, old_logprobs, advantages, ref_logprobs, _ = make_batch(5)
    options = {"kind": kind, "reduction": reduction, "ref_logprobs": ref_logprobs, "kl_beta": 0.1}
    full, _ = policy_loss(logprobs, old_logprobs, advantages, LOSS_MASK, **options)
    (full_grad,) = torch.autograd.grad(full, logprobs)
    normalizer = LOSS_MASK.sum() if reduction == "token-mean" else LOSS_MASK.shape[0]
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        part = {**options, "ref_logprobs": ref_logprobs[rows]}
        loss, _ = policy_loss(
            logprobs[rows], old_logprobs[rows], advantages[rows], LOSS_MASK[rows], **part, normalizer=normalizer
        )
        total = total + loss
    (summed_grad,) = torch.autograd.grad(total, logprobs)
    assert torch.allclose(total, full, atol=1e-12) and torch.allclose(summed_grad, full_grad, atol=1e-12)


def test_kl_term_adds_beta_times_the_token_mean_k3():
    logprobs, old_logprobs, advantages, ref_logprobs, _ = make_batch(11)
    without, _ = policy_loss(logprobs, old_logprobs, advantages, LOSS_MASK)
    kl = {"ref_logprobs": ref_logprobs, "kl_beta": 0.5}
    with_kl, diagnostics = policy_loss(logprobs, old_logprobs, advantages, LOSS_MASK, **kl)
    delta = (ref_logprobs - logprobs.detach())[LOSS_MASK]
    mean_k3 = (torch.exp(delta) - delta - 1).mean()
    assert torch.allclose(with_kl - without, 0.5 * mean_k3, atol=1e-12)
    assert diagnostics["kl_ref"] == pytest.approx(mean_k3.item(), abs=1e-12)


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean"])
def test_losses_pass_gradcheck(reduction):
    logprobs, old_logprobs, advantages, ref_logprobs, _ = make_batch(9)
    logprobs = logprobs.detach().requires_grad_()

    def ppo_with_kl(logp):
        options = {"reduction": reduction, "ref_logprobs": ref_logprobs, "kl_beta": 0.3}
        return policy_loss(logp, old_logprobs, advantages, LOSS_MASK, **options)[0]

    assert torch.autograd.gradcheck(ppo_with_kl, (logprobs,))
    assert torch.autograd.gradcheck(lambda logp: kl_k3(logp, ref_logprobs), (logprobs,))
    assert torch.autograd.gradcheck(lambda values: masked_reduce(values, LOSS_MASK, reduction), (logprobs,))


def test_diagnostics_are_masked_token_means():
    logprobs, old_logprobs, advantages, ref_logprobs, entropy = make_batch(2)
    _, diagnostics = policy_loss(logprobs, old_logprobs, advantages, LOSS_MASK, entropy=entropy, kind="cispo")
    ratio = torch.exp(logprobs.detach() - old_logprobs)[LOSS_MASK]
    assert set(diagnostics) == {"clip_fraction", "approx_kl", "ratio_mean", "entropy"}
    assert diagnostics["ratio_mean"] == pytest.approx(ratio.mean().item())
    assert diagnostics["approx_kl"] == pytest.approx((ratio - 1 - ratio.log()).mean().item())
    assert diagnostics["clip_fraction"] == pytest.approx(((ratio > 1.2) | (ratio < 0.8)).double().mean().item())
    assert diagnostics["entropy"] == pytest.approx(entropy[LOSS_MASK].mean().item())
    _, at_one = policy_loss(logprobs, logprobs.detach(), advantages, LOSS_MASK, ref_logprobs=logprobs.detach())
    assert at_one["approx_kl"] == at_one["kl_ref"] == at_one["clip_fraction"] == 0.0 and at_one["ratio_mean"] == 1.0


def test_bad_options_raise_errors_that_name_the_fix():
    batch = make_batch(0)[:3]
    with pytest.raises(ValueError, match=r"'grpo'.*ppo, cispo"):
        policy_loss(*batch, LOSS_MASK, kind="grpo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(*batch, LOSS_MASK, kl_beta=0.001)
    with pytest.raises(ValueError, match=r"'mean'.*token-mean, seq-mean"):
        policy_loss(*batch, LOSS_MASK, reduction="mean")
    with pytest.raises(ValueError, match="shape"):
        masked_reduce(torch.ones(2, 3), torch.ones(3, 2))
