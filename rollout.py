"""The agent's rollout: a batched, multi-turn tool loop, token-in and token-out (METHOD.md §1).

For each question we sample G trajectories (a *group*: GRPO compares them with each other). A trajectory is one
assistant turn that alternates model segments and tool responses:

    prompt ids | segment 1 (sampled) | tool response 1 (environment) | segment 2 (sampled) | ... | <answer>…</answer>
    loss mask:   1 1 1 1 1 1 1 1 1 1   0 0 0 0 0 0 0 0 0 0 0 0 0 0 0   1 1 1 1 1 1 1 1 1 1       1 1 1 1 1 1 1 1 1

The loop, in rounds:
  1. all active trajectories sample their next segment together: one batch, a KV cache, a plain sampling loop from
     which a row leaves as soon as its segment ends, at the token that completes `</tool_call>` or `</answer>`, at
     EOS, or at a length limit;
  2. a segment that ended in a tool call gets the call parsed and executed (tools.py), and the tool response is
     tokenized on its own and appended with loss mask 0; the others are finished;
  3. repeat with the trajectories that are still active.
The system message and worked example open every prompt; their keys and values are computed once per rollout and
shared by every row (on a CPU that prefix is most of the prompt's cost). Each trajectory keeps the keys and values
of everything it has encoded from one round to the next, so a round encodes only what is new: the tool response and
the last sampled token. Rows leave and rejoin the batch freely; each round lays the kept caches out side by side
again, with padding the attention mask hides. kv_cache.py holds that machinery; this file the loop around it.

Token-in, token-out: the sampled ids are kept exactly as they were sampled; only the new tool text is tokenized.
Sampled text is never decoded and re-encoded (peers' mask and drift bugs, METHOD.md §6).

Every trajectory records what METHOD.md §1.3 lists: ids, loss mask, sampling log-probs, the span of each assistant
segment ("step", used by iStar), each tool call with its parse status and response, the final answer, why it
stopped, and its group id.

`response_logprobs` recomputes the log-probs of the sampled tokens with any model (the policy for the ratio, a
reference model for KL, the implicit PRM for iStar) in one forward pass, and `recompute_logprobs` does it without
gradients in micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers.cache_utils import DynamicCache

import assets
import kv_cache
import tools as tool_lib
from data import Example

STOP_STRINGS = {tool_lib.TOOL_CALL_CLOSE: "tool_call", tool_lib.ANSWER_CLOSE: "answer"}
STOP_REASONS = ("answer", "eos", "length", "max_tool_calls")


# ----------------------------------------------------------------------------------------------------------------------
# Settings and records
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class RolloutConfig:
    group_size: int = 5
    """G: trajectories per question (the paper uses 5)"""
    temperature: float = 1.0
    """sampling temperature; 0 means greedy decoding"""
    top_p: float = 1.0
    """nucleus sampling; 1.0 samples from the full (tempered) distribution"""
    max_tool_calls: int = 4
    """a trajectory that tries to call a tool once more than this is stopped ("max_tool_calls")"""
    max_new_tokens: int = 256
    """the most tokens one segment may sample before it is stopped ("length")"""
    max_total_tokens: int = 2048
    """the most tokens of prompt + response; a trajectory reaching it is stopped ("length")"""
    max_observation_chars: int = tool_lib.MAX_OBSERVATION_CHARS
    """tool responses are cut to this many characters before they are tokenized"""
    batch_size: int = 64
    """the most trajectories sampled together in one batch (bounds memory)"""
    few_shot: bool = True
    """put one worked example (question, search, answer) in the prompt; small models need it to use the format"""
    refill_below: float = 0.25
    """a round stops early once fewer than this fraction of its rows are still sampling while others wait to go on
    after a tool call; the unfinished segments continue in the next round with them (0: every round runs to the end)"""
    keep_cache: bool = True
    """keep each trajectory's keys and values from one round to the next, so a round encodes only what is new (the
    tool response, the last sampled token); False encodes each trajectory's whole context again every round (the
    simpler path, which tests compare this one with)"""


@dataclass
class ToolCallRecord:
    call: tool_lib.ToolCall  # parse status: call.ok, call.error
    observation: str  # what the tool answered, before formatting
    failed: bool  # the call was valid but the tool raised (a backend down or too slow; tools.Observation)
    step: int  # index of the segment that made the call
    span: tuple[int, int]  # [start, end) of the tool-response tokens in response_ids ((-1, -1): did not fit)


@dataclass
class Trajectory:
    example: Example
    group_id: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)  # sampled tokens and tool-response tokens, in order
    loss_mask: list[int] = field(default_factory=list)  # per response token: 1 sampled by the policy, 0 tool
    logprobs: list[float] = field(default_factory=list)  # per response token: sampling log-prob (0.0 for tool tokens)
    steps: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each sampled segment
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    stop_reason: str | None = None  # one of STOP_REASONS
    text: str = ""  # response_ids decoded without special tokens (what rewards score)
    answer: str | None = None  # the final <answer>, None if none

    @property
    def done(self) -> bool:
        return self.stop_reason is not None


# ----------------------------------------------------------------------------------------------------------------------
# The prompt
# ----------------------------------------------------------------------------------------------------------------------
SYSTEM_PROMPT = """You are a research assistant. You answer questions by searching Wikipedia.

