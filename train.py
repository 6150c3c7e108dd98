"""Train a tool-using QA agent with PRS rewards, VSPO sampling and (optionally) iStar credit, on one GPU or a CPU.

    python train.py                                   # the embedded SmolLM2-135M on the wiki task, CPU, ~10 min
    python train.py --model Qwen2.5-1.5B --lr 1e-6 --temperature 1.0 --steps 500 --prompts-per-step 32
    python train.py --resume runs/default --steps 16  # continue where the last checkpoint left off

One training step is the algorithm; the loop in `train` makes one call per line (docs/METHOD.md has the spec):

    prompts    <- the next questions of the shuffled training set             data.PromptStream
    rollout    <- G trajectories per prompt through the tool loop             rollout.py  (METHOD.md §1)
    rewards    <- PRS stages (or binary EM / judge match) per trajectory      prs.py      (§2)
    replace    <- dead groups (all rewards equal) swapped for prompts drawn
                  from the value buffer by task value, rolled out and scored vspo.py     (§3.3)
    (iStar)    <- the implicit PRM scores every step, then takes a DPO step  istar.py    (§4)
    advantages <- GRPO per group, value-smoothing clip for replayed prompts,
                  plus the step advantages with --credit istar               vspo.py, istar.py
    update     <- PPO-clip (or CISPO) + k3 KL, token-mean, AdamW              vspo.py     (§3.5)
    log, evaluate, checkpoint                                                 run_folder.py

--algorithm picks the paper's method or a baseline: vspo (value-based replacement + value-smoothing clipping),
grpo (vanilla: no replacement; dead groups stay in the batch with advantage 0, as TRL and verl run it), dapo (dead
groups dropped and refilled with fresh prompts), cispo (GRPO sampling with the CISPO loss). --replacement and
--value-clip override the sampling parts for ablations (e.g. VSPO with random replacement).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import agent
import cpu_speed
import curves
import data
import eval as evaluation
import istar
import models
import prs
import rollout
import run_folder
import vspo
from cli import check_fields, parse, require
from settings import Algorithm, TrainArgs, algorithm_of


# ---- What a run is made of (built once by `setup`), and what it carries from step to step ----
@dataclass
class Run:
    """What a run is made of, built once by `setup`; steps change only the weights and the optimizer's state."""
    args: TrainArgs
    algorithm: Algorithm  # what --algorithm, --replacement and --value-clip resolve to
    policy: torch.nn.Module  # fp32 master weights
    tokenizer: object
    reference: torch.nn.Module | None  # frozen, for the KL term (None with --kl-beta 0 and for iStar)
    prm: istar.ImplicitPRM | None  # --credit istar
    optimizer: torch.optim.Optimizer
    tools: dict
    judge: object | None  # judge.Judge for long-form tasks
    examples: dict  # training examples by id (replacements are drawn by id from the value buffer)
    eval_examples: list
    config: rollout.RolloutConfig  # sampling: G per prompt, the training temperature
    eval_config: rollout.RolloutConfig  # greedy, one per question
    autocast_dtype: torch.dtype | None  # bf16 autocast on CUDA; None: plain fp32

    def autocast(self):
        return (torch.autocast(self.policy.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                else contextlib.nullcontext())


@dataclass
class State:
    """Everything a step reads or changes besides the models and the optimizer; a checkpoint restores it exactly."""
    stream: data.PromptStream
    buffer: vspo.ValueBuffer
    rng: np.random.Generator  # replacement draws
    generator: torch.Generator  # mini-batch shuffles
    step: int = 0


# ---- Rollout, rewards and value-based replacement: groups of scored trajectories ----
@dataclass
class Group:
    """The G trajectories of one prompt, their rewards (None = unscored) and how often the prompt was replayed."""
    example: data.Example
    trajectories: list
    replays: int = 0
    results: list = field(default_factory=list)  # prs.RewardResult per trajectory, once scored

    def scored(self):
        """(trajectory, reward) of the members that have a reward (a failed judge call leaves one out)."""
        return [(t, r.total) for t, r in zip(self.trajectories, self.results) if r.total is not None]

    @property
    def dead(self) -> bool:
        """All scored rewards equal, or fewer than two scored: all advantages 0 (vspo.dead_groups, METHOD.md §3.1)."""
        rewards = torch.tensor([reward for _, reward in self.scored()])  # [n]
        return len(rewards) == 0 or bool(vspo.dead_groups(rewards, torch.zeros(len(rewards), dtype=torch.long))[1])


def roll_out(run: Run, examples, replays: list[int], first_group_id: int = 0) -> list[Group]:
    """G trajectories per example through the tool loop (METHOD.md §1), as groups."""
    with run.autocast():
        trajectories = rollout.rollout(run.policy, run.tokenizer, examples, run.tools, run.config,
                                       first_group_id=first_group_id)
    size = run.config.group_size
    return [Group(example, trajectories[i * size:(i + 1) * size], replays[i]) for i, example in enumerate(examples)]


def score(run: Run, groups: list[Group], step: int) -> list[Group]:
    """The reward of every trajectory (METHOD.md §2): PRS or binary, short-form (EM, LA-BLEU) or long-form (judge),
    all in one batch so that a judge scores them concurrently."""
    trajectories = [t for g in groups for t in g.trajectories]
    schedule, texts = dict(step=step, total_steps=run.args.schedule_steps), [t.text for t in trajectories]
    if any(t.example.reference for t in trajectories):  # long-form
        asked = ([t.example.question for t in trajectories], [t.example.reference for t in trajectories], run.judge)
        results = (prs.prs_longform_rewards(texts, *asked, run.tools, **schedule) if run.args.reward == "prs"
                   else prs.binary_longform_rewards(texts, *asked))
    elif run.args.reward == "prs":
        results = [prs.prs_reward(t.text, t.example.answers, run.tools, **schedule) for t in trajectories]
    else:
        results = [prs.binary_reward(t.text, t.example.answers) for t in trajectories]
    # A reward that is not a finite number (nan from a custom reward or judge) would make its whole group's
    # advantages nan: it is unscored instead, left out of the update and counted, like a failed judge call.
    results = [r if r.total is None or math.isfinite(r.total) else replace(r, total=None) for r in results]
    for i, group in enumerate(groups):
        group.results = results[i * len(group.trajectories):(i + 1) * len(group.trajectories)]
    return groups


def replace_dead_groups(run: Run, state: State, groups: list[Group]):
    """Value-based sampling (METHOD.md §3.3): each dead group gives its place to a prompt drawn from the value buffer
    (or a fresh one), rolled out and scored, for up to --resample-rounds rounds. Then every group rolled out this
    step updates its prompt's task value in the buffer. Returns the batch after replacement (dead groups that could
    not be replaced stay in it), every group rolled out this step, and counts for the log."""
    stats = {"dead_fraction": sum(g.dead for g in groups) / len(groups), "extra_rollouts": 0, "replayed": 0}
    everything = list(groups)
    rounds = run.args.resample_rounds if run.algorithm.replacement != "none" else 0
    for _ in range(rounds):
        dead = [g for g in groups if g.dead]
        if not dead:
            break
        in_batch = {g.example.id for g in everything}
        picks = vspo.choose_replacements(state.buffer, len(dead), in_batch, state.rng, run.algorithm.replacement)
        for key in filter(None, picks):
            state.buffer.mark_replayed(key)
        fresh = iter(state.stream.take(sum(key is None for key in picks)))
        examples = [run.examples[key] if key is not None else next(fresh) for key in picks]
        replays = [state.buffer.replay_count(key) if key is not None else 0 for key in picks]
        new_groups = score(run, roll_out(run, examples, replays, first_group_id=len(everything)), state.step)
        stats["extra_rollouts"] += len(new_groups) * run.config.group_size
        stats["replayed"] += sum(key is not None for key in picks)
        groups = [g for g in groups if not g.dead] + new_groups
        everything += new_groups
    for group in everything:
        if group.scored():
            state.buffer.update(group.example.id, vspo.task_value([reward for _, reward in group.scored()]))
    stats["unscored"] = sum(r.total is None for g in everything for r in g.results)
    return groups, everything, stats


def groups_to_train(run: Run, groups: list[Group], everything: list[Group]) -> list[Group]:
    """The groups the update trains on (METHOD.md §3.5). GRPO and VSPO keep a dead group in the batch, as TRL and verl
    run GRPO: its advantages are 0, but its tokens count in the token-mean and in the KL term. DAPO's filter leaves
    dead groups out (they were refilled with fresh prompts). With iStar every group rolled out this step is trained
    on, the replaced dead ones too: their episode advantage is 0, but their steps get step advantages (istar.py).
    A group with no scored trajectory (every judge call failed) has nothing to train on."""
    if run.prm is not None:
        return [g for g in everything if g.scored()]
    return [g for g in groups if g.scored() and not (run.algorithm.drop_dead and g.dead)]


# ---- The batch, advantages and the policy update ----
@dataclass
class Batch:
    """The scored trajectories trained on this step, as tensors, row i the same trajectory in every field."""
    trajectories: list
    tokens: rollout.TokenBatch  # ids and masks, [N, L] and [N, R]
    rewards: torch.Tensor  # [N]
    group_ids: torch.Tensor  # [N]
    replays: torch.Tensor  # [N] how often each row's prompt was replayed (value-smoothing clip)
    old_logprobs: torch.Tensor  # [N, R] log-probs under the policy that sampled them
    ref_logprobs: torch.Tensor | None  # [N, R] under the reference model, for the KL term


def make_batch(run: Run, groups: list[Group]) -> Batch:
    rows = [(t, reward, g.replays) for g in groups for t, reward in g.scored()]
    # Shortest first: a micro-batch is padded to its longest row, so neighbours of similar lengths waste little
    # (benchmarks/README.md). Nothing depends on the order: each row carries its group id, reward and replay count.
    rows.sort(key=lambda row: len(row[0].prompt_ids) + len(row[0].response_ids))
    trajectories = [t for t, _, _ in rows]
    tokens = rollout.collate(trajectories, run.tokenizer.pad_token_id)
    size, temperature = run.args.micro_batch_size, run.args.temperature
    # OUR READING: the ratio's old log-probs are those recorded while sampling, from the very weights being updated
    # (the same numbers as a recomputation in fp32, within 2e-4, tested). Under bf16 autocast, and for iStar, whose
    # step rewards compare two models token by token, they are recomputed with the training forward pass instead.
    old_logprobs = tokens.sampling_logprobs
    with run.autocast():
        if run.prm is not None or run.autocast_dtype is not None:
            old_logprobs = rollout.recompute_logprobs(run.policy, tokens, size, temperature)
        ref_logprobs = (rollout.recompute_logprobs(run.reference, tokens, size, temperature)
                        if run.reference is not None else None)
    return Batch(trajectories, tokens, torch.tensor([reward for _, reward, _ in rows]),
                 torch.tensor([t.group_id for t in trajectories]), torch.tensor([k for _, _, k in rows]),
                 old_logprobs, ref_logprobs)


class StepCredit(NamedTuple):
    """iStar's step rewards of a batch (METHOD.md §4.1), and which step each response token belongs to."""
    step_ids: torch.Tensor  # [N, R] step index of each response token, -1 on tool tokens and padding
    step_rewards: torch.Tensor  # [N, S]
    step_mask: torch.Tensor  # [N, S] True on real steps


def implicit_step_rewards(run: Run, batch: Batch) -> tuple[StepCredit, dict]:
    """iStar (METHOD.md §4): the PRM's step rewards of this batch, then one DPO step of the PRM on it."""
    step_ids = istar.step_index([t.steps for t in batch.trajectories], batch.tokens.response_ids.shape[1])  # [N, R]
    with run.autocast():
        step_rewards, step_mask, diagnostics = run.prm.score_and_update(
            batch.tokens, batch.old_logprobs, batch.rewards, batch.group_ids, step_ids,
            micro_batch_size=run.args.micro_batch_size)
    return StepCredit(step_ids, step_rewards, step_mask), {f"istar_{k}": v for k, v in diagnostics.items()}


def advantages(run: Run, batch: Batch, credit: StepCredit | None) -> torch.Tensor:
    """Per-token advantages [N, R]: GRPO per group (METHOD.md §3.1), value-smoothing clipped by each prompt's replay
    count (§3.4), plus iStar's step advantages (Eq. 4, 5; §4.3) when `credit` is given."""
    episode = vspo.group_advantages(batch.rewards, batch.group_ids)  # [N]
    if run.algorithm.value_clip:
        c_max = vspo.max_group_advantage(run.args.group_size)  # a fresh group is never clipped, only replays are
        episode = vspo.value_smoothing_clip(episode, batch.replays, c_max)  # [N]
    if credit is None:
        return vspo.broadcast_to_tokens(episode, batch.tokens.loss_mask)  # [N, R]
    step_advantages = istar.step_advantages(credit.step_rewards, credit.step_mask, batch.group_ids)  # [N, S]
    return istar.combine_advantages(episode, step_advantages, credit.step_ids, batch.tokens.loss_mask,
                                    run.args.istar_alpha)  # [N, R]


def update(run: Run, state: State, batch: Batch, token_advantages: torch.Tensor) -> dict:
    """PPO-clip (or CISPO) + k3 KL over the batch (METHOD.md §3.5), split into --mini-batches optimizer steps of
    gradient-accumulated micro-batches. A non-finite gradient skips that optimizer step and says so. Returns averaged
    diagnostics."""
    args, policy = run.args, run.policy
    policy.train()
    rows = torch.randperm(len(batch.tokens), generator=state.generator).tolist()
    lengths = batch.tokens.attention_mask.sum(dim=1).tolist()  # micro-batches of similar lengths pad little
    chunks = [sorted(rows[i::args.mini_batches], key=lengths.__getitem__) for i in range(args.mini_batches)
              if rows[i::args.mini_batches]]
    kl_beta = args.kl_beta if batch.ref_logprobs is not None else 0.0
    totals, skipped = Counter(), 0
    for chunk in chunks:
        normalizer = (batch.tokens.loss_mask[chunk].sum().clamp(min=1) if args.loss_reduction == "token-mean"
                      else len(chunk))  # the whole mini-batch's, so micro-batch losses add up to its loss
        with run.autocast():  # the shared prompt prefix: encoded once per optimizer step, backpropagated once
            prefix = rollout.SharedPrefix(policy, batch.tokens)
        for start in range(0, len(chunk), args.micro_batch_size):
            micro_rows = chunk[start:start + args.micro_batch_size]
            micro = batch.tokens[micro_rows].to(policy.device)
            width = micro.response_ids.shape[1]

            def rows_of(tensor):  # [N, R] -> this micro-batch's [n, r]
                return None if tensor is None else tensor[micro_rows, :width].to(policy.device)

            with run.autocast():
                logprobs, entropy = rollout.response_logprobs(policy, micro, args.temperature, with_entropy=True,
                                                              prefix=prefix.cache)
            loss, diagnostics = vspo.policy_loss(
                logprobs.float(), rows_of(batch.old_logprobs), rows_of(token_advantages), micro.loss_mask,
                kind=run.algorithm.loss, eps_low=args.clip_eps_low, eps_high=args.clip_eps_high,
                ref_logprobs=rows_of(batch.ref_logprobs), kl_beta=kl_beta, reduction=args.loss_reduction,
                normalizer=normalizer, entropy=entropy)
            loss.backward()
            tokens = float(micro.loss_mask.sum())
            totals.update({name: value * tokens for name, value in diagnostics.items()} | {"tokens": tokens})
            totals["loss"] += loss.item()
        prefix.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        if torch.isfinite(grad_norm):
            run.optimizer.step()
            totals["grad_norm"] += grad_norm.item()
        else:
            skipped += 1
            tqdm.write(f"step {state.step}: non-finite gradient (norm {grad_norm.item()}); optimizer step skipped")
        run.optimizer.zero_grad(set_to_none=True)
    policy.eval()
    tokens = max(totals.pop("tokens"), 1.0)
    stats = {name: value / tokens for name, value in totals.items() if name not in ("loss", "grad_norm")}
    return stats | {"loss": totals["loss"] / len(chunks), "skipped_updates": float(skipped),
                    "grad_norm": totals["grad_norm"] / max(len(chunks) - skipped, 1)}


# ---- Setup, checkpoints, and the training run ----
def setup(args: TrainArgs) -> tuple[Run, State]:
    """Models, data, tools, judge and state, from the arguments (and a checkpoint with --resume)."""
    agent.seed_everything(args.seed)
    device, dtype = agent.device_and_dtype(args)
    cpu_speed.keep_freed_memory(device)  # a faster CPU run, the same numbers
    cache = args.cache_dir or None
    checkpoint = run_folder.checkpoint_to_resume(args)
    train_examples = data.load_task(args.task, "train", cache)
    eval_task = args.eval_task or (args.task if args.task in data.TASKS else "")
    eval_examples = data.load_task(eval_task, "test", cache)[:args.eval_size] if eval_task else []
    long_form = any(e.reference for e in train_examples[:1] + eval_examples[:1])  # scored by the judge, asked first
    judge = agent.build_judge(args, cache_path=str(Path(args.output_dir) / "judge_cache.jsonl"), check=long_form)
    require(judge is not None or not long_form, "task", args.task, "long-form: its rewards need a judge; set "
            "--judge-model and --judge-base-url (or JUDGE_MODEL and OPENAI_BASE_URL)")
    # fp32 master weights; the forward passes run under bf16 autocast where --dtype says so (AdamW updates at lr
    # ~1e-6 vanish in bf16 weights).
    policy, tokenizer = models.load_model(str(checkpoint) if checkpoint else args.model, device=device,
                                          dtype=torch.float32, cache=cache)
    checkpointing = {"on": True, "off": False, "auto": device.type == "cuda"}[args.gradient_checkpointing]
    if checkpointing:
        models.enable_gradient_checkpointing(policy)
    reference = None
    if args.kl_beta > 0 and args.credit == "outcome":  # iStar uses no KL (METHOD.md §4)
        reference = models.load_model(args.model, device=device, dtype=dtype, cache=cache)[0]
    optimizer = policy_optimizer(args, policy)
    prm = None
    if args.credit == "istar":
        prm = (istar.ImplicitPRM(models.load_model(str(checkpoint / "prm"), device=device, cache=cache)[0],
                                 **prm_settings(args)) if checkpoint else
               istar.ImplicitPRM.from_policy(policy, **prm_settings(args)))
        if checkpointing:  # transformers checkpoints only in training mode, and the PRM is trained every step
            models.enable_gradient_checkpointing(prm.model)
            prm.model.train()
    state = State(data.PromptStream(train_examples, args.seed), vspo.ValueBuffer(ema_alpha=args.value_ema),
                  np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed))
    if checkpoint:
        run_folder.restore(checkpoint, optimizer, prm, state, args)
        require(state.step < args.steps, "steps", args.steps,
                f"the checkpoint is already at step {state.step}: pass --steps above it to train further")
    tools = agent.build_tools(args)
    config = agent.rollout_config(args, group_size=args.group_size, temperature=args.temperature, top_p=args.top_p)
    eval_config = agent.rollout_config(args, group_size=1, temperature=0.0)
    agent.check_prompts_fit(tokenizer, train_examples, tools, config, "training questions")
    agent.check_prompts_fit(tokenizer, eval_examples, tools, eval_config, "evaluation questions")
    run = Run(args, algorithm_of(args), policy, tokenizer, reference, prm, optimizer, tools, judge,
              {e.id: e for e in train_examples}, eval_examples, config, eval_config,
              dtype if dtype != torch.float32 else None)
    return run, state


