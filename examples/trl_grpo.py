"""PRS in TRL's GRPOTrainer: the embedded model learns the wiki task with this project's search tool and reward,
trained by TRL, then evaluated by eval.py.

    pip install trl==1.16.0
    python examples/trl_grpo.py                        # 8 rounds of 2 prompts x 5 on a CPU, then eval.py
    python examples/trl_grpo.py --loop trl             # the same with TRL's own multi-turn tool loop
    python examples/trl_grpo.py --rounds 1 --eval-size 2 --model tiny-random   # a smoke run

It answers "how do I use PRS in my TRL run". TRL does the GRPO part either way (advantages, the loss, the KL term,
the optimizer); the two ways differ in who runs the tool loop:

    --loop project   this project's rollout.py, as TRL's `rollout_func`: the same prompt, tool-call format and loop
                     as train.py (a segment stops at `</tool_call>`, a malformed call gets an error the model reads,
                     tool tokens are masked with `env_mask`). The default: with it a small model really calls tools.
    --loop trl       TRL's own tool loop (`tools=[search]`, `max_tool_calling_iterations`).

What a TRL user must know so that the reward sees what PRS scores, and how this script handles each (TRL 1.16):

1. The chat template (TRL's loop). TRL runs tools only for chat templates it knows byte for byte: it parses the
   calls out of a finished turn with that template's response schema. SmolLM2's template cannot render a tool call,
   and TRL refuses it ("The provided chat template does not support tool calling"); a Hermes-style template that
   differs by one byte from TRL's copy fails with "Unrecognized chat template, failed to add response schema". The
   script gives the tokenizer TRL's Qwen2.5 template: it writes calls as `<tool_call>{json}</tool_call>`, the
   format tools.py reads, with the `<|im_start|>`/`<|im_end|>` tokens SmolLM2 has. That template names the model
   "Qwen" when no system message is given; every prompt here has one.
2. The tools, described once (TRL's loop). TRL's template lists the tools from the Python function's signature and
   docstring; the system message keeps only the instructions (this project's system prompt without its own tool
   list), so the prompt does not describe the tools twice in two formats.
3. A turn ends only at EOS (TRL's loop). TRL cannot stop generation at `</tool_call>`, so a call runs once its turn
   ends. The worked example is given as real turns (the call ends an assistant turn, the tool answers in its own
   turn, the answer is the next assistant turn), so the model is shown to end its turn after a call instead of
   writing a `<tool_response>` of its own. SmolLM2-135M does not pick that up: given this prompt it starts its
   answer with a `<tool_response>` of its own, or answers without searching: in 8 rounds it made no call TRL could
   run (README, "Using PRS with TRL", has the counts).
   With rollout.py's one-turn example and stop at `</tool_call>` (`--loop project`) it calls on most questions.
4. Malformed calls (TRL's loop). A call TRL's parser cannot read (bad JSON, an unclosed tag) is silently kept as
   text: no error goes back to the model, and TRL's `tools/failure_frequency` does not count it. PRS does: its
   `tool_call` stage scores such a call invalid (`malformed_calls` in rounds.jsonl counts them).
5. What PRS scores. TRL hands the reward parsed messages: `<think>` moved to `reasoning_content`, tool calls moved
   after the text of their turn. `prs_adapters.trl_reward_for(tokenizer)` decodes `completion_ids` instead: the model's
   tokens and the tool responses in the order they were sampled, as verl's reward manager does.
6. The schedule. PRS moves from format-heavy to answer-heavy weights over training. TRL's `global_step` counts
   optimizer steps; here each round of generation is followed by 2 of them (as train.py's --mini-batches 2), and
   `optimizer_steps_per_generation=2` tells the reward, so the schedule reaches its end weights at the last round.
7. TRL's defaults that differ from this project's, each set here: learning rate 1e-6 (2e-5 here, train.py's
   default), no KL (beta 0.001), a linear LR decay (constant), gradient checkpointing on (off: the model is
   small), bf16 on (fails without a GPU: on only where a GPU supports it; the run uses the GPU when there is one),
   a shuffled dataset (the rows are already in train.py's seeded order), 8 generations (G = 5), 512 completion
   tokens for all turns together, temperature 1.0 (0.7), and a checkpoint every 500 steps (none; the final model
   is saved).

The run writes <output-dir>/rounds.jsonl (per round: PRS reward, well-formed share, tool calls executed and
malformed, seconds since the last round, peak memory) and <output-dir>/final/ (the trained model, loadable by
--model), evaluates it with eval.py into <output-dir>/eval/, and prints a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import agent  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import models  # noqa: E402
import prs  # noqa: E402
import prs_adapters  # noqa: E402
import rollout  # noqa: E402
import run_folder  # noqa: E402
import tools  # noqa: E402
from cli import UsageError  # noqa: E402

OPTIMIZER_STEPS_PER_GENERATION = 2  # train.py's --mini-batches 2: the batch of a round is split in two steps
SIGNATURE = prs_adapters.SIGNATURE_TOOLS["search"]  # the search tool's name, description and parameters (PRS checks)


# ---- The tool and the prompt, as TRL wants them ----
def make_search(passage_chars: int = 200):
    """This project's BM25 search over the 10,033 Wikipedia summaries, as a Python function TRL can call (TRL builds
    its JSON schema from the type hints and the docstring)."""
    registry = {"search": tools.search_tool(tools.BM25Search(data.wiki_corpus()), passage_chars=passage_chars)}

    def search(query: str) -> str:
        """Search Wikipedia; returns the top 3 passages.

        Args:
            query: what to look up
        """
        call = tools.ToolCall(raw="", name="search", arguments={"query": str(query)})
        return tools.execute(call, registry).text  # never raises; cut to rollout.py's observation budget

    return search


INSTRUCTIONS = rollout.SYSTEM_PROMPT.split("\n\nYou can call")[0] + (
    "\n\nYou may think inside <think></think>, search up to {max_calls} times, and must end with the final answer, "
    "a short name or phrase, inside <answer></answer>.")


def worked_example() -> list[dict]:
    """rollout.py's worked example as real turns: the call ends a turn, the tool answers, then the answer."""
    return [
        {"role": "user", "content": rollout.FEW_SHOT_QUESTION},
        {"role": "assistant", "content": "<think>I need the article about the largest moon of Saturn.</think>",
         "tool_calls": [{"type": "function",
                         "function": {"name": "search", "arguments": {"query": "largest moon of Saturn"}}}]},
        {"role": "tool", "name": "search",
         "content": "Doc 1 (Title: Titan (moon)) Titan is the largest moon of Saturn and the second-largest in the "
                    "Solar System."},
        {"role": "assistant", "content": "<think>The article is Titan (moon).</think>\n<answer>Titan</answer>"},
    ]


