"""Every setting of train.py and eval.py: its flag, default and meaning, and the checks argparse cannot make.

`AgentArgs` are what an agent is made of (model, retrieval, tool-loop limits, judge); `EvalArgs` and `TrainArgs`
extend them. Each field is one command-line flag (cli.py): `lr: float = arg(2e-5, "...", above=0)` is `--lr 2e-5`, its
help text is what `--help` prints, and a value not above 0 (or nan, or inf) is refused with an error naming the flag.
cli.check_fields checks them again for settings read back from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import data
import models
import vspo
from cli import arg


@dataclass
class AgentArgs:
    model: str = arg(models.EMBEDDED, "model: smollm2-135m (embedded, offline), tiny-random, a save_pretrained "
                                      "folder or checkpoint, Qwen2.5-0.5B/1.5B/3B/7B, or a hub id")
    corpus: str = arg("wiki", "search corpus: wiki (10,033 Wikipedia summaries, built in) or a Search-R1 corpus "
                              "jsonl file")
    retriever: str = arg("bm25", "bm25 (local index over --corpus) or the URL of a Search-R1 retrieval server")
    topk: int = arg(3, "passages per search", low=1)
    passage_chars: int = arg(200, "cut each passage to this many characters (0: whole passages); shorter tool "
                                  "responses are faster to encode", low=0)
    max_tool_calls: int = arg(2, "tool calls allowed per trajectory", low=1)
    max_new_tokens: int = arg(96, "tokens one model segment may sample before it is cut", low=1)
    max_total_tokens: int = arg(1024, "the most tokens of prompt + response", low=1)
    few_shot: bool = arg(True, "put one worked example in the prompt (small models need it to use the format)")
    device: str = arg("auto", "cpu, cuda, cuda:1 ... (auto: cuda when available)")
    dtype: str = arg("auto", "compute precision: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32",
                     choices=("auto", "bf16", "fp32"))
    cache_dir: str = arg("", "cache for the embedded model and data (default: $AGENTIC_RL_CACHE or "
                             "~/.cache/agentic-rl)")
    judge_model: str = arg("", "long-form judge model name (default: $JUDGE_MODEL)")
    judge_base_url: str = arg("", "OpenAI-compatible endpoint of the judge (default: $OPENAI_BASE_URL)")
    judge_api_key: str = arg("", "judge API key (default: $OPENAI_API_KEY; prefer the variable, flags are visible "
                                 "in the process list)")


@dataclass
class EvalArgs(AgentArgs):
    task: list[str] = arg(["wiki"], "one or more tasks: wiki, fanoutqa, wiki-long, or Search-R1 question jsonl files")
    split: str = arg("test", "split of the built-in tasks", choices=data.SPLITS)
    limit: int = arg(0, "evaluate only the first N questions of each task (0: all)", low=0)
    batch_size: int = arg(32, "trajectories generated together", low=1)
    temperature: float = arg(0.0, "0: greedy decoding (the default); > 0 samples", low=0)
    seed: int = arg(0, "random seed (matters only when sampling)", low=0, high=2**32 - 1)
    output: str = arg("runs/eval", "folder for the trajectories (one <task>.jsonl each) and metrics.json")


@dataclass
class TrainArgs(AgentArgs):
    # what to learn
    task: str = arg("wiki", "training task: wiki, wiki-long (long-form, needs a judge) or a Search-R1 question "
                            "jsonl file")
    eval_task: str = arg("", "task evaluated before, during (--eval-every) and after training (default: the test "
                             "split of a built-in --task; none for a jsonl --task)")
    reward: str = arg("prs", "prs (staged: format, tool call, evidence, answer) or binary (EM; judge match for "
                             "long-form)", choices=("prs", "binary"))
    schedule_steps: int = arg(0, "steps over which PRS moves from format-heavy to answer-heavy weights (default: "
                                 "--steps of the run's start, kept when it is resumed with more --steps)", low=0)
    # how to learn
    algorithm: str = arg("vspo", "vspo, grpo, dapo or cispo (module docstring)", choices=tuple(vspo.ALGORITHMS))
    replacement: str = arg("", "override the algorithm's dead-group replacement: value, random, filter or none",
                           choices=("",) + vspo.REPLACEMENT_MODES)
    value_clip: str = arg("", "override the algorithm's value-smoothing clipping: on or off",
                          choices=("", "on", "off"))
    credit: str = arg("outcome", "credit assignment: outcome (GRPO advantages) or istar (plus implicit step "
                                 "rewards)", choices=("outcome", "istar"))
    group_size: int = arg(5, "G, trajectories per prompt (the paper: 5)", low=2)
    prompts_per_step: int = arg(2, "prompts rolled out per step (before replacements)", low=1)
    steps: int = arg(8, "training steps", low=1)
    lr: float = arg(2e-5, "AdamW learning rate (the paper: 1e-6 for 7B models over hundreds of steps)", above=0)
    temperature: float = arg(0.7, "sampling temperature of rollouts (the paper: 1.0; a 135M model writes noise "
                                  "at 1.0)", above=0)
    top_p: float = arg(1.0, "nucleus sampling of rollouts", above=0, high=1)
    clip_eps_low: float = arg(0.2, "PPO clip: ratio floor 1 - eps", low=0, below=1)
    clip_eps_high: float = arg(0.2, "PPO clip: ratio ceiling 1 + eps", low=0)
    kl_beta: float = arg(0.001, "k3 KL penalty to the initial model (the paper: 0.001); 0 loads no reference "
                                "model; iStar uses none", low=0)
    loss_reduction: str = arg("token-mean", "token-mean over the batch, or seq-mean", choices=vspo.REDUCTIONS)
    mini_batches: int = arg(2, "optimizer steps per rollout batch (the batch is split; from the second on, the "
                               "policy ratio differs from 1 and clipping acts)", low=1)
    micro_batch_size: int = arg(4, "trajectories per forward/backward pass (gradient accumulation)", low=1)
    max_grad_norm: float = arg(1.0, "gradient clipping", above=0)
    weight_decay: float = arg(0.0, "AdamW weight decay", low=0)
    resample_rounds: int = arg(1, "rounds of replacement rollouts for dead groups per step", low=0)
    value_ema: float = arg(0.5, "weight of the newest task value in the buffer's moving average", above=0, high=1)
    success_threshold: float = arg(0.5, "iStar: a trajectory whose reward is above this is a success", low=0, below=1)
    istar_lr: float = arg(0.0, "iStar: learning rate of the implicit PRM (default 0: 2 x --lr x --mini-batches, "
                               "twice as fast as the policy moves per step, as in the paper: PRM 1e-6, policy 5e-7 "
                               "with one optimizer step; the step reward is a log-ratio against the moving policy, "
                               "so the PRM must outpace it)", low=0)
    istar_beta: float = arg(0.05, "iStar: beta of the step rewards and the DPO loss (the paper: 0.05)", above=0)
    istar_alpha: float = arg(1.0, "iStar: weight of the step advantages (the paper: 1)", low=0)
    gradient_checkpointing: str = arg("auto", "auto (on for CUDA), on or off", choices=("auto", "on", "off"))
    # bookkeeping
    seed: int = arg(0, "random seed: data order, sampling, replacement", low=0, high=2**32 - 1)
    output_dir: str = arg("runs/default", "folder for metrics.jsonl, samples.jsonl, the curves PNG and "
                                          "checkpoints/; a new run needs a folder without an earlier run in it")
    eval_every: int = arg(0, "evaluate every N steps (0: only before and after training)", low=0)
    eval_size: int = arg(32, "questions per evaluation (greedy)", low=0)
    save_every: int = arg(0, "checkpoint every N steps (0: only at the end)", low=0)
    keep_checkpoints: int = arg(2, "how many recent checkpoints to keep", low=1)
    samples_per_step: int = arg(2, "trajectories per step written to samples.jsonl for inspection", low=0)
    resume: str = arg("", "continue from a checkpoint folder, or from the latest checkpoint of an output folder")
    wandb: bool = arg(False, "also log to Weights & Biases (needs `pip install wandb`)")
    plot_only: str = arg("", "redraw the training-curves PNG of an output folder from its metrics.jsonl and exit")


class Algorithm(NamedTuple):
    """What --algorithm resolves to, with the --replacement and --value-clip overrides applied."""

    replacement: str  # how dead groups are replaced: value | random | filter | none (vspo.choose_replacements)
    value_clip: bool  # value-smoothing clipping of replayed prompts' advantages
    loss: str  # ppo | cispo
    drop_dead: bool  # dead groups left out of the batch (DAPO's filter); otherwise they stay with advantage 0


def algorithm_of(args: TrainArgs) -> Algorithm:
    replacement, value_clip, loss = vspo.ALGORITHMS[args.algorithm]
    replacement = args.replacement or replacement
    return Algorithm(replacement, {"on": True, "off": False}.get(args.value_clip, value_clip), loss,
                     drop_dead=replacement == "filter")