You can call these tools (JSON signatures):
{tools}

To call a tool, write one JSON object inside tags, like this:
<tool_call>{{"name": "search", "arguments": {{"query": "your search words"}}}}</tool_call>
The result comes back inside <tool_response></tool_response>. You may think inside <think></think>, search up to \
{max_calls} times, and must end with the final answer, a short name or phrase, inside <answer></answer>."""

FEW_SHOT_QUESTION = 'Which Wikipedia article has the short description "Largest moon of Saturn"?'
FEW_SHOT_RESPONSE = (
    "<think>I need the article about the largest moon of Saturn.</think>\n"
    '<tool_call>{"name": "search", "arguments": {"query": "largest moon of Saturn"}}</tool_call>\n'
    "<tool_response>\nDoc 1 (Title: Titan (moon)) Titan is the largest moon of Saturn and the second-largest in the "
    "Solar System.\n</tool_response>\n"
    "<think>The article is Titan (moon).</think>\n<answer>Titan</answer>"
)


def build_messages(question: str, tools: Mapping[str, tool_lib.Tool], max_tool_calls: int, few_shot: bool):
    """The chat: a system message that describes the tools from their signatures and the format, an optional
    worked example, and the question."""
    system = SYSTEM_PROMPT.format(tools=tool_lib.describe_tools(tools), max_calls=max_tool_calls)
    messages = [{"role": "system", "content": system}]
    if few_shot:
        messages += [{"role": "user", "content": FEW_SHOT_QUESTION},
                     {"role": "assistant", "content": FEW_SHOT_RESPONSE}]
    return messages + [{"role": "user", "content": question}]


def prompt_ids(tokenizer, question: str, tools, config: RolloutConfig) -> list[int]:
    messages = build_messages(question, tools, config.max_tool_calls, config.few_shot)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def prompts_without_room(tokenizer, examples: Sequence[Example], tools, config: RolloutConfig) -> list[tuple]:
    """(example, prompt length) for every example whose prompt alone reaches config.max_total_tokens: its trajectories
    would stop at once ("length") with nothing sampled, and score as failures that say nothing about the policy.

    Exact, and cheap for a large dataset: a token holds at least one byte of text, so a prompt has at most as many
    tokens as the prompt of an empty question plus the question's UTF-8 bytes (plus the few tokens where the question
    meets the text around it: 32 is ample); only questions long enough to come near the limit are tokenized."""
    base = len(prompt_ids(tokenizer, "", tools, config))
    over = []
    for example in examples:
        if base + len(example.question.encode("utf-8")) + 32 < config.max_total_tokens:
            continue
        length = len(prompt_ids(tokenizer, example.question, tools, config))
        if length >= config.max_total_tokens:
            over.append((example, length))
    return over


# ----------------------------------------------------------------------------------------------------------------------
# One round of generation: a plain sampling loop over the active rows
# ----------------------------------------------------------------------------------------------------------------------
def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {i for i in ids if i is not None}


def encode_prefix(model, batch: TokenBatch):
    """The keys and values of a batch's shared prompt prefix (a cache of one row), to be reused by response_logprobs
    over the batch's micro-batches; None where it would not be used (no shared prefix, or a model in training mode
    with activation checkpointing)."""
    if not batch.prefix_length or (model.training and _checkpointing(model)):
        return None
    return kv_cache.prefix_cache(model, batch.input_ids[:1, :batch.prefix_length].to(model.device), rows=1)


class SharedPrefix:
    """The shared prompt prefix of a mini-batch, encoded once with gradients and read by all its micro-batches.

    The micro-batches read `cache`, leaf copies of the prefix's keys and values: each micro-batch's backward pass
    stops there and adds its gradient to theirs. `backward()`, after the last micro-batch, sends the sum through the
    prefix's encoding once, instead of once per micro-batch (the same gradient, up to float rounding).
    """

    def __init__(self, model, batch: TokenBatch):
        encoded = encode_prefix(model, batch)  # with its graph, or None
        self.encoded = [] if encoded is None else [t for layer in encoded.layers for t in (layer.keys, layer.values)]
        self.leaves = [t.detach().requires_grad_(t.requires_grad) for t in self.encoded]
        self.cache = None if encoded is None else DynamicCache(
            ddp_cache_data=list(zip(self.leaves[0::2], self.leaves[1::2])))

    def backward(self) -> None:
        pairs = [(encoded, leaf.grad) for encoded, leaf in zip(self.encoded, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([encoded for encoded, _ in pairs], [grad for _, grad in pairs])


class Segment:
    """One model segment being sampled, possibly over several rounds: its tokens, their log-probs, and why it ended.

    It ends at the token that completes a stop string, at EOS, or at its token budget. Each token is decoded on its
    own and added to a short tail of text; the stop strings are ASCII, and an ASCII character is one byte in any
    byte-level vocabulary, so the pieces contain a stop string exactly when the decoded text does. The token that
    completes it is kept whole, even if it carries more characters (`>,`).
    """

    def __init__(self, tokenizer, budget: int, eos_ids: set[int]):
        self.tokenizer, self.budget, self.eos_ids = tokenizer, budget, eos_ids
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.reason: str | None = None  # "tool_call", "answer", "eos" or "length" once it ended
        self._tail = ""

    def add(self, token: int, logprob: float) -> bool:
        """Append a sampled token; True if it ended the segment."""
        self.ids.append(token)
        self.logprobs.append(logprob)
        self._tail = (self._tail + self.tokenizer.decode([token]))[-32:]
        if token in self.eos_ids:
            self.reason = "eos"
        elif stops := [reason for stop, reason in STOP_STRINGS.items() if stop in self._tail]:
            self.reason = stops[0]
        elif len(self.ids) >= self.budget:
            self.reason = "length"
        return self.reason is not None


def sample(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token per row from scores [batch, vocab]: argmax at temperature 0, else a draw from softmax(scores / T)
    restricted to the smallest set of tokens whose probability reaches top_p.

    The draw inverts the cumulative distribution: one uniform number u per row, and the token whose interval
    [c_{i-1}, c_i) of the running sum holds u. That is the same distribution as torch.multinomial, which on a CPU
    draws an exponential variate for every token of the vocabulary (6.1 ms for 6 rows of 49,152 tokens, against
    0.1 ms here: 7% of a decode step of the embedded model). The running sum is taken in float64, so the intervals'
    rounding (~1e-12) moves no measurable mass; a token of probability 0 has an empty interval and is never drawn."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores / temperature, dim=-1)  # [batch, vocab]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [batch, vocab]
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    cumulative = probs.double().cumsum(dim=-1)  # [batch, vocab] c_i
    total = cumulative[:, -1:]  # [batch, 1] c_V
    u = torch.rand(len(probs), 1, dtype=torch.float64, device=probs.device) * total  # [batch, 1]
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # the product can round up to c_V
    return torch.searchsorted(cumulative, u, right=True).squeeze(-1)  # [batch] the first i with c_i > u


@torch.no_grad()
def generate_segments(model, tokenizer, contexts: Sequence[Sequence[int]], segments: Sequence[Segment],
                      config: RolloutConfig, prefix_length: int = 0, prefix=None, logits_processors=(),
                      kept: Sequence[kv_cache.RowCache | None] | None = None) -> list[kv_cache.RowCache]:
    """One round: every context samples the continuation of its segment, all together with a KV cache.

    First every context's new tokens are encoded (`encode`, rows of similar lengths together); then all rows decode
    together, one token per step. Adds to each segment the sampled tokens and log π(token) under the tempered policy
    softmax(logits / T), recorded before any `logits_processors` (callables (ids [batch, width], scores [batch,
    vocab]) -> scores, as in transformers; they see each row's whole context) so they are the model's own. A row
    whose segment ends leaves the batch at once. Once fewer than `config.refill_below` of the rows are still
    sampling while others wait to go on after a tool call, the round stops: the unfinished segments continue in the
    next round, together with those, instead of decoding a long tail at batch size 1 or 2.

    The first `prefix_length` tokens must be the same in every context; their keys and values are `prefix` (a cache
    of one row, from prefix_cache), or are computed once here. `kept[i]` holds the keys and values of context i's
    tokens after the prefix that an earlier round already encoded (None: none); only the rest of the context is
    encoded. Returns every row's keys and values after the prefix at the end of the round: all of its context but
    the last sampled token, whose keys and values the next round computes.
    """
    if prefix is None and prefix_length:
        prefix = kv_cache.prefix_cache(model, torch.tensor([contexts[0][:prefix_length]], device=model.device), rows=1)
    kept = list(kept) if kept is not None else [None] * len(contexts)
    kept = kv_cache.encode(model, contexts, kept, prefix, prefix_length, tokenizer.pad_token_id)
    cache, mask = kv_cache.batch_cache(prefix, kept, prefix_length, room=config.max_new_tokens + 1)  # [B, P + W]
    step_ids = torch.tensor([[context[-1]] for context in contexts], device=model.device)  # [B, 1]
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1).to(model.device)  # [B, P + W + 1]
    step_positions = mask.sum(dim=1, keepdim=True) - 1  # [B, 1]
    ids = kv_cache.pad_batch(contexts, tokenizer.pad_token_id, prefix_length)[0].to(model.device)  # what processors see
    temperature = config.temperature or 1.0
    rows = list(range(len(contexts)))  # index in `segments` of each row still sampling
    out: list[kv_cache.RowCache | None] = [None] * len(contexts)
    while rows:
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                       **kv_cache.with_cache(model, cache), use_cache=True).logits[:, -1].float()  # [active, vocab]
        logprobs = torch.log_softmax(logits / temperature, dim=-1)  # [active, vocab]
        scores = logits
        for processor in logits_processors:
            scores = processor(ids, scores)
        tokens = sample(scores, config.temperature, config.top_p)  # [active]
        token_logprobs = logprobs.gather(-1, tokens[:, None]).squeeze(-1)  # [active]
        keep = [i for i, (row, token, logprob) in enumerate(zip(rows, tokens.tolist(), token_logprobs.tolist()))
                if not segments[row].add(token, logprob)]
        waiting = sum(segment.reason == "tool_call" for segment in segments)
        pause = waiting and len(keep) < config.refill_below * len(contexts)
        staying = set(keep)
        for i, row in enumerate(rows):
            if pause or i not in staying:  # leaving the batch: keep what it encoded for the next round
                out[row] = kv_cache.row_cache(cache, mask, i, prefix_length)
        if pause:
            return out
        step_positions = step_positions + 1  # [active, 1] the new token's position
        ids = torch.cat([ids, tokens[:, None]], dim=1)  # [active, width + 1]
        mask = torch.cat([mask, torch.ones_like(tokens[:, None])], dim=1)  # [active, P + W + steps + 1]
        step_ids = tokens[:, None]  # [active, 1]
        if len(keep) < len(rows):
            index = torch.tensor(keep, dtype=torch.long, device=ids.device)
            cache.batch_select_indices(index)
            ids, mask, step_ids, step_positions = ids[index], mask[index], step_ids[index], step_positions[index]
            rows = [rows[i] for i in keep]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The tool loop
# ----------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def decoding_layout(model):
    """During a rollout on a CPU, each linear layer multiplies by its weight in whichever of three layouts makes a
    decode step's product (a few rows, one token per trajectory) clearly fastest on this machine (`layout_for`,
    measured once per machine for each weight shape):

        rows      as stored, [out, in] row by row: `x @ W.T`, as nn.Linear computes it, through MKL
        columns   the same [out, in] values stored column by column (the transpose contiguous), through MKL
        packed    a copy of the weight reordered into oneDNN's blocked format for products with few rows
                  (torch.ops.mkldnn._reorder_linear_weight), multiplied by oneDNN (_linear_pointwise): the layer's
                  forward is that product while the rollout runs

    The values stay the same (results may differ in the last bits of a float, as with any other kernel), and the
    usual layout and forward are back on leaving.

    Why: how fast a product of a few rows by a weight runs depends on the CPU, the library, the weight's shape and
    layout. On an AVX2 machine, 16 rows by a weight stored row by row took 767 µs against 198 µs stored column by
    column for a 1536 x 576 layer. On an Intel Xeon with AVX-512 some shapes gained from columns (8 rows by 576 x
    576: 59 against 18 µs) and others did not. On an AMD EPYC (Zen 4), where MKL's kernels for few rows are slow,
    oneDNN's packed product of 10 rows took 4.9 ms against 26.4 ms by the 49152 x 576 output layer and 0.15
    against 0.33 ms by 1536 x 576, and a decode step of 10 rows ran in 82 ms against 125 ms. So it is measured,
    not assumed. A packed copy costs the memory of the weights it packs while the rollout runs; the update never
    sees it (it runs outside, and needs gradients, which the packed product has not). Encoding many tokens at
    once runs through the same products as decoding, and a GPU needs none of this, so it is done only here, only
    on a CPU. A tied input embedding shares the output layer's weight: its lookups read the column layout as well,
    and the packed copy is the output layer's alone."""
    moved, packed = {}, []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not (isinstance(module, torch.nn.Linear) and weight.device.type == "cpu" and weight.dim() == 2
                and weight.is_floating_point() and weight.is_contiguous()):
            continue
        layout = layout_for(tuple(weight.shape), weight.dtype)
        if layout == "columns":
            moved[id(weight)] = weight
        elif layout == "packed" and packed_available() and "forward" not in module.__dict__:  # (a forward set
            # on the module itself, by a hook, is left alone)
            reordered = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)
            module.forward = functools.partial(_packed_linear, reordered, module.bias)
            packed.append(module)
    for weight in moved.values():
        weight.data = weight.data.t().contiguous().t()  # the same [out, in] values, stored [in, out]
    try:
        yield
    finally:
        for weight in moved.values():
            weight.data = weight.data.contiguous()
        for module in packed:
            del module.forward  # nn.Linear's own forward again