def dataset(rounds: int, prompts_per_round: int, seed: int, max_calls: int, loop: str):
    """The questions train.py would see with this seed, in its order (data.PromptStream), as TRL's conversational
    rows; `golden_answers` reaches the reward as a column. For TRL's loop the prompt is the whole chat; for the
    project's loop rollout.py builds it from the question (the last message)."""
    from datasets import Dataset

    examples = data.PromptStream(data.load_task("wiki", "train"), seed).take(rounds * prompts_per_round)
    system = {"role": "system", "content": INSTRUCTIONS.format(max_calls=max_calls)}
    opening = [system, *worked_example()] if loop == "trl" else []
    return Dataset.from_list([{"prompt": [*opening, {"role": "user", "content": e.question}],
                               "golden_answers": list(e.answers)} for e in examples])


def project_loop(search, rollout_config: rollout.RolloutConfig):
    """This project's tool loop as TRL's `rollout_func(prompts, trainer)`. TRL passes each prompt of the batch
    num_generations times in a row; rollout.py samples the G trajectories of each question together and returns them
    in the same order. `env_mask` (1 on sampled tokens, 0 on tool responses) keeps tool tokens out of TRL's loss; the
    other fields reach the reward functions."""
    registry = {"search": tools.Tool("search", SIGNATURE.description, SIGNATURE.parameters, search)}

    def rollout_func(prompts, trainer):
        group = trainer.num_generations
        questions = [prompt[-1]["content"] for prompt in prompts]
        if len(questions) % group or any(len(set(questions[i:i + group])) != 1
                                         for i in range(0, len(questions), group)):
            raise ValueError(f"expected each prompt {group} times in a row, got {len(questions)} prompts")
        examples = [data.Example(id=str(i), question=q, answers=()) for i, q in enumerate(questions[::group])]
        config = dataclasses.replace(rollout_config, group_size=group)
        trajectories = rollout.rollout(trainer.model, trainer.processing_class, examples, registry, config)
        return {"prompt_ids": [t.prompt_ids for t in trajectories],
                "completion_ids": [t.response_ids for t in trajectories],
                "logprobs": [t.logprobs for t in trajectories],
                "env_mask": [t.loss_mask for t in trajectories],
                "executed_calls": [sum(c.call.ok for c in t.tool_calls) for t in trajectories]}

    return rollout_func