def policy_optimizer(args: TrainArgs, policy) -> torch.optim.Optimizer:
    return torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)


def prm_settings(args: TrainArgs) -> dict:
    """istar.ImplicitPRM's settings from the flags: by default it learns twice as fast as the policy moves per step
    (--lr times --mini-batches optimizer steps; istar.prm_learning_rate)."""
    return dict(lr=args.istar_lr or istar.prm_learning_rate(args.lr, args.mini_batches), beta=args.istar_beta,
                threshold=args.success_threshold, temperature=args.temperature)


def evaluate(run: Run) -> dict:
    """Greedy evaluation on the held-out questions (eval.py), as eval_* metrics."""
    if not run.eval_examples:
        return {}
    with run.autocast():
        metrics, _ = evaluation.evaluate(run.policy, run.tokenizer, run.eval_examples, run.tools, run.eval_config,
                                         run.judge, progress="evaluating")
    return {f"eval_{name}": value for name, value in metrics.items()}


def train(args: TrainArgs) -> dict:
    """The training run; returns the final evaluation metrics."""
    if not args.schedule_steps:
        args.schedule_steps = args.steps  # fixed at the run's start: a resumed run with more steps keeps it
    run, state = setup(args)
    output = Path(args.output_dir)  # made and held by run_folder.exclusive
    logger = run_folder.Logger(output, args, state.step)  # a resumed run goes on from its checkpoint's log rows
    timer = run_folder.PhaseTimer()
    with timer("evaluation"):
        final_eval = evaluate(run) if state.step == 0 else {}
    if final_eval:
        logger.log(0, final_eval | timer.metrics())
    progress = tqdm(total=args.steps, initial=state.step, desc="training", unit="step", dynamic_ncols=True)
    while state.step < args.steps:
        timer = run_folder.PhaseTimer()
        prompts = state.stream.take(args.prompts_per_step)
        with timer("rollout"):
            groups = roll_out(run, prompts, replays=[0] * len(prompts))
        with timer("rewards"):
            groups = score(run, groups, state.step)
        with timer("replacement"):
            groups, everything, stats = replace_dead_groups(run, state, groups)
        trained = groups_to_train(run, groups, everything)
        state.step += 1
        update_stats = {"skipped_updates": 1.0}
        if trained:
            with timer("logprobs"):
                batch = make_batch(run, trained)
            credit, istar_stats = None, {}
            if run.prm:
                with timer("istar"):
                    credit, istar_stats = implicit_step_rewards(run, batch)
            token_advantages = advantages(run, batch, credit)
            with timer("update"):
                update_stats = update(run, state, batch, token_advantages) | istar_stats
        else:
            tqdm.write(f"step {state.step}: no group to train on (all dead and dropped, or unscored); no update")
        metrics = run_folder.step_metrics(trained, everything, stats, update_stats, timer, args.prompts_per_step)
        last = state.step == args.steps
        if last or (args.eval_every and state.step % args.eval_every == 0):
            with timer("evaluation"):
                final_eval = evaluate(run)
            metrics |= final_eval
        logger.log(state.step, metrics | timer.metrics())
        logger.samples(state.step, everything, args.samples_per_step)
        if last or (args.save_every and state.step % args.save_every == 0):
            with timer("checkpoint"):
                run_folder.save(run, state)
            logger.amend(state.step, timer.metrics("checkpoint"))  # into the step's row, logged before the save
            curves.plot(output)
        progress.update(1)
        progress.set_postfix(run_folder.postfix(metrics), refresh=False)
    progress.close()
    logger.close()
    print(run_folder.time_summary(output))
    return final_eval


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(TrainArgs, argv, __doc__)
    try:
        if args.plot_only:
            print(curves.plot(Path(args.plot_only)))
            return
        if args.resume:
            args = run_folder.resumed_args(args, argv)
        check_fields(args)  # also the settings a resumed run read back
        with run_folder.exclusive(Path(args.output_dir)):  # one process at a time trains in a folder
            final = train(args)
    except agent.USER_ERRORS as error:
        sys.exit(f"error: {error}")
    if final:
        print(evaluation.format_table({"eval (greedy)": {k.removeprefix("eval_"): v for k, v in final.items()}}))
    print(f"metrics, samples, curves and checkpoints in {args.output_dir}/")


if __name__ == "__main__":
    main()
