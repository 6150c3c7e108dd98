"""Train a tool-using QA agent with PRS rewards, VSPO sampling and (optionally) iStar credit, on one GPU or a CPU.

    python train.py                                   # the embedded SmolLM2-135M on the wiki task, CPU, ~13 min
    python train.py --model Qwen2.5-1.5B --lr 1e-6 --temperature 1.0 --steps 500 --prompts-per-step 32
    python train.py --resume runs/default --steps 16  # continue where the last checkpoint left off

One training step is the algorithm, one call per line of the loop in `train`:

    prompts   <- the next questions of the shuffled training set
    rollout   <- G trajectories per prompt through the tool loop           rollout.py   (METHOD.md §1)
    rewards   <- PRS stages (or binary EM) per trajectory                   prs.py       (§2)
    replace   <- dead groups (all rewards equal) swapped for prompts drawn
                 from the value buffer by task value, rolled out and scored vspo.py      (§3)
    (iStar)   <- the implicit PRM scores every step, then takes a DPO step  istar.py     (§4)
    advantage <- GRPO per group, value-smoothing clip for replayed prompts,
                 plus the step advantages with --credit istar              vspo.py, istar.py
    update    <- PPO-clip (or CISPO) + k3 KL, token-mean, AdamW             vspo.py
    log, evaluate, checkpoint

--algorithm picks the paper's method or a baseline: vspo (value-based replacement + value-smoothing clipping),
grpo (no replacement: dead groups give no gradient and are left out), dapo (dead groups refilled with fresh
prompts), cispo (GRPO sampling with the CISPO loss). --replacement and --value-clip override the sampling parts for
ablations (e.g. VSPO with random replacement).

The defaults train the embedded model on a laptop CPU in about 13 minutes; README ("Training on a GPU") gives the
paper's settings for a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import eval as evaluation
import istar
import models
import prs
import rollout
import vspo
from cli import UsageError, arg, parse, require

ALGORITHMS = {  # --algorithm -> (replacement mode, value-smoothing clip, loss)
    "vspo": ("value", True, "ppo"),
    "grpo": ("none", False, "ppo"),
    "dapo": ("filter", False, "ppo"),
    "cispo": ("none", False, "cispo"),
}


@dataclass
class Args(evaluation.AgentArgs):
    # what to learn
    task: str = arg("wiki", "training task: wiki, wiki-long (long-form, needs a judge) or a Search-R1 question "
                            "jsonl file")
    eval_task: str = arg("", "task evaluated before, during (--eval-every) and after training (default: the test "
                             "split of a built-in --task; none for a jsonl --task)")
    reward: str = arg("prs", "prs (staged: format, tool call, evidence, answer) or binary (EM; judge match for "
                             "long-form)", choices=("prs", "binary"))
    schedule_steps: int = arg(0, "steps over which PRS moves from format-heavy to answer-heavy weights (default: "
                                 "--steps of the run's start, kept when it is resumed with more --steps)")
    # how to learn
    algorithm: str = arg("vspo", "vspo, grpo, dapo or cispo (module docstring)", choices=tuple(ALGORITHMS))
    replacement: str = arg("", "override the algorithm's dead-group replacement: value, random, filter or none",
                           choices=("",) + vspo.REPLACEMENT_MODES)
    value_clip: str = arg("", "override the algorithm's value-smoothing clipping: on or off",
                          choices=("", "on", "off"))
    credit: str = arg("outcome", "credit assignment: outcome (GRPO advantages) or istar (plus implicit step "
                                 "rewards)", choices=("outcome", "istar"))
    group_size: int = arg(5, "G, trajectories per prompt (the paper: 5)")
    prompts_per_step: int = arg(2, "prompts rolled out per step (before replacements)")
    steps: int = arg(8, "training steps")
    lr: float = arg(2e-5, "AdamW learning rate (the paper: 1e-6 for 7B models over hundreds of steps)")
    temperature: float = arg(0.7, "sampling temperature of rollouts (the paper: 1.0; a 135M model writes noise "
                                  "at 1.0)")
    top_p: float = arg(1.0, "nucleus sampling of rollouts")
    clip_eps_low: float = arg(0.2, "PPO clip: ratio floor 1 - eps")
    clip_eps_high: float = arg(0.2, "PPO clip: ratio ceiling 1 + eps")
    kl_beta: float = arg(0.001, "k3 KL penalty to the initial model (the paper: 0.001); 0 loads no reference "
                                "model; iStar uses none")
    loss_reduction: str = arg("token-mean", "token-mean over the batch, or seq-mean", choices=vspo.REDUCTIONS)
    mini_batches: int = arg(2, "optimizer steps per rollout batch (the batch is split; from the second on, the "
                               "policy ratio differs from 1 and clipping acts)")
    micro_batch_size: int = arg(4, "trajectories per forward/backward pass (gradient accumulation)")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    resample_rounds: int = arg(1, "rounds of replacement rollouts for dead groups per step")
    value_ema: float = arg(0.5, "weight of the newest task value in the buffer's moving average")
    success_threshold: float = arg(0.5, "iStar: a trajectory whose reward is above this is a success")
    istar_lr: float = arg(1e-6, "iStar: learning rate of the implicit PRM (the paper: 1e-6, the same as its "
                                "policy's; README compares both choices)")
    istar_beta: float = arg(0.05, "iStar: beta of the step rewards and the DPO loss (the paper: 0.05)")
    istar_alpha: float = arg(1.0, "iStar: weight of the step advantages (the paper: 1)")
    gradient_checkpointing: str = arg("auto", "auto (on for CUDA), on or off", choices=("auto", "on", "off"))
    # bookkeeping
    seed: int = arg(0, "random seed: data order, sampling, replacement")
    output_dir: str = arg("runs/default", "folder for metrics.jsonl, samples.jsonl, the curves PNG and "
                                          "checkpoints/; a new run needs a folder without an earlier run in it")
    eval_every: int = arg(0, "evaluate every N steps (0: only before and after training)")
    eval_size: int = arg(32, "questions per evaluation (greedy)")
    save_every: int = arg(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = arg(2, "how many recent checkpoints to keep")
    samples_per_step: int = arg(2, "trajectories per step written to samples.jsonl for inspection")
    resume: str = arg("", "continue from a checkpoint folder, or from the latest checkpoint of an output folder")
    wandb: bool = arg(False, "also log to Weights & Biases (needs `pip install wandb`)")
    plot_only: str = arg("", "redraw the training-curves PNG of an output folder from its metrics.jsonl and exit")


def check(args: Args) -> None:
    """The settings argparse cannot check, each error naming its flag."""
    evaluation.check_agent_args(args)
    require(args.group_size >= 2, "group_size", args.group_size, "GRPO compares the trajectories of one prompt: "
                                                                 "use at least 2")
    for name in ("prompts_per_step", "steps", "mini_batches", "micro_batch_size", "keep_checkpoints"):
        require(getattr(args, name) >= 1, name, getattr(args, name), "must be at least 1")
    for name in ("schedule_steps", "eval_every", "eval_size", "save_every", "samples_per_step", "resample_rounds",
                 "kl_beta", "weight_decay", "clip_eps_low", "clip_eps_high"):
        require(getattr(args, name) >= 0, name, getattr(args, name), "must not be negative")
    require(args.lr > 0 and args.istar_lr > 0, "lr", args.lr, "learning rates must be positive")
    require(args.temperature > 0, "temperature", args.temperature, "training samples: use a temperature above 0")
    require(0 < args.top_p <= 1, "top_p", args.top_p, "must be in (0, 1]")
    require(0 < args.value_ema <= 1, "value_ema", args.value_ema, "must be in (0, 1]")


# ----------------------------------------------------------------------------------------------------------------------
# Data: an endless, seeded, resumable stream of training prompts
# ----------------------------------------------------------------------------------------------------------------------
class PromptStream:
    """The training examples in a fresh seeded shuffle every epoch. Its state (epoch, position) is two integers."""

    def __init__(self, examples, seed: int, epoch: int = 0, position: int = 0):
        self.examples, self.seed, self.epoch, self.position = examples, seed, epoch, position
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples)).tolist()

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            if self.position == len(self.examples):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.examples[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


# ----------------------------------------------------------------------------------------------------------------------
# Rollout, rewards and value-based replacement: groups of scored trajectories
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """The G trajectories of one prompt, their rewards (None = unscored) and how often the prompt was replayed."""

    example: data.Example
    trajectories: list
    results: list
    replays: int = 0

    def scored(self):
        """(trajectory, reward) of the members that have a reward (a failed judge call leaves one out)."""
        return [(t, r.total) for t, r in zip(self.trajectories, self.results) if r.total is not None]

    @property
    def dead(self) -> bool:
        """All scored rewards equal, or fewer than two scored: every advantage is 0 (METHOD.md §3, vspo.dead_groups,
        the rule the advantages follow)."""
        rewards = torch.tensor([reward for _, reward in self.scored()])  # [n]
        return len(rewards) == 0 or bool(vspo.dead_groups(rewards, torch.zeros(len(rewards), dtype=torch.long))[1])


def score(trajectories, args: Args, tools, judge, step: int) -> list[prs.RewardResult]:
    """The reward of each trajectory: PRS or binary, short-form (EM, LA-BLEU) or long-form (judge)."""
    schedule = dict(step=step, total_steps=args.schedule_steps)
    if any(t.example.reference for t in trajectories):  # long-form
        texts = [t.text for t in trajectories]
        questions = [t.example.question for t in trajectories]
        references = [t.example.reference for t in trajectories]
        if args.reward == "prs":
            return prs.prs_longform_rewards(texts, questions, references, judge, tools, **schedule)
        return prs.binary_longform_rewards(texts, questions, references, judge)
    if args.reward == "prs":
        return [prs.prs_reward(t.text, t.example.answers, tools, **schedule) for t in trajectories]
    return [prs.binary_reward(t.text, t.example.answers) for t in trajectories]


def rollout_groups(examples, replays, policy, tokenizer, tools, config, args, judge, step, first_group_id):
    """Roll out and score G trajectories per example."""
    trajectories = rollout.rollout(policy, tokenizer, examples, tools, config, first_group_id=first_group_id)
    results = score(trajectories, args, tools, judge, step)
    size = config.group_size
    return [Group(example, trajectories[i * size:(i + 1) * size], results[i * size:(i + 1) * size], replays[i])
            for i, example in enumerate(examples)]


def collect(examples, state, policy, tokenizer, tools, config, args, judge):
    """Roll out the step's prompts, then replace dead groups (METHOD.md §3, value-based sampling): each dead group
    gives its place to a prompt drawn from the value buffer (or a fresh one), rolled out and scored, for up to
    --resample-rounds rounds. Every scored group updates its prompt's task value.

    Returns (live, everything, stats): the groups left after replacement that are not dead, every group rolled out
    this step (dead and replaced ones included), and counts for the log."""
    mode = state.replacement
    groups = rollout_groups(examples, [0] * len(examples), policy, tokenizer, tools, config, args, judge,
                            state.step, first_group_id=0)
    stats = {"dead_fraction": sum(g.dead for g in groups) / len(groups), "extra_rollouts": 0, "replayed": 0}
    everything = list(groups)
    for _ in range(args.resample_rounds if mode != "none" else 0):
        dead = [g for g in groups if g.dead]
        if not dead:
            break
        in_batch = {g.example.id for g in everything}
        picks = vspo.choose_replacements(state.buffer, len(dead), in_batch, state.rng, mode)
        for key in picks:
            if key is not None:
                state.buffer.mark_replayed(key)
        fresh = iter(state.stream.take(sum(key is None for key in picks)))
        new_examples = [state.by_id[key] if key is not None else next(fresh) for key in picks]
        replays = [state.buffer.replay_count(key) if key is not None else 0 for key in picks]
        new_groups = rollout_groups(new_examples, replays, policy, tokenizer, tools, config, args, judge,
                                    state.step, first_group_id=len(everything))
        stats["extra_rollouts"] += len(new_groups) * config.group_size
        stats["replayed"] += sum(key is not None for key in picks)
        groups = [g for g in groups if not g.dead] + new_groups
        everything += new_groups
    for group in everything:
        if group.scored():
            state.buffer.update(group.example.id, vspo.task_value([reward for _, reward in group.scored()]))
    stats["unscored"] = sum(r.total is None for g in everything for r in g.results)
    return [g for g in groups if not g.dead], everything, stats


# ----------------------------------------------------------------------------------------------------------------------
# The batch, advantages and the policy update
# ----------------------------------------------------------------------------------------------------------------------
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


def make_batch(groups, policy, reference, tokenizer, state, args) -> Batch:
    rows = [(t, reward, g.replays) for g in groups for t, reward in g.scored()]
    trajectories = [t for t, _, _ in rows]
    tokens = rollout.collate(trajectories, tokenizer.pad_token_id)
    # OUR READING: the ratio's old log-probs are those recorded while sampling, from the very weights being updated
    # (the same numbers as a recomputation in fp32, within 2e-4, tested). Under bf16 autocast, and for iStar, whose
    # step rewards compare two models token by token, they are recomputed with the training forward pass instead.
    old_logprobs = tokens.sampling_logprobs
    with state.autocast():
        if state.prm is not None or state.autocast_dtype is not None:
            old_logprobs = rollout.recompute_logprobs(policy, tokens, args.micro_batch_size, args.temperature)
        ref_logprobs = (rollout.recompute_logprobs(reference, tokens, args.micro_batch_size, args.temperature)
                        if reference is not None else None)
    return Batch(trajectories, tokens, torch.tensor([reward for _, reward, _ in rows]),
                 torch.tensor([t.group_id for t in trajectories]), torch.tensor([k for _, _, k in rows]),
                 old_logprobs, ref_logprobs)


def implicit_step_rewards(prm: istar.ImplicitPRM, batch: Batch, state, args):
    """iStar (METHOD.md §4): the PRM's step rewards of this batch, then one DPO step of the PRM on it."""
    step_ids = istar.step_index([t.steps for t in batch.trajectories], batch.tokens.response_ids.shape[1])  # [N, R]
    with state.autocast():
        step_rewards, step_mask, diagnostics = prm.score_and_update(
            batch.tokens, batch.old_logprobs, batch.rewards, batch.group_ids, step_ids,
            micro_batch_size=args.micro_batch_size)
    return step_ids, step_rewards, step_mask, {f"istar_{name}": value for name, value in diagnostics.items()}