# ---- What TRL does not log: malformed calls, and the time and memory of each round ----
class RoundLog:
    """A reward function with weight 0 that watches every round's completions, and writes a row per round (TRL
    calls reward functions once per generation)."""

    __name__ = "watch"

    def __init__(self, path: Path, tokenizer):
        self.path, self.tokenizer, self.rows, self.started = path, tokenizer, [], time.perf_counter()
        path.write_text("")

    def __call__(self, prompts, completions, completion_ids=None, golden_answers=None, trainer_state=None,
                 executed_calls=None, **_):
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        if executed_calls is None:  # TRL's loop: a `tool` message per call it ran
            executed_calls = [sum(m.get("role") == "tool" for m in completion) for completion in completions]
        bodies = [b for text in texts for b in tools.find_tool_calls(text)]
        rewards = prs_adapters.trl_reward(prompts, completions, completion_ids=completion_ids, tokenizer=self.tokenizer,
                                 golden_answers=golden_answers, trainer_state=trainer_state,
                                 optimizer_steps_per_generation=OPTIMIZER_STEPS_PER_GENERATION)
        now = time.perf_counter()
        row = {"round": len(self.rows) + 1, "seconds": now - self.started, "executed_calls": sum(executed_calls),
               "written_calls": len(bodies),
               "malformed_calls": sum(not tools.parse_tool_call(b, {"search": SIGNATURE}).ok for b in bodies),
               "answered": statistics.fmean(tools.extract_answer(t) is not None for t in texts),
               "well_formed": statistics.fmean(prs.format_score(t) for t in texts),
               "reward": statistics.fmean(rewards),  # PRS, the schedule's weights of this round
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
               "sample": texts[0]}
        self.started = now
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(run_folder.jsonl_line(row))
        return [0.0] * len(texts)



