"""PRS (prs.py) as other trainers call a reward: TRL's GRPOTrainer (`trl_reward`, `trl_reward_for`) and verl's custom
reward function (`compute_score`). Copy it with prs.py and tools.py.

    GRPOTrainer(..., reward_funcs=[prs_adapters.trl_reward_for(tokenizer)])
    verl: custom_reward_function.path=prs_adapters.py custom_reward_function.name=compute_score

Each reads what its trainer hands a reward (TRL: completions or their token ids and the dataset's columns; verl: the
decoded response and the ground truth), scores it with prs.prs_reward on the schedule's step, and returns what the
trainer expects back (TRL: a list of floats; verl: a dict with "score" and every stage).
"""

import json
import os
import sys
from typing import Mapping

try:
    import prs  # noqa: F401
except ModuleNotFoundError:  # loaded by its path (verl's custom_reward_function.path does not put its folder on
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # sys.path): prs.py and tools.py are beside it
from prs import prs_reward
from tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tool, calculator_tool, format_tool_response, search_tool

# Signatures only, to tell a valid call from an invalid one: these backends never run.
SIGNATURE_TOOLS = {"search": search_tool(lambda query, k: []), "calculator": calculator_tool()}
GOLD_COLUMNS = ("golden_answers", "answers", "answer", "ground_truth")


def _completion_text(completion) -> str:
    """A TRL completion as one response string: a string stays as it is; conversational messages are joined in the
    order a Hermes-style parser (TRL's, for the Qwen templates) took them apart: per assistant message its
    `reasoning_content` as a `<think>` block, its `content`, then its structured `tool_calls` as `<tool_call>` blocks;
    `tool` messages become `<tool_response>` blocks. Text a model wrote after a call in the same turn comes out before
    it; decoding the sampled ids (`trl_reward_for(tokenizer)`) avoids that."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content") or ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if message.get("role") == "tool":
            parts.append(format_tool_response(content))
            continue
        if message.get("reasoning_content"):
            parts.append(f"<think>{message['reasoning_content']}</think>")
        parts.append(content)
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            arguments = function.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    pass  # left a string: the call then fails validation, as it should
            body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
            parts.append(f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}")
    return "".join(parts)


def trl_reward(prompts, completions, *, completion_ids=None, trainer_state=None, tokenizer=None,
               optimizer_steps_per_generation: int = 1, tools: Mapping[str, Tool] = SIGNATURE_TOOLS,
               require_tool: bool = True, **columns) -> list[float]:
    """PRS as a TRL GRPOTrainer reward function: `GRPOTrainer(..., reward_funcs=[prs.trl_reward])`, or, to score
    exactly what was sampled and keep the schedule in generation rounds, `reward_funcs=[prs.trl_reward_for(
    tokenizer, optimizer_steps_per_generation=...)]` (examples/trl_grpo.py does that).

    TRL calls it as `trl_reward(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)`.
    What is scored: with a `tokenizer`, each completion's token ids decoded without special tokens, the model's
    turns and the tool responses as the chat template rendered them, in the order they were sampled (TRL's
    `completion_ids`). Without one, the completion itself: a string, or conversational messages joined as
    `_completion_text` says. Gold answers come from the first dataset column present among `golden_answers`,
    `answers`, `answer`, `ground_truth` (a string, a list of aliases or {"target": [...]} per row). Prompts are
    never scored.

    The schedule moves over generation rounds: TRL's `trainer_state.global_step` counts optimizer steps, and a
    round of generation is followed by `optimizer_steps_per_generation` of them (TRL's steps_per_generation x
    num_iterations / gradient_accumulation_steps; 1 with its defaults), so round = global_step // that, of
    max_steps // that rounds. Without a trainer state it is the final round (the answer-heavy end weights).

    >>> trl_reward(["Q?"], ["<answer>Nile</answer>"], golden_answers=[["Nile"]], require_tool=False)
    [0.9]
    """
    column = next((name for name in GOLD_COLUMNS if name in columns), None)
    if column is None:
        raise ValueError(f"trl_reward needs the gold answers in a dataset column named one of {GOLD_COLUMNS}; "
                         f"the columns passed were {sorted(columns)}")
    if optimizer_steps_per_generation < 1:
        raise ValueError(f"optimizer_steps_per_generation={optimizer_steps_per_generation}: must be at least 1")
    # OUR READING: without a step the schedule cannot progress; the end weights score what evaluation measures.
    step, total_steps = 1, 1
    if trainer_state is not None:
        step = trainer_state.global_step // optimizer_steps_per_generation
        total_steps = max(trainer_state.max_steps // optimizer_steps_per_generation, 1)
    if tokenizer is not None and completion_ids is not None:
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    else:
        texts = [_completion_text(completion) for completion in completions]
    return [prs_reward(text, gold, tools, step=step, total_steps=total_steps, require_tool=require_tool).total
            for text, gold in zip(texts, columns[column])]


def trl_reward_for(tokenizer=None, *, optimizer_steps_per_generation: int = 1,
                   tools: Mapping[str, Tool] = SIGNATURE_TOOLS, require_tool: bool = True):
    """`trl_reward` with its options bound, as a function TRL logs under the name `prs` (rewards/prs/mean).

    >>> reward = trl_reward_for(require_tool=False)
    >>> reward.__name__, reward(["Q?"], ["<answer>Nile</answer>"], golden_answers=[["Nile"]])
    ('prs', [0.9])
    """
    def prs(prompts, completions, **kwargs):
        return trl_reward(prompts, completions, tokenizer=tokenizer, tools=tools, require_tool=require_tool,
                          optimizer_steps_per_generation=optimizer_steps_per_generation, **kwargs)
    return prs


def compute_score(data_source, solution_str: str, ground_truth, extra_info=None, *,
                  tools: Mapping[str, Tool] = SIGNATURE_TOOLS, require_tool: bool = True, step: int | None = None,
                  total_steps: int | None = None) -> dict[str, float]:
    """PRS as a verl custom reward: `custom_reward_function.path=prs.py custom_reward_function.name=compute_score`
    (tools.py beside prs.py; verl loads the file by its path, and prs.py then reads tools.py from its own folder).

    verl's reward manager calls `compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`
    with the decoded response; `ground_truth` is a string, a list of aliases or Search-R1's {"target": [...]}. The
    step and the number of steps come from the keyword arguments (verl's `custom_reward_function.reward_kwargs`),
    else from `extra_info`'s "step" and "total_steps"; given neither, the final step (the answer-heavy end weights).
    A step without a number of steps is refused: the schedule would silently sit at its end. Returns "score" and every
    stage's raw score plus "exact_match", the same keys for every sample so verl can log them as columns.

    >>> compute_score("nq", "<answer>Nile</answer>", {"target": ["Nile"]}, require_tool=False)["score"]
    0.9
    """
    extra_info = extra_info or {}
    step = step if step is not None else extra_info.get("step")
    total_steps = total_steps if total_steps is not None else extra_info.get("total_steps")
    if (step is None) != (total_steps is None):
        raise ValueError(f"compute_score: step={step!r} but total_steps={total_steps!r}: give both (in "
                         f"custom_reward_function.reward_kwargs or in extra_info) or neither")
    if step is None:
        step = total_steps = 1  # the end of the schedule
    result = prs_reward(solution_str, ground_truth, tools, step=step, total_steps=total_steps,
                        require_tool=require_tool)
    return {"score": result.total, **result.stages, "exact_match": result.exact_match}