def _packed_linear(reordered: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T (+ bias) with W in oneDNN's blocked format (from _reorder_linear_weight)."""
    return torch.ops.mkldnn._linear_pointwise(x, reordered, bias, "none", [], "")


LAYOUTS = ("rows", "columns", "packed")


def packed_available() -> bool:
    """Whether this torch has oneDNN's packed linear product (CPU builds with oneDNN have it since torch 2.0)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@functools.cache
def layout_for(shape: tuple[int, int], dtype: torch.dtype) -> str:
    """The layout (LAYOUTS) in which 8 rows (a decode step's batch) by a weight of `shape` [out, in] run clearly
    fastest on this CPU: measured once per machine (`measure_layout`) and kept in the cache folder's
    `weight-layouts.json`, one entry per CPU model, torch version, thread count, shape and dtype.

    Why kept: the layouts run different kernels, which round differently in the last bits, and a timing near a
    threshold decides one way in one process and the other way in the next (on one Xeon the output layer measured
    0.70 to 0.87 of the row layout's time in four processes, against a threshold of 0.8). At temperature 0.7 such
    a difference flips a sampled token sooner or later, so two runs of one seed on one machine would train on
    different samples. With the answer kept, every later process lays the weights out as the first one did, and
    repeats its numbers exactly. A cache that cannot be read is measured again and rewritten (with a warning); one
    that cannot be written leaves the answer to this process."""
    key = (f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
           f"{shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}")
    try:
        path = assets.cache_dir() / "weight-layouts.json"
    except assets.AssetError as error:
        print(f"warning: the weight layouts measured on this machine are not kept ({error})", file=sys.stderr)
        return measure_layout(shape, dtype)
    known = _read_layouts(path)
    if key not in known:
        layout = measure_layout(shape, dtype)
        known = _read_layouts(path) | {key: layout}  # read again: another process may have added its shapes meanwhile
        _write_layouts(path, known)
    return known[key]


def measure_layout(shape: tuple[int, int], dtype: torch.dtype) -> str:
    """The fastest layout for 8 rows by a weight of `shape`: "rows" unless another takes below 0.8 of its time
    (0.8 since laying a weight out costs a copy of it per rollout); the median of 15 to 201 products each, after a
    warm-up (about 2 s in all for the embedded model, most of it its output layer). Its random operands come from a
    generator of its own: a draw from torch's global one would shift the sampling of the run that measures, and
    only that run."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, shape[1], dtype=dtype, generator=generator)
    weight = torch.randn(shape, dtype=dtype, generator=generator)
    products = {"rows": functools.partial(torch.nn.functional.linear, x, weight),
                "columns": functools.partial(torch.nn.functional.linear, x, weight.t().contiguous().t())}
    if packed_available():
        try:
            products["packed"] = functools.partial(
                _packed_linear, torch.ops.mkldnn._reorder_linear_weight(weight, 8), None, x)
            products["packed"]()
        except RuntimeError:  # this dtype or CPU is not one oneDNN's product takes
            del products["packed"]

    def seconds(product):
        start = time.perf_counter()
        product()
        return time.perf_counter() - start

    warm = {layout: min(seconds(product) for _ in range(3)) for layout, product in products.items()}
    # Taken in turns, so that a slower moment of the machine falls on every layout alike; a small weight's product
    # takes microseconds, and more of them are needed for its median to hold still from one process to the next.
    rounds = min(201, max(15, int(0.05 / warm["rows"])))
    times = {layout: [] for layout in products}
    for _ in range(rounds):
        for layout, product in products.items():
            times[layout].append(seconds(product))
    medians = {layout: statistics.median(taken) for layout, taken in times.items()}
    fastest = min(medians, key=medians.get)
    return fastest if medians[fastest] < 0.8 * medians["rows"] else "rows"


def _read_layouts(path: Path) -> dict[str, str]:
    """weight-layouts.json as {key: layout}; {} when it is missing, and when it is not such a file (with a
    warning)."""
    try:
        known = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        print(f"warning: {path}: not a file of weight layouts ({error}); measuring them again", file=sys.stderr)
        return {}
    if not (isinstance(known, dict) and all(v in LAYOUTS for v in known.values())):
        print(f"warning: {path}: not a JSON object of {'/'.join(LAYOUTS)} per weight shape; measuring them again",
              file=sys.stderr)
        return {}
    return known


def _write_layouts(path: Path, known: dict[str, str]) -> None:
    """Replace weight-layouts.json atomically (a reader sees the old file or the new one, never half of one); a
    failure is a warning, and leaves no temporary file behind."""
    temporary = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".layouts-", delete=False) as handle:
            temporary = Path(handle.name)
            json.dump(known, handle, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        print(f"warning: {path}: could not keep the measured weight layouts ({error})", file=sys.stderr)
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def _cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what the platform module knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@torch.no_grad()
def rollout(model, tokenizer, examples: Sequence[Example], tools: Mapping[str, tool_lib.Tool], config: RolloutConfig,
            *, first_group_id: int = 0, logits_processors=(), progress=None) -> list[Trajectory]:
    """G trajectories for each example, in order: example 0's G, then example 1's, ... Example i gets group id
    first_group_id + i (the same for its G samples, distinct across examples). `progress(done)`, when given, hears
    after every round how many trajectories have finished."""
    with decoding_layout(model):
        return _rollout(model, tokenizer, examples, tools, config, first_group_id, logits_processors, progress)


def _rollout(model, tokenizer, examples, tools, config, first_group_id, logits_processors, progress):
    trajectories = []
    for index, example in enumerate(examples):
        ids = prompt_ids(tokenizer, example.question, tools, config)
        trajectories += [Trajectory(example, first_group_id + index, list(ids)) for _ in range(config.group_size)]
    for trajectory in trajectories:
        if len(trajectory.prompt_ids) >= config.max_total_tokens:
            trajectory.stop_reason = "length"
    if not trajectories:
        return []
    prefix_length = kv_cache.shared_prefix_length([t.prompt_ids for t in trajectories])
    prefix_ids = torch.tensor([trajectories[0].prompt_ids[:prefix_length]], device=model.device)
    prefix = kv_cache.prefix_cache(model, prefix_ids, rows=1) if prefix_length else None  # encoded once per rollout
    eos_ids = _eos_ids(model, tokenizer)
    open_segments: dict[int, Segment] = {}  # trajectory index -> the segment it is sampling
    kept: dict[int, kv_cache.RowCache] = {}  # trajectory index -> the keys and values it has encoded so far
    while active := [i for i, t in enumerate(trajectories) if not t.done]:
        for start in range(0, len(active), config.batch_size):
            chunk = active[start:start + config.batch_size]
            for i in chunk:
                used = len(trajectories[i].prompt_ids) + len(trajectories[i].response_ids)
                budget = min(config.max_new_tokens, config.max_total_tokens - used)
                open_segments.setdefault(i, Segment(tokenizer, budget, eos_ids))
            contexts = [trajectories[i].prompt_ids + trajectories[i].response_ids + open_segments[i].ids
                        for i in chunk]
            encoded = generate_segments(model, tokenizer, contexts, [open_segments[i] for i in chunk], config,
                                        prefix_length, prefix, logits_processors, [kept.get(i) for i in chunk])
            for i, encoded_i in zip(chunk, encoded):
                if open_segments[i].reason is not None:
                    _continue(trajectories[i], open_segments.pop(i), tokenizer, tools, config)
                if config.keep_cache and not trajectories[i].done:
                    kept[i] = encoded_i
                else:
                    kept.pop(i, None)
            if progress is not None:
                progress(sum(t.done for t in trajectories))
    for trajectory in trajectories:
        trajectory.text = tokenizer.decode(trajectory.response_ids, skip_special_tokens=True)
        trajectory.answer = tool_lib.extract_answer(trajectory.text) if trajectory.stop_reason == "answer" else None
    return trajectories


def _continue(trajectory: Trajectory, segment: Segment, tokenizer, tools, config: RolloutConfig) -> None:
    """Append a finished segment; then finish the trajectory or run its tool call and append the response."""
    start = len(trajectory.response_ids)
    trajectory.response_ids += segment.ids
    trajectory.loss_mask += [1] * len(segment.ids)
    trajectory.logprobs += segment.logprobs
    trajectory.steps.append((start, len(trajectory.response_ids)))
    if segment.reason != "tool_call":
        trajectory.stop_reason = segment.reason
        return
    if len(trajectory.tool_calls) >= config.max_tool_calls:
        trajectory.stop_reason = "max_tool_calls"
        return
    call = _last_call(tokenizer.decode(segment.ids, skip_special_tokens=True), tools)
    observation, failed = tool_lib.execute(call, tools, config.max_observation_chars)
    response = tokenizer(tool_lib.format_tool_response(observation), add_special_tokens=False).input_ids
    room = config.max_total_tokens - len(trajectory.prompt_ids) - len(trajectory.response_ids)
    if len(response) > room:  # the response does not fit: stop here, without a half response
        trajectory.tool_calls.append(ToolCallRecord(call, observation, failed, len(trajectory.steps) - 1, (-1, -1)))
        trajectory.stop_reason = "length"
        return
    span = (len(trajectory.response_ids), len(trajectory.response_ids) + len(response))
    trajectory.tool_calls.append(ToolCallRecord(call, observation, failed, len(trajectory.steps) - 1, span))
    trajectory.response_ids += response
    trajectory.loss_mask += [0] * len(response)
    trajectory.logprobs += [0.0] * len(response)
    if len(response) == room:  # exactly filled: the response is kept, and there is no room left to generate
        trajectory.stop_reason = "length"


def _last_call(segment_text: str, tools) -> tool_lib.ToolCall:
    """The call this segment ended with (a segment stops at its first `</tool_call>`), read as the reward reads it
    (tools.find_tool_calls), so the call that runs is the call prs.py scores."""
    bodies = tool_lib.find_tool_calls(segment_text)
    if not bodies:
        return tool_lib.ToolCall(segment_text, error="found </tool_call> without an opening <tool_call>")
    return tool_lib.parse_tool_call(bodies[-1], tools)


# ----------------------------------------------------------------------------------------------------------------------
# Tensors for the update, and log-probs under any model
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TokenBatch:
    """Trajectories as tensors. The full sequences are laid out [shared prefix | padding | own tokens] (pad_batch);
    everything per response token is [N, R] with the response left-aligned (column j = response token j), R the
    longest response."""

    input_ids: torch.Tensor  # [N, L] prompt + response
    attention_mask: torch.Tensor  # [N, L]
    response_ids: torch.Tensor  # [N, R]
    response_mask: torch.Tensor  # [N, R] 1 on real response tokens (sampled or tool)
    loss_mask: torch.Tensor  # [N, R] 1 on sampled tokens only
    sampling_logprobs: torch.Tensor  # [N, R]
    prefix_length: int = 0  # P: the first P columns hold the same prompt tokens in every row

    def to(self, device) -> "TokenBatch":
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "prefix_length"}
        return dataclasses.replace(self, **{name: tensor.to(device) for name, tensor in tensors.items()})

    def __getitem__(self, rows: slice | list[int]) -> "TokenBatch":
        """Rows `rows` (a slice or a list of indices), without the columns none of them uses (so short rows do not pay
        for long ones)."""
        own = int(self.attention_mask[rows, self.prefix_length:].sum(dim=1).max())  # the longest own part
        response = max(1, int(self.response_mask[rows].sum(dim=1).max()))  # the longest response
        width = self.input_ids.shape[1]
        columns = torch.cat([torch.arange(self.prefix_length), torch.arange(width - own, width)])
        return TokenBatch(self.input_ids[rows][:, columns], self.attention_mask[rows][:, columns],
                          self.response_ids[rows, :response], self.response_mask[rows, :response],
                          self.loss_mask[rows, :response], self.sampling_logprobs[rows, :response], self.prefix_length)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(trajectories: Sequence[Trajectory], pad_id: int) -> TokenBatch:
    prefix_length = kv_cache.shared_prefix_length([t.prompt_ids for t in trajectories])
    input_ids, attention_mask = kv_cache.pad_batch([t.prompt_ids + t.response_ids for t in trajectories], pad_id,
                                          prefix_length)
    width = max(1, max(len(t.response_ids) for t in trajectories))

    def right_pad(rows, value, dtype):
        out = torch.full((len(rows), width), value, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=dtype)
        return out

    return TokenBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_ids=right_pad([t.response_ids for t in trajectories], pad_id, torch.long),
        response_mask=right_pad([[1] * len(t.response_ids) for t in trajectories], 0, torch.long),
        loss_mask=right_pad([t.loss_mask for t in trajectories], 0, torch.long),
        sampling_logprobs=right_pad([t.logprobs for t in trajectories], 0.0, torch.float32),
        prefix_length=prefix_length,
    )


def response_logprobs(model, batch: TokenBatch, temperature: float = 1.0, with_entropy: bool = False,
                      share_prefix: bool = True, prefix=None):
    """log π(y_j | everything before it) for every token y_j the policy sampled (loss_mask 1): [N, R], column j =
    response token j, 0 on tool-response tokens and padding; with gradients if enabled. Also the per-token entropy of
    π at those tokens [N, R] when asked.

    The transformer runs over every token (tool responses are context), but the output layer and the softmax over
    the vocabulary only at the positions that predict a sampled token: the prompt's and the tool responses' logits
    are never computed. With `share_prefix`, the batch's shared prompt prefix is encoded once and its keys and values
    reused by every row; the result is the same as one full forward pass (a test checks it). It is off for a model in
    training mode with activation checkpointing, where transformers drops the cache a forward pass is given.
    `prefix` (from encode_prefix) saves encoding the prefix again when the batch is one micro-batch of a larger one.
    """
    if model.training and _checkpointing(model):
        share_prefix = False
    start = batch.prefix_length if share_prefix else 0
    cache = kv_cache.prefix_cache(model, batch.input_ids[:1, :start], len(batch), prefix) if start else None
    hidden = model.base_model(input_ids=batch.input_ids[:, start:], attention_mask=batch.attention_mask,
                              position_ids=kv_cache.positions(batch.attention_mask)[:, start:],
                              **kv_cache.with_cache(model.base_model, cache),
                              use_cache=cache is not None).last_hidden_state  # [N, L - start, H]
    rows, columns = batch.loss_mask.nonzero(as_tuple=True)  # [K], [K]: every sampled token
    # Row r's response token j sits at input position L - n_r + j (responses are right-aligned in input_ids); the
    # output one position earlier predicts it. n_r: the row's response length.
    lengths = batch.response_mask.sum(dim=1)  # [N]
    predicting = hidden.shape[1] - lengths[rows] + columns - 1  # [K]
    logits = model.get_output_embeddings()(hidden[rows, predicting]).float() / temperature  # [K, V]
    # cross_entropy is -log_softmax gathered at the target, fused: much less memory traffic over the vocabulary.
    nll = torch.nn.functional.cross_entropy(logits, batch.response_ids[rows, columns], reduction="none")  # [K]
    token_logprobs = torch.zeros(batch.response_ids.shape, dtype=nll.dtype, device=nll.device)  # [N, R]
    token_logprobs = token_logprobs.index_put((rows, columns), -nll)  # [N, R]
    if not with_entropy:
        return token_logprobs
    with torch.no_grad():  # a diagnostic: no gradient, no graph kept; 1024 tokens at a time bound its memory
        entropy = torch.zeros(len(rows), dtype=logits.dtype, device=logits.device)  # [K]
        for first in range(0, len(rows), 1024):
            logp = torch.log_softmax(logits[first:first + 1024], dim=-1)  # [k, V]
            entropy[first:first + 1024] = -(logp.exp() * logp).sum(dim=-1)  # [k]
    return token_logprobs, torch.zeros_like(token_logprobs).index_put((rows, columns), entropy)  # [N, R], [N, R]


def _checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on; transformers 5 renamed the attribute."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(model, "is_gradient_checkpointing", False))


@torch.no_grad()
def recompute_logprobs(model, batch: TokenBatch, micro_batch_size: int = 8, temperature: float = 1.0,
                       share_prefix: bool = True) -> torch.Tensor:
    """[N, R] log-probs of the response tokens under `model`, without gradients, `micro_batch_size` rows at a time
    (on the CPU, whatever the model's device); the shared prompt prefix is encoded once for all of them."""
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float32)  # [N, R]
    device = next(model.parameters()).device
    prefix = encode_prefix(model, batch) if share_prefix else None
    for start in range(0, len(batch), micro_batch_size):
        micro = batch[start:start + micro_batch_size].to(device)
        logprobs = response_logprobs(model, micro, temperature, share_prefix=share_prefix, prefix=prefix)  # [n, r]
        out[start:start + len(micro), :logprobs.shape[1]] = logprobs.float().cpu()
    return out