# ---- The run ----
def train(args) -> Path:
    """Train with TRL's GRPOTrainer; returns the folder of the trained model."""
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen2_5_chat_template

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()  # item 7
    model, tokenizer = models.load_model(args.model, cache=args.cache_dir or None)
    own_template = tokenizer.chat_template
    search = make_search()
    if args.loop == "trl":
        tokenizer.chat_template = qwen2_5_chat_template  # item 1
        loop = dict(tools=[search])
    else:
        rollout_config = rollout.RolloutConfig(temperature=args.temperature, max_tool_calls=args.max_tool_calls,
                                               max_new_tokens=96, max_total_tokens=1024)  # train.py's defaults
        loop = dict(rollout_func=project_loop(search, rollout_config))
    group = args.group_size
    config = GRPOConfig(
        output_dir=str(output / "trl"), seed=args.seed, max_steps=args.rounds * OPTIMIZER_STEPS_PER_GENERATION,
        num_generations=group, per_device_train_batch_size=args.prompts_per_round * group // 2,
        steps_per_generation=OPTIMIZER_STEPS_PER_GENERATION, gradient_accumulation_steps=1,  # item 6
        learning_rate=args.lr, lr_scheduler_type="constant", beta=0.001, epsilon=0.2, loss_type="dapo",
        temperature=args.temperature, max_completion_length=args.max_completion_length,
        max_tool_calling_iterations=args.max_tool_calls, gradient_checkpointing=False, bf16=gpu_bf16,
        use_cpu=not torch.cuda.is_available(), shuffle_dataset=False, logging_steps=1, save_strategy="no",
        report_to="none", reward_weights=[1.0, 0.0])
    watch = RoundLog(output / "rounds.jsonl", tokenizer)
    reward = prs_adapters.trl_reward_for(tokenizer,  # item 5
                                         optimizer_steps_per_generation=OPTIMIZER_STEPS_PER_GENERATION)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward, watch], args=config, processing_class=tokenizer,
                          train_dataset=dataset(args.rounds, args.prompts_per_round, args.seed, args.max_tool_calls,
                                                args.loop), **loop)
    trainer.train()
    final = output / "final"
    tokenizer.chat_template = own_template  # the model as it was, with its own template (eval.py renders with it)
    trainer.model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    return final


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loop", default="project", choices=("project", "trl"),
                        help="who runs the tool loop: this project's rollout.py as TRL's rollout_func, or TRL")
    parser.add_argument("--model", default=models.EMBEDDED, help="model to train (tiny-random for a smoke run)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of generation (train.py's --steps)")
    parser.add_argument("--prompts-per-round", type=int, default=2, help="prompts per round (an even number)")
    parser.add_argument("--group-size", type=int, default=5, help="G, completions per prompt")
    parser.add_argument("--lr", type=float, default=2e-5, help="learning rate (train.py's default)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (train.py's default)")
    parser.add_argument("--max-tool-calls", type=int, default=2, help="tool calls per completion (train.py's)")
    parser.add_argument("--max-completion-length", type=int, default=384,
                        help="TRL's loop: tokens of all turns of a completion together, tool responses included")
    parser.add_argument("--eval-size", type=int, default=32, help="wiki test questions eval.py answers afterwards")
    parser.add_argument("--seed", type=int, default=0, help="random seed (and train.py's question order)")
    parser.add_argument("--cache-dir", default="", help="cache of the embedded model and data")
    parser.add_argument("--output-dir", default="runs/trl", help="folder for rounds.jsonl, final/ and eval/")
    args = parser.parse_args(argv)
    for flag, value, ok, must in [
            ("--rounds", args.rounds, args.rounds >= 1, "at least 1"),
            ("--prompts-per-round", args.prompts_per_round, args.prompts_per_round >= 2 and
             args.prompts_per_round % 2 == 0, "an even number, at least 2 (a round is two optimizer steps)"),
            ("--group-size", args.group_size, args.group_size >= 2, "at least 2"),
            ("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0, "a positive number"),
            ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature > 0,
             "a positive number"),
            ("--max-tool-calls", args.max_tool_calls, args.max_tool_calls >= 1, "at least 1"),
            ("--max-completion-length", args.max_completion_length, args.max_completion_length >= 1, "at least 1"),
            ("--eval-size", args.eval_size, args.eval_size >= 1, "at least 1"),
            ("--seed", args.seed, 0 <= args.seed < 2**32, f"in [0, {2**32 - 1}]")]:
        if not ok:
            parser.error(f"{flag} {value}: must be {must}")
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("error: this example needs TRL: pip install trl==1.16.0")
    output = Path(args.output_dir)
    try:
        with run_folder.exclusive(output):  # one process at a time in a folder, as train.py
            # Refuse before training, not after it: eval.py would refuse to write over an earlier evaluation.
            earlier = [name for name in ("final", "eval") if (output / name).exists()]
            if earlier:
                raise UsageError(f"--output-dir {output} holds an earlier run ({' and '.join(earlier)}/): "
                                       f"choose another")
            if (output / "rounds.jsonl").exists():
                print(f"note: {output} holds a run that stopped before its end; this run starts again and replaces "
                      f"its log")
            final = train(args)
    except agent.USER_ERRORS as error:
        sys.exit(f"error: {error}")
    evaluation.main(["--model", str(final), "--task", "wiki", "--limit", str(args.eval_size), "--max-tool-calls",
                     str(args.max_tool_calls), "--output", str(output / "eval")])
    rows = [json.loads(line) for line in (output / "rounds.jsonl").read_text().splitlines()]
    print(f"{len(rows)} rounds; median {statistics.median(r['seconds'] for r in rows):.0f} s per round; peak memory "
          f"{max(r['peak_rss_gb'] for r in rows):.1f} GB; tool calls executed {sum(r['executed_calls'] for r in rows)}"
          f", malformed {sum(r['malformed_calls'] for r in rows)}; reward {rows[0]['reward']:.2f} -> "
          f"{rows[-1]['reward']:.2f}; well-formed {rows[0]['well_formed']:.2f} -> {rows[-1]['well_formed']:.2f}")


if __name__ == "__main__":
    main()