def advantages(batch: Batch, step_credit, state, args) -> torch.Tensor:
    """Per-token advantages [N, R]: GRPO per group (vspo.group_advantages), value-smoothing clipped by each prompt's
    replay count, plus iStar's step advantages (Eq. 4, 5) when `step_credit` is given."""
    episode = vspo.group_advantages(batch.rewards, batch.group_ids)  # [N]
    if state.value_clip:
        c_max = vspo.max_group_advantage(args.group_size)  # a fresh group is never clipped, only replays are
        episode = vspo.value_smoothing_clip(episode, batch.replays, c_max)  # [N]
    if step_credit is None:
        return vspo.broadcast_to_tokens(episode, batch.tokens.loss_mask)  # [N, R]
    step_ids, step_rewards, step_mask = step_credit
    step_advantages = istar.step_advantages(step_rewards, step_mask, batch.group_ids)  # [N, S]
    return istar.combine_advantages(episode, step_advantages, step_ids, batch.tokens.loss_mask, args.istar_alpha)


def update(policy, optimizer, batch: Batch, token_advantages, state, args) -> dict:
    """PPO-clip (or CISPO) + k3 KL over the batch, split into --mini-batches optimizer steps of gradient-accumulated
    micro-batches. A non-finite gradient skips that optimizer step and says so. Returns averaged diagnostics."""
    policy.train()
    rows = torch.randperm(len(batch.tokens), generator=state.generator).tolist()
    chunks = [rows[i::args.mini_batches] for i in range(args.mini_batches) if rows[i::args.mini_batches]]
    kl_beta = args.kl_beta if batch.ref_logprobs is not None else 0.0
    totals, skipped = Counter(), 0
    for chunk in chunks:
        normalizer = (batch.tokens.loss_mask[chunk].sum().clamp(min=1) if args.loss_reduction == "token-mean"
                      else len(chunk))  # the whole mini-batch's, so micro-batch losses add up to its loss
        for start in range(0, len(chunk), args.micro_batch_size):
            micro_rows = chunk[start:start + args.micro_batch_size]
            micro = batch.tokens[micro_rows].to(policy.device)
            width = micro.response_ids.shape[1]

            def rows_of(tensor):  # [N, R] -> this micro-batch's [n, r]
                return None if tensor is None else tensor[micro_rows, :width].to(policy.device)

            with state.autocast():
                logprobs, entropy = rollout.response_logprobs(policy, micro, args.temperature, with_entropy=True)
            loss, diagnostics = vspo.policy_loss(
                logprobs.float(), rows_of(batch.old_logprobs), rows_of(token_advantages), micro.loss_mask,
                kind=state.loss, eps_low=args.clip_eps_low, eps_high=args.clip_eps_high,
                ref_logprobs=rows_of(batch.ref_logprobs), kl_beta=kl_beta, reduction=args.loss_reduction,
                normalizer=normalizer, entropy=entropy)
            loss.backward()
            tokens = float(micro.loss_mask.sum())
            totals.update({name: value * tokens for name, value in diagnostics.items()} | {"tokens": tokens})
            totals["loss"] += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
            totals["grad_norm"] += grad_norm.item()
        else:
            skipped += 1
            tqdm.write(f"step {state.step}: non-finite gradient (norm {grad_norm.item()}); optimizer step skipped")
        optimizer.zero_grad(set_to_none=True)
    policy.eval()
    tokens = max(totals.pop("tokens"), 1.0)
    stats = {name: value / tokens for name, value in totals.items() if name not in ("loss", "grad_norm")}
    return stats | {"loss": totals["loss"] / len(chunks), "skipped_updates": float(skipped),
                    "grad_norm": totals["grad_norm"] / max(len(chunks) - skipped, 1)}


