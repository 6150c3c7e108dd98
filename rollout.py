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
copied into every row (that prefix is most of a prompt). Rows leave the batch as their segments end and come back in
the next round, encoded again with whatever they gained; padding the attention mask hides lets rows of any length
share a batch. kv_cache.py holds the keys and values; this file the loop around them. Nothing here is tuned for a
kind of CPU.

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

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from transformers.cache_utils import DynamicCache

import kv_cache
import tools as tool_lib

if TYPE_CHECKING:  # annotations only: rollout.py runs without data.py (any object with .question will do)
    from data import Example

STOP_STRINGS = {tool_lib.TOOL_CALL_CLOSE: "tool_call", tool_lib.ANSWER_CLOSE: "answer"}
STOP_REASONS = ("answer", "eos", "length", "max_tool_calls")


# ---- Settings and records ----
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


# ---- The prompt ----
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


# ---- One round of generation: a plain sampling loop over the active rows ----
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
    """One model segment being sampled: its tokens, their log-probs, and why it ended.

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
    restricted to the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores / temperature, dim=-1)  # [batch, vocab]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [batch, vocab]
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)  # [batch]


@torch.no_grad()
def generate_segments(model, tokenizer, contexts: Sequence[Sequence[int]], segments: Sequence[Segment],
                      config: RolloutConfig, prefix_length: int = 0, prefix=None, logits_processors=()) -> None:
    """One round: every context samples the continuation of its segment, all together with a KV cache.

    First every context is encoded (kv_cache.encode: the shared prefix copied in, each row's own tokens after it);
    then all rows decode together, one token per step. Adds to each segment the sampled tokens and log π(token) under
    the tempered policy softmax(logits / T), recorded before any `logits_processors` (callables (ids [batch, width],
    scores [batch, vocab]) -> scores, as in transformers; they see each row's whole context) so they are the model's
    own. A row whose segment ends leaves the batch at once; the round ends when the last one does.

    The first `prefix_length` tokens must be the same in every context; their keys and values are `prefix` (a cache
    of one row, from kv_cache.prefix_cache), or are computed once here.
    """
    if prefix is None and prefix_length:
        prefix = kv_cache.prefix_cache(model, torch.tensor([contexts[0][:prefix_length]], device=model.device), rows=1)
    cache, mask = kv_cache.encode(model, contexts, prefix, prefix_length, tokenizer.pad_token_id)  # mask [B, P + W]
    step_ids = torch.tensor([[context[-1]] for context in contexts], device=model.device)  # [B, 1]
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [B, P + W + 1]
    step_positions = mask.sum(dim=1, keepdim=True) - 1  # [B, 1]
    ids = kv_cache.pad_batch(contexts, tokenizer.pad_token_id, prefix_length)[0].to(model.device)  # what processors see
    temperature = config.temperature or 1.0
    rows = list(range(len(contexts)))  # index in `segments` of each row still sampling
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
        step_positions = step_positions + 1  # [active, 1] the new token's position
        ids = torch.cat([ids, tokens[:, None]], dim=1)  # [active, width + 1]
        mask = torch.cat([mask, torch.ones_like(tokens[:, None])], dim=1)  # [active, P + W + steps + 1]
        step_ids = tokens[:, None]  # [active, 1]
        if len(keep) < len(rows):
            index = torch.tensor(keep, dtype=torch.long, device=ids.device)
            cache.batch_select_indices(index)
            ids, mask, step_ids, step_positions = ids[index], mask[index], step_ids[index], step_positions[index]
            rows = [rows[i] for i in keep]


# ---- The tool loop ----
@torch.no_grad()
def rollout(model, tokenizer, examples: Sequence[Example], tools: Mapping[str, tool_lib.Tool], config: RolloutConfig,
            *, first_group_id: int = 0, logits_processors=(), progress=None) -> list[Trajectory]:
    """G trajectories for each example, in order: example 0's G, then example 1's, ... Example i gets group id
    first_group_id + i (the same for its G samples, distinct across examples). `progress(done)`, when given, hears
    after every round how many trajectories have finished."""
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
    while active := [i for i, t in enumerate(trajectories) if not t.done]:  # a round: every active one's next segment
        for start in range(0, len(active), config.batch_size):
            chunk = [trajectories[i] for i in active[start:start + config.batch_size]]
            segments = [Segment(tokenizer, min(config.max_new_tokens, config.max_total_tokens - len(t.prompt_ids)
                                               - len(t.response_ids)), eos_ids) for t in chunk]
            generate_segments(model, tokenizer, [t.prompt_ids + t.response_ids for t in chunk], segments, config,
                              prefix_length, prefix, logits_processors)
            for trajectory, segment in zip(chunk, segments):
                _continue(trajectory, segment, tokenizer, tools, config)
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


# ---- Tensors for the update, and log-probs under any model ----
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