# ----------------------------------------------------------------------------------------------------------------------
# Training state, checkpoints and resume
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class State:
    """Everything a step reads or changes besides the models, so that a checkpoint can restore it exactly."""

    stream: PromptStream
    by_id: dict
    buffer: vspo.ValueBuffer
    rng: np.random.Generator  # replacement draws
    generator: torch.Generator  # mini-batch shuffles
    replacement: str
    value_clip: bool
    loss: str
    device_type: str
    autocast_dtype: torch.dtype | None  # bf16 autocast on CUDA; None: plain fp32
    prm: istar.ImplicitPRM | None = None
    step: int = 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def saved_args(args: Args) -> dict:
    """The settings as written to disk: everything but the judge's API key."""
    return asdict(args) | {"judge_api_key": ""}


def save_checkpoint(folder: Path, policy, tokenizer, optimizer, state: State, args: Args) -> Path:
    """Write checkpoints/step-NNNNNN atomically: everything goes to a temporary folder that is renamed into place at
    the end, and `latest` is switched after that, so a kill at any moment leaves `latest` on a whole checkpoint. The
    folder is a save_pretrained model folder (transformers and vLLM load it as it is) plus trainer_state.json,
    optimizer.pt and, for iStar, prm/."""
    root = folder / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "generator": state.generator.get_state(),
                "prm_optimizer": state.prm.state_dict() if state.prm else None}, tmp / "optimizer.pt")
    trainer_state = {"step": state.step, "stream": state.stream.state_dict(), "buffer": state.buffer.state_dict(),
                     "rng": state.rng.bit_generator.state, "args": saved_args(args)}
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    if state.prm:  # a loadable model folder of its own
        state.prm.model.save_pretrained(tmp / "prm")
        tokenizer.save_pretrained(tmp / "prm")
    if final.exists():  # a checkpoint of this step from a run that went back: set it aside first, atomically
        os.replace(final, tmp.with_name(tmp.name + "-replaced"))
    os.replace(tmp, final)
    _write_atomically(root / "latest", final.name)
    older = sorted((p for p in root.glob("step-*") if _step_of(p) < state.step), key=_step_of)
    for stale in older[:max(0, len(older) - (args.keep_checkpoints - 1))] + list(root.glob(".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)  # old checkpoints, and leftovers of runs killed mid-write
    return final


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_checkpoint(resume: str) -> Path:
    """A checkpoint folder, or the latest checkpoint under an output folder."""
    path = Path(resume)
    if (path / "trainer_state.json").exists():
        return path
    latest = path / "checkpoints" / "latest"
    checkpoint = path / "checkpoints" / latest.read_text().strip() if latest.exists() else None
    if checkpoint and (checkpoint / "trainer_state.json").exists():
        return checkpoint
    raise UsageError(f"--resume {resume}: no checkpoint there (expected a checkpoint folder with "
                     f"trainer_state.json, or an output folder with checkpoints/latest)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unreadable ({error})") from None


def resumed_args(args: Args, argv: list[str]) -> Args:
    """With --resume, the run's saved settings, overridden by the flags given on this command line (e.g. --steps to
    train further). The run goes on in the output folder the checkpoint is in, unless --output-dir says otherwise."""
    checkpoint = find_checkpoint(args.resume)
    saved = _read_json(checkpoint / "trainer_state.json")["args"]
    given = {token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")}
    given |= {name.removeprefix("no_") for name in given}
    names = {f.name for f in fields(Args)}
    merged = {name: value for name, value in saved.items() if name in names}
    if checkpoint.parent.name == "checkpoints":  # <output_dir>/checkpoints/step-NNNNNN, wherever it was moved
        merged["output_dir"] = str(checkpoint.parent.parent)
    elif "output_dir" not in given:
        raise UsageError(f"--resume {args.resume}: this checkpoint is not inside an output folder's checkpoints/; "
                         f"say where the run goes on with --output-dir")
    merged |= {name: getattr(args, name) for name in names if name in given or name == "resume"}
    return Args(**merged)


def restore(checkpoint: Path, optimizer, state: State, args: Args) -> None:
    """Load a checkpoint's optimizer, RNG, data position and value buffer into a fresh run's state. Flags given on
    the command line win over saved settings: the learning rate, weight decay and buffer smoothing come from args."""
    saved = _read_json(checkpoint / "trainer_state.json")
    tensors = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(tensors["optimizer"])
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = args.lr, args.weight_decay
    torch.set_rng_state(tensors["torch_rng"])
    if tensors["cuda_rng"]:
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
    state.generator.set_state(tensors["generator"])
    if state.prm:
        state.prm.load_state_dict(tensors["prm_optimizer"])
        for group in state.prm.optimizer.param_groups:
            group["lr"] = args.istar_lr
    state.step = saved["step"]
    state.stream = PromptStream(state.stream.examples, state.stream.seed, **saved["stream"])
    state.buffer = vspo.ValueBuffer.from_state_dict(saved["buffer"] | {"ema_alpha": args.value_ema})
    state.rng.bit_generator.state = saved["rng"]


# ----------------------------------------------------------------------------------------------------------------------
# Logging: progress bar, metrics.jsonl, samples.jsonl, TensorBoard, wandb, the curves PNG
# ----------------------------------------------------------------------------------------------------------------------
class Logger:
    def __init__(self, folder: Path, args: Args, start_step: int):
        self.folder = folder
        self.metrics_path, self.samples_path = folder / "metrics.jsonl", folder / "samples.jsonl"
        for path in (self.metrics_path, self.samples_path):  # a resumed run rewrites what came after its checkpoint
            if path.exists():
                rows = [row for row in read_jsonl(path) if row["step"] <= start_step]
                path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self.tensorboard = self.wandb = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(folder / "tensorboard"))
        if args.wandb:
            try:
                import wandb
            except ImportError:
                raise UsageError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project="agentic-rl", config=saved_args(args), dir=str(folder))

    def log(self, step: int, metrics: dict) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            if self.tensorboard and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def samples(self, step: int, groups, count: int) -> None:
        rows = [{"step": step, "question": g.example.question, "gold": list(g.example.answers), "reward": r.total,
                 "stages": r.stages, "stop_reason": t.stop_reason, "response": t.text}
                for g in groups for t, r in zip(g.trajectories, g.results)][:count]
        with open(self.samples_path, "a") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a jsonl log; a last line cut short by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


PLOTS = (  # panel title -> metrics drawn in it
    ("reward", ("reward", "stage_format", "stage_tool_call", "stage_evidence", "stage_answer", "stage_judge")),
    ("answers and calls (training rollouts)", ("exact_match", "answered", "tool_calls")),
    ("evaluation (greedy, held out)", ("eval_em", "eval_f1", "eval_format", "eval_answered", "eval_la_bleu")),
    ("dead groups and replacements", ("dead_fraction", "extra_rollouts_per_prompt")),
    ("policy update", ("kl_ref", "approx_kl", "clip_fraction")),
    ("response length (tokens)", ("response_tokens",)),
)


def plot(folder: Path) -> Path:
    """Draw the training curves of metrics.jsonl into training_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (folder / "metrics.jsonl").exists():
        raise UsageError(f"--plot-only {folder}: no metrics.jsonl there")
    rows = read_jsonl(folder / "metrics.jsonl")
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for axis, (title, names) in zip(axes.flat, PLOTS):
        for name in names:
            points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))]
            if points:
                axis.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=name)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    path = folder / "training_curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def step_metrics(trained, everything, stats, update_stats, rollout_seconds, args) -> dict:
    every = [(t, r) for g in everything for t, r in zip(g.trajectories, g.results)]
    metrics = {"reward": evaluation.mean_of(r.total for _, r in every),
               "exact_match": evaluation.mean_of(r.exact_match for _, r in every),
               "answered": evaluation.mean_of(t.answer is not None for t, _ in every)}
    for stage in sorted({s for _, r in every for s in r.stages}):
        metrics[f"stage_{stage}"] = evaluation.mean_of(r.stages.get(stage) for _, r in every)
    sampled = sum(sum(t.loss_mask) for t, _ in every)
    metrics |= {"dead_fraction": stats["dead_fraction"],
                "extra_rollouts_per_prompt": stats["extra_rollouts"] / args.prompts_per_step,
                "replayed_prompts": stats["replayed"], "unscored": stats["unscored"],
                "trained_on": sum(len(g.scored()) for g in trained),
                "response_tokens": sampled / max(len(every), 1),
                "tool_calls": evaluation.mean_of(len(t.tool_calls) for t, _ in every),
                "rollout_tokens_per_s": sampled / max(rollout_seconds, 1e-9)}
    return metrics | update_stats


# ----------------------------------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------------------------------
def setup(args: Args):
    """Models, data, tools, judge and state, from the arguments (and a checkpoint with --resume)."""
    evaluation.seed_everything(args.seed)
    device, dtype = evaluation.device_and_dtype(args)
    cache = args.cache_dir or None
    checkpoint = find_checkpoint(args.resume) if args.resume else None
    output = Path(args.output_dir)
    if checkpoint is None and ((output / "metrics.jsonl").exists() or (output / "checkpoints").exists()):
        raise UsageError(f"--output-dir {output} holds an earlier run: continue it with --resume {output}, or "
                         f"choose another --output-dir")
    if checkpoint is not None and args.credit == "istar" and not (checkpoint / "prm").exists():
        raise UsageError(f"--resume {checkpoint}: trained with --credit outcome, it has no implicit PRM to resume "
                         f"with --credit istar")
    train_examples = data.load_task(args.task, "train", cache)
    eval_task = args.eval_task or (args.task if args.task in data.TASKS else "")
    eval_examples = data.load_task(eval_task, "test", cache)[:args.eval_size] if eval_task else []
    # fp32 master weights; the forward passes run under bf16 autocast where --dtype says so (AdamW updates at lr
    # ~1e-6 vanish in bf16 weights).
    policy, tokenizer = models.load_model(str(checkpoint) if checkpoint else args.model, device=device,
                                          dtype=torch.float32, cache=cache)
    checkpointing = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto"
                                                            and device.type == "cuda")
    if checkpointing:
        enable_checkpointing(policy)
    reference = None
    if args.kl_beta > 0 and args.credit == "outcome":  # iStar uses no KL (METHOD.md §4)
        reference = models.load_model(args.model, device=device, dtype=dtype, cache=cache)[0]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    prm = None
    if args.credit == "istar":
        settings = dict(lr=args.istar_lr, beta=args.istar_beta, threshold=args.success_threshold,
                        temperature=args.temperature)
        prm = (istar.ImplicitPRM(models.load_model(str(checkpoint / "prm"), device=device, cache=cache)[0],
                                 **settings) if checkpoint else istar.ImplicitPRM.from_policy(policy, **settings))
        if checkpointing:  # transformers checkpoints only in training mode, and the PRM is trained every step
            enable_checkpointing(prm.model)
            prm.model.train()
    mode, clip, loss = ALGORITHMS[args.algorithm]
    state = State(
        stream=PromptStream(train_examples, args.seed), by_id={e.id: e for e in train_examples},
        buffer=vspo.ValueBuffer(ema_alpha=args.value_ema), rng=np.random.default_rng(args.seed),
        generator=torch.Generator().manual_seed(args.seed), replacement=args.replacement or mode,
        value_clip={"on": True, "off": False}.get(args.value_clip, clip), loss=loss, device_type=device.type,
        autocast_dtype=dtype if dtype != torch.float32 else None, prm=prm)
    if checkpoint:
        restore(checkpoint, optimizer, state, args)
        require(state.step < args.steps, "steps", args.steps,
                f"the checkpoint is already at step {state.step}: pass --steps above it to train further")
    tools = evaluation.build_tools(args)
    judge = evaluation.build_judge(args, cache_path=str(output / "judge_cache.jsonl"))
    if judge is None and any(e.reference for e in train_examples[:1] + eval_examples[:1]):
        raise UsageError(f"--task {args.task}: long-form, its rewards need a judge; set --judge-model and "
                         f"--judge-base-url (or JUDGE_MODEL and OPENAI_BASE_URL)")
    return policy, tokenizer, reference, optimizer, state, tools, judge, eval_examples


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, under the name of the installed transformers (renamed within 5.x)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def train(args: Args) -> dict:
    """The training run; returns the final evaluation metrics."""
    if not args.schedule_steps:
        args.schedule_steps = args.steps  # fixed at the run's start: a resumed run with more steps keeps it
    policy, tokenizer, reference, optimizer, state, tools, judge, eval_examples = setup(args)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    config = evaluation.rollout_config(args, group_size=args.group_size, temperature=args.temperature,
                                       top_p=args.top_p)
    eval_config = evaluation.rollout_config(args, group_size=1, temperature=0.0)
    logger = Logger(output, args, state.step)
    (output / "args.json").write_text(json.dumps(saved_args(args), indent=1))

    def run_eval() -> dict:
        if not eval_examples:
            return {}
        with state.autocast():
            metrics, _ = evaluation.evaluate(policy, tokenizer, eval_examples, tools, eval_config, judge)
        return {f"eval_{name}": value for name, value in metrics.items()}

    final_eval = run_eval() if state.step == 0 else {}
    if final_eval:
        logger.log(0, final_eval)
    progress = tqdm(total=args.steps, initial=state.step, desc="training", unit="step", dynamic_ncols=True)
    while state.step < args.steps:
        started = time.perf_counter()
        examples = state.stream.take(args.prompts_per_step)
        with state.autocast():
            live, everything, stats = collect(examples, state, policy, tokenizer, tools, config, args, judge)
        rollout_seconds = time.perf_counter() - started
        # OUR READING: with iStar, dead groups stay in the batch: their episode advantage is 0, but their steps get
        # step advantages (istar.py). Otherwise a dead group has no gradient and is left out.
        trained = [g for g in (everything if state.prm else live) if g.scored()]
        state.step += 1
        if trained:
            batch = make_batch(trained, policy, reference, tokenizer, state, args)
            step_credit, istar_stats = None, {}
            if state.prm is not None:
                *step_credit, istar_stats = implicit_step_rewards(state.prm, batch, state, args)
            token_advantages = advantages(batch, step_credit, state, args)
            update_stats = update(policy, optimizer, batch, token_advantages, state, args) | istar_stats
        else:
            update_stats = {"skipped_updates": 1.0}
            tqdm.write(f"step {state.step}: every group is dead (all rewards equal); no update")
        metrics = step_metrics(trained, everything, stats, update_stats, rollout_seconds, args)
        metrics["step_seconds"] = time.perf_counter() - started
        last = state.step == args.steps
        if last or (args.eval_every and state.step % args.eval_every == 0):
            final_eval = run_eval()
            metrics |= final_eval
        logger.log(state.step, metrics)
        logger.samples(state.step, everything, args.samples_per_step)
        if last or (args.save_every and state.step % args.save_every == 0):
            save_checkpoint(output, policy, tokenizer, optimizer, state, args)
            plot(output)
        progress.update(1)
        progress.set_postfix(_postfix(metrics), refresh=False)
    progress.close()
    logger.close()
    return final_eval


def _postfix(metrics: dict) -> dict:
    shown = {"reward": "reward", "fmt": "stage_format", "tool": "stage_tool_call", "ans": "stage_answer",
             "em": "exact_match", "dead": "dead_fraction", "extra": "extra_rollouts_per_prompt", "kl": "kl_ref",
             "clip": "clip_fraction", "tok/s": "rollout_tokens_per_s"}
    return {short: f"{metrics[name]:.3g}" for short, name in shown.items() if metrics.get(name) is not None}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(Args, argv, __doc__)
    try:
        if args.plot_only:
            print(plot(Path(args.plot_only)))
            return
        if args.resume:
            args = resumed_args(args, argv)
        check(args)
        final = train(args)
    except evaluation.USER_ERRORS as error:
        sys.exit(f"error: {error}")
    if final:
        print(evaluation.format_table({"eval (greedy)": {k.removeprefix("eval_"): v for k, v in final.items()}}))
    print(f"metrics, samples, curves and checkpoints in {args.output_dir}/")


if __name__ == "__main__":
    main()
