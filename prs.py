"""Progressive Reward Shaping (PRS), arXiv 2512.07478, as specified in METHOD.md §2 (docs/METHOD.md).

PRS replaces a binary outcome reward with a dense, staged one. The paper (only its abstract is public) says the agent
should "first master parseable and properly formatted tool calls, then optimize for factual correctness and answer
quality"; short-form answers are scored with a length-aware BLEU "to fairly score concise answers", long-form answers
with an LLM judge "to prevent reward hacking". The baselines are binary: exact match (short-form) and judge
match/mismatch (long-form). Everything else below is our reading (METHOD.md §2), marked `# OUR READING:` in the code.

A response is what the agent produced after the prompt, with the environment's tool responses interleaved (tools.py):
`<think>…</think><tool_call>{json}</tool_call>\\n<tool_response>\\n…\\n</tool_response>\\n …<answer>…</answer>`.
Scoring reads the response alone, never the prompt (METHOD.md §6: Search-R1's extractor counted the prompt's
example).

Short-form stages, each a score s_k in [0, 1]:

    format      s_f = 1 if the response is well formed (format_score), else 0
    tool_call   s_t = (# calls that parse and validate) / (# calls);  0 with no call when a tool is required
    evidence    s_e = 1 if some tool response contains a gold answer (normalized, whole words), else 0
    answer      s_a = max over gold aliases g of LA-BLEU(normalize(answer), normalize(g));  0 for no or empty answer

Progressive gating (a stage counts once the stages before it passed), with [x] = 1 if x else 0:

    s~_f = s_f      s~_t = s_t [s_f = 1]      s~_e = s_e [s_f = 1] [s_t = 1]      s~_a = s_a [s_f = 1] [s_t = 1]

Schedule over training steps, from format-heavy to answer-heavy, and the reward:

    p = clip(step / max(total_steps - 1, 1), 0, 1)  w = (1 - p) w_start + p w_end,    sum_k w_k = 1
    R = sum_k w_k s~_k  in [0, 1]                   R = 1 for a well-formed, tool-grounded, exactly right answer

Length-aware BLEU of a hypothesis of c tokens against a reference of r tokens (sacrebleu's 13a tokens):

    N*     = min(4, c, r)                                          effective order
    BLEU*  = BP exp( sum_{n <= N*} log p_n / N* )                  sacrebleu's sentence BLEU of order N*, exp smoothing
    BP     = exp(1 - r / c) if c < r else 1                        sacrebleu's brevity penalty (too short)
    LP     = exp(1 - c / r) if c > r else 1                        the other side of the length factor (too long)
    LA-BLEU = BLEU* LP = exp( sum_{n <= N*} log p_n / N* ) exp(1 - max(c, r) / min(c, r))    = 1 for an exact match

Long-form: stages format and tool_call as above, then `judge` = an LLM judge's score in [0, 1] of the final answer
against the reference (gated like `answer`), on its own format-heavy to judge-heavy schedule. A judge that fails or
answers garbage leaves the sample unscored (total None), never 0. The judge is any object with a
`score_batch` method (the `AnswerJudge` protocol below); judge.py holds one over an OpenAI-compatible endpoint.

PRS for other trainers (TRL's reward function, verl's compute_score) is in prs_adapters.py.
"""


import functools
import math
import numbers
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from sacrebleu.metrics import BLEU

try:
    import tools  # noqa: F401
except ModuleNotFoundError:  # loaded by its path (verl's custom_reward_function.path does not put its folder on
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # sys.path): tools.py is read from beside it
from tools import (ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN,
                   TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, Tool, contains_words, extract_answer, find_blocks,
                   find_tool_calls, normalize_answer, parse_tool_call, search_tool)  # search_tool: the examples'


class AnswerJudge(Protocol):
    """What the long-form rewards need of a judge: scores in [0, 1] of (question, reference, answer) items, in
    order, None for an item it could not score. judge.Judge is one (an LLM over an OpenAI-compatible endpoint)."""

    def score_batch(self, items: Sequence[tuple[str, str, str]]) -> list[float | None]: ...


def judge_scores(judge: AnswerJudge, items: Sequence[tuple[str, str, str]]) -> list[float | None]:
    """judge.score_batch(items), checked: one score per item, and a score that is not a number in [0, 1] (NaN from
    a custom judge, say) is None, unscored, never a silent 0 or an advantage of NaN.

    >>> class OddJudge:
    ...     def score_batch(self, items): return [0.5, float("nan"), 3.0, None]
    >>> judge_scores(OddJudge(), [("Q?", "R.", "A.")] * 4)
    [0.5, None, None, None]
    """
    scores = list(judge.score_batch(items))
    if len(scores) != len(items):
        raise ValueError(f"the judge returned {len(scores)} score(s) for {len(items)} answers")
    return [float(s) if isinstance(s, numbers.Real) and not isinstance(s, bool) and 0.0 <= s <= 1.0 else None
            for s in scores]


# OUR READING: the paper gives no weights. At the start, format and tool calls carry 0.7 so that a small model first
# learns to call tools; at the end the answer carries 0.8, so a well-formed, grounded, wrong answer earns at most 0.2.
SHORT_FORM_START = {"format": 0.4, "tool_call": 0.3, "evidence": 0.1, "answer": 0.2}
SHORT_FORM_END = {"format": 0.05, "tool_call": 0.05, "evidence": 0.1, "answer": 0.8}
LONG_FORM_START = {"format": 0.5, "tool_call": 0.3, "judge": 0.2}
LONG_FORM_END = {"format": 0.1, "tool_call": 0.1, "judge": 0.8}

# A stage counts only once every stage listed for it passed (scored 1). METHOD.md §2.2.
# OUR READING: `answer` is gated on format and tool_call but not on evidence. The retriever often misses the gold
# page (top-3 BM25 or E5 over Wikipedia); a correct answer after a miss is still correct, and zeroing it would teach
# the policy that knowing the answer does not pay. `prs_reward(answer_needs_evidence=True)` gates it on evidence too.
SHORT_FORM_GATES = {"format": (), "tool_call": ("format",), "evidence": ("format", "tool_call"),
                    "answer": ("format", "tool_call")}
LONG_FORM_GATES = {"format": (), "tool_call": ("format",), "judge": ("format", "tool_call")}


# ---- Answers: exact match and token F1 (normalization and extraction live with the format, in tools.py) ----


def _aliases(answers) -> list[str]:
    """Gold answers as a list of strings: one string, a list (or array) of aliases, or Search-R1's {"target": [...]}."""
    if isinstance(answers, Mapping):
        if "target" not in answers:
            raise ValueError(f"gold answers given as a dict need a 'target' list (Search-R1), got keys {list(answers)}")
        answers = answers["target"]
    if isinstance(answers, str):
        return [answers]
    return [str(answer) for answer in answers]


def exact_match(prediction: str | None, answers) -> float:
    """Exact match after normalization, max over gold aliases (the binary baseline's metric, METHOD.md §2.5).

    An empty or missing prediction never matches, not even an empty gold answer.

    >>> exact_match("the Nile.", ["Nile River", "Nile"]), exact_match("", [""]), exact_match("Nile river", "Amazon")
    (1.0, 0.0, 0.0)
    """
    prediction = normalize_answer(prediction or "")
    if not prediction:
        return 0.0
    return float(any(prediction == normalize_answer(gold) for gold in _aliases(answers)))


def token_f1(prediction: str | None, answers) -> float:
    """SQuAD token F1 over normalized words, max over gold aliases (an evaluation metric, not a reward stage).

    >>> round(token_f1("the river Nile in Egypt", ["Nile River"]), 4)
    0.6667
    """
    predicted = normalize_answer(prediction or "").split()
    best = 0.0
    for gold in _aliases(answers):
        expected = normalize_answer(gold).split()
        common = sum((Counter(predicted) & Counter(expected)).values())
        if common:
            precision, recall = common / len(predicted), common / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best




# ---- Length-aware BLEU (METHOD.md §2.3) on sacrebleu's tokenizer and n-gram statistics ----
@functools.lru_cache(maxsize=None)
def _bleu_metric(max_order: int, smooth_method: str, smooth_value: float | None, tokenize: str,
                 lowercase: bool) -> BLEU:
    return BLEU(max_ngram_order=max_order, effective_order=True, smooth_method=smooth_method,
                smooth_value=smooth_value, tokenize=tokenize, lowercase=lowercase)


def la_bleu(hypothesis: str, references, *, max_order: int = 4, smooth_method: str = "exp",
            smooth_value: float | None = None, tokenize: str = "13a", lowercase: bool = False) -> float:
    """Length-aware BLEU in [0, 1], max over references (module docstring, LA-BLEU).

    Plain sentence BLEU-4 gives 0 to a correct 1-3 token answer; here the order is cut to N* = min(4, c, r) and the
    length factor is two-sided, so a concise exact answer scores 1 and padding is not free. Where N* = 4 and the
    hypothesis is not longer than the reference, this is sacrebleu's `sentence_bleu(hypothesis, [reference])` / 100.

    >>> la_bleu("Nile", ["Nile"]), round(la_bleu("the Nile", ["Nile"]), 4), la_bleu("", ["Nile"])
    (1.0, 0.1839, 0.0)
    >>> round(la_bleu("the cat sat on the mat", ["the cat is on the mat"]), 4)  # sacrebleu: 37.99
    0.3799
    """
    return max((_la_bleu_one(hypothesis, reference, max_order, smooth_method, smooth_value, tokenize, lowercase)
                for reference in _aliases(references)), default=0.0)


def _la_bleu_one(hypothesis: str, reference: str, max_order: int, smooth_method: str, smooth_value: float | None,
                 tokenize: str, lowercase: bool) -> float:
    tokenizer = _bleu_metric(max_order, smooth_method, smooth_value, tokenize, lowercase).tokenizer
    hyp_len = len(tokenizer(hypothesis.rstrip()).split())  # c, counted as sacrebleu counts
    ref_len = len(tokenizer(reference.rstrip()).split())  # r
    if hyp_len == 0 or ref_len == 0:
        return 0.0
    # OUR READING: cap the order at both lengths; a 2-token reference has no 3-grams to match. Smoothing is "exp"
    # (NIST, sacrebleu's sentence_bleu default), so that with N* = 4 and c <= r this is sacrebleu's sentence BLEU.
    order = min(max_order, hyp_len, ref_len)
    bleu = _bleu_metric(order, smooth_method, smooth_value, tokenize, lowercase).sentence_score(hypothesis, [reference])
    # OUR READING: sacrebleu's brevity penalty exp(1 - r/c) is the too-short half of the length factor; its mirror
    # exp(1 - c/r) is the too-long half, so "Paris Paris Paris" or a list of candidates does not score like "Paris".
    too_long = math.exp(1 - hyp_len / ref_len) if hyp_len > ref_len else 1.0
    return min(1.0, bleu.score / 100 * too_long)  # min: sacrebleu's exp(log(100)) is 100.00000000000004


# ---- The short-form stages (METHOD.md §2.1) ----
_TAG = re.compile("|".join(re.escape(tag) for tag in (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE,
                                                       TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE, ANSWER_OPEN,
                                                       ANSWER_CLOSE)))
_BLOCKS = {THINK_OPEN: ("think", THINK_CLOSE), TOOL_CALL_OPEN: ("tool_call", TOOL_CALL_CLOSE),
           TOOL_RESPONSE_OPEN: ("tool_response", TOOL_RESPONSE_CLOSE), ANSWER_OPEN: ("answer", ANSWER_CLOSE)}
# OUR READING: between a call and its response only the environment writes. Our rollout writes whitespace; a chat
# template (TRL, verl) may leave the role of the tool turn, e.g. Qwen2.5's "user", once special tokens are removed.
_CALL_RESPONSE_GAPS = ("", "user", "tool")


@dataclass(frozen=True)
class _Block:
    kind: str  # think | tool_call | tool_response | answer
    body: str
    before: str  # the free text between the previous block and this one


def _split_blocks(response: str) -> tuple[list[_Block], str] | None:
    """The response as its tagged blocks and the text after the last one; None if tags are unbalanced or nested.

    A tool response's body is the environment's text and may hold anything; every other body holds no tag.
    """
    blocks, position = [], 0
    while match := _TAG.search(response, position):
        if match.group() not in _BLOCKS:
            return None  # a closing tag with nothing open
        kind, close_tag = _BLOCKS[match.group()]
        close_at = response.find(close_tag, match.end())
        if close_at == -1:
            return None  # never closed
        body = response[match.end():close_at]
        if kind != "tool_response" and _TAG.search(body):
            return None  # nested or interleaved tags
        blocks.append(_Block(kind, body, response[position:match.start()]))
        position = close_at + len(close_tag)
    return blocks, response[position:]


def format_score(response: str) -> float:
    """Stage 1, `format` (METHOD.md §2.1): 1.0 if the response is well formed, else 0.0.

    Well formed: every tag is closed, tags do not nest, each tool response comes right after a tool call and each tool
    call gets its response, there is exactly one `<answer>`, it is not empty and it is the last block with nothing but
    whitespace after it. `<think>` is optional and may repeat.

    >>> call = '<tool_call>{"name": "search", "arguments": {"query": "Nile"}}</tool_call>'
    >>> format_score(f"<think>Look it up.</think>{call}\\n<tool_response>\\nThe Nile...\\n</tool_response>\\n"
    ...              "<answer>Nile</answer>")
    1.0
    >>> format_score("<answer>Nile</answer> Hope this helps!"), format_score("<answer></answer>")
    (0.0, 0.0)
    """
    split = _split_blocks(response)
    if split is None:
        return 0.0
    blocks, tail = split
    kinds = [block.kind for block in blocks]
    # OUR READING: free text between blocks is allowed (`<think>` is optional, models often think out loud), but
    # nothing may follow the answer: text there is unscored and is where a policy would hide a second answer.
    answer_last = kinds.count("answer") == 1 and kinds[-1] == "answer" and not tail.strip()
    # OUR READING: an empty answer is not an answer (Visual-RFT#176 scored `<answer></answer>` as correct).
    answer_filled = answer_last and blocks[-1].body.strip() != ""
    # OUR READING: every call must get its response: the environment answers each complete call, so a call without
    # one comes from a truncated or hand-made trajectory, not from a rollout that then answered.
    calls_answered = all(_is_pair(blocks, i) for i, kind in enumerate(kinds) if kind == "tool_call")
    responses_asked = all(_is_pair(blocks, i - 1) for i, kind in enumerate(kinds) if kind == "tool_response")
    return float(answer_filled and calls_answered and responses_asked)


def _is_pair(blocks: list[_Block], i: int) -> bool:
    """Block i is a tool call and block i + 1 its tool response, with only the environment's gap between them."""
    return (0 <= i < len(blocks) - 1 and blocks[i].kind == "tool_call" and blocks[i + 1].kind == "tool_response"
            and blocks[i + 1].before.strip() in _CALL_RESPONSE_GAPS)


def tool_call_score(response: str, tools: Mapping[str, Tool], *, require_tool: bool = True,
                    no_call_score: float = 1.0) -> float:
    """Stage 2, `tool_call` (METHOD.md §2.1): the fraction of tool calls that parse and validate
    (tools.parse_tool_call).

    With no call: 0.0 when a tool is required, else `no_call_score`.

    >>> registry = {"search": search_tool(lambda query, k: [])}
    >>> good, bad = '{"name": "search", "arguments": {"query": "Nile"}}', '{"name": "search", "query": "Nile"}'
    >>> tool_call_score(f"<tool_call>{good}</tool_call><tool_call>{bad}</tool_call>", registry)
    0.5
    >>> tool_call_score("<answer>Nile</answer>", registry), tool_call_score("", registry, require_tool=False)
    (0.0, 1.0)
    """
    calls = [parse_tool_call(body, tools) for body in find_tool_calls(response)]
    if not calls:
        # OUR READING: where the task does not require a tool, answering without one breaks no rule, so the gate
        # opens (1.0); the evidence stage still stays 0, so a closed-book answer tops out at 1 - w_evidence.
        return 0.0 if require_tool else no_call_score
    return sum(call.ok for call in calls) / len(calls)




def evidence_score(response: str, answers) -> float:
    """Stage 3, `evidence` (METHOD.md §2.1): 1.0 if some tool response contains a gold answer (normalized, whole
    words), else 0.0. Only the environment's tool responses count, never the model's own text.

    >>> evidence_score("<tool_response>\\nDoc 1 (Title: Nile) The Nile is the longest.\\n</tool_response>", "nile")
    1.0
    >>> evidence_score("<tool_response>\\nDoc 1 (Title: Nilehouse) Nilehouse is a pub.\\n</tool_response>", ["Nile"])
    0.0
    """
    golds = _aliases(answers)
    tool_responses = find_blocks(response, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)
    return float(any(contains_words(body, gold) for body in tool_responses for gold in golds))


def answer_score(answer: str | None, answers, **bleu_options) -> float:
    """Stage 4, `answer` (METHOD.md §2.1): LA-BLEU of the normalized answer against the normalized gold answers, max
    over aliases; 0.0 for a missing or empty answer. `bleu_options` go to `la_bleu`.

    >>> answer_score("The Nile.", ["Nile"]), round(answer_score("Nile river", ["Nile"]), 4), answer_score("", [""])
    (1.0, 0.1839, 0.0)
    """
    # OUR READING: normalize both sides as exact match does, so that EM = 1 always gives answer = 1.
    hypothesis = normalize_answer(answer or "")
    return la_bleu(hypothesis, [normalize_answer(gold) for gold in _aliases(answers)], **bleu_options)


# ---- Schedule, gating and the staged reward (METHOD.md §2.2) ----
def stage_weights(step: int, total_steps: int, start: Mapping[str, float] = SHORT_FORM_START,
                  end: Mapping[str, float] = SHORT_FORM_END) -> dict[str, float]:
    """The stage weights at a training step: a linear move from `start` (step 0) to `end` (step total_steps - 1 and
    after). Weights are relative: each vector is normalized, so the result always sums to 1.

    >>> stage_weights(0, 100)
    {'format': 0.4, 'tool_call': 0.3, 'evidence': 0.1, 'answer': 0.2}
    >>> {stage: round(weight, 3) for stage, weight in stage_weights(99, 100).items()}
    {'format': 0.05, 'tool_call': 0.05, 'evidence': 0.1, 'answer': 0.8}
    """
    if set(start) != set(end):
        raise ValueError(f"start and end weights must name the same stages, got {sorted(start)} and {sorted(end)}")
    start, end = _normalized(start, "start"), _normalized(end, "end")
    # OUR READING: the paper names a curriculum but no schedule; linear interpolation has two knobs (start, end).
    progress = min(1.0, max(0.0, step / max(total_steps - 1, 1)))
    return {stage: (1 - progress) * start[stage] + progress * end[stage] for stage in start}


def _normalized(weights: Mapping[str, float], name: str) -> dict[str, float]:
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"{name} weights must be finite, non-negative and not all 0, got {dict(weights)}")
    total = sum(weights.values())
    return {stage: weight / total for stage, weight in weights.items()}


def gate(scores: Mapping[str, float], prerequisites: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Progressive gating: a stage's score counts only if every stage it depends on scored 1, else it counts 0.

    >>> gate({"format": 1.0, "tool_call": 0.5, "answer": 1.0},
    ...      {"format": (), "tool_call": ("format",), "answer": ("format", "tool_call")})
    {'format': 1.0, 'tool_call': 0.5, 'answer': 0.0}
    """
    return {stage: score if all(scores[before] == 1.0 for before in prerequisites[stage]) else 0.0
            for stage, score in scores.items()}


def weighted_total(gated: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """R = sum_k w_k s~_k for weights summing to 1, in [0, 1], and exactly 1.0 when every stage scores 1.

    >>> weighted_total({"format": 1.0, "answer": 0.5}, {"format": 0.2, "answer": 0.8})
    0.6
    """
    # Written as 1 - sum_k w_k (1 - s~_k), equal to sum_k w_k s~_k since sum_k w_k = 1, so that rounding in the
    # weights cannot turn a perfect response into 0.9999999999999999.
    return max(0.0, 1.0 - sum(weights[stage] * (1.0 - score) for stage, score in gated.items()))


@dataclass(frozen=True)
class RewardResult:
    """One response's reward and how it was made, for the update and for logging."""

    total: float | None  # the reward in [0, 1]; None = unscored (the judge failed): leave the sample out, count it
    stages: dict[str, float | None]  # every stage's raw score before gating; None = the judge was not asked
    answer: str | None  # the extracted final answer
    gated: dict[str, float] = field(default_factory=dict)  # each stage's score as it counted, after gating
    weights: dict[str, float] = field(default_factory=dict)  # the schedule's weights at this step
    exact_match: float | None = None  # EM of the answer (short-form), for logging next to the shaped reward


def prs_reward(response: str, answers, tools: Mapping[str, Tool], *, step: int, total_steps: int,
               require_tool: bool = True, no_call_score: float = 1.0, answer_needs_evidence: bool = False,
               start: Mapping[str, float] = SHORT_FORM_START, end: Mapping[str, float] = SHORT_FORM_END,
               ) -> RewardResult:
    """The short-form PRS reward (METHOD.md §2): stages format, tool_call, evidence, answer; gated; scheduled.

    >>> registry = {"search": search_tool(lambda query, k: [])}
    >>> response = ('<think>Which river?</think><tool_call>{"name": "search", "arguments": {"query": "longest river"}}'
    ...             '</tool_call>\\n<tool_response>\\nDoc 1 (Title: Nile) The Nile is the longest river.\\n'
    ...             '</tool_response>\\n<answer>the Nile river</answer>')
    >>> result = prs_reward(response, ["Nile"], registry, step=0, total_steps=100)
    >>> {stage: round(score, 4) for stage, score in result.stages.items()}, round(result.total, 4)
    ({'format': 1.0, 'tool_call': 1.0, 'evidence': 1.0, 'answer': 0.1839}, 0.8368)
    >>> round(prs_reward(response, ["Nile"], registry, step=99, total_steps=100).total, 4)
    0.3472
    """
    answer = extract_answer(response)
    stages = {"format": format_score(response),
              "tool_call": tool_call_score(response, tools, require_tool=require_tool, no_call_score=no_call_score),
              "evidence": evidence_score(response, answers),
              "answer": answer_score(answer, answers)}
    prerequisites = dict(SHORT_FORM_GATES)
    if answer_needs_evidence:
        prerequisites["answer"] += ("evidence",)
    gated = gate(stages, prerequisites)
    weights = stage_weights(step, total_steps, start, end)
    return RewardResult(weighted_total(gated, weights), stages, answer, gated, weights, exact_match(answer, answers))


def binary_reward(response: str, answers) -> RewardResult:
    """The short-form baseline (METHOD.md §2.5): exact match of the final answer, 0 or 1; no format or tool checks.

    >>> binary_reward("<answer>The Nile</answer>", ["Nile"]).total, binary_reward("Nile", ["Nile"]).total
    (1.0, 0.0)
    """
    answer = extract_answer(response)
    em = exact_match(answer, answers)
    return RewardResult(em, {"exact_match": em}, answer, exact_match=em)


# ---- Long-form: format and tool calls, then an LLM judge's verdict (METHOD.md §2.4) ----
def prs_longform_rewards(responses: Sequence[str], questions: Sequence[str], references: Sequence[str],
                         judge: AnswerJudge, tools: Mapping[str, Tool], *, step: int, total_steps: int,
                         require_tool: bool = True, no_call_score: float = 1.0,
                         start: Mapping[str, float] = LONG_FORM_START,
                         end: Mapping[str, float] = LONG_FORM_END) -> list[RewardResult]:
    """The long-form PRS reward of a batch (METHOD.md §2.4): stages format, tool_call, judge; gated; scheduled.

    The judge sees only the question, the reference and the extracted final answer, in one concurrent batch. A
    response whose judge stage is gated off (format or tool calls not passed) is not sent to the judge: its total is
    known without it and `stages["judge"]` is None. A judged response the judge could not score has total None.

    >>> class HalfJudge:  # anything with AnswerJudge.score_batch; this one gives every answer 0.5
    ...     def score_batch(self, items): return [0.5] * len(items)
    >>> registry = {"search": search_tool(lambda query, k: [])}
    >>> searched = ('<tool_call>{"name": "search", "arguments": {"query": "Hamlet author"}}</tool_call>\\n'
    ...             '<tool_response>\\nDoc 1 (Title: Hamlet) ...\\n</tool_response>\\n<answer>Shakespeare.</answer>')
    >>> results = prs_longform_rewards([searched, "<answer>Shakespeare.</answer>"], ["Who wrote Hamlet?"] * 2,
    ...                                ["William Shakespeare."] * 2, HalfJudge(), registry, step=0, total_steps=10)
    >>> [(r.stages, r.total) for r in results]
    [({'format': 1.0, 'tool_call': 1.0, 'judge': 0.5}, 0.9), ({'format': 1.0, 'tool_call': 0.0, 'judge': None}, 0.5)]
    """
    weights = stage_weights(step, total_steps, start, end)
    answers = [extract_answer(response) for response in responses]
    stages = [{"format": format_score(response),
               "tool_call": tool_call_score(response, tools, require_tool=require_tool, no_call_score=no_call_score)}
              for response in responses]
    # OUR READING: a gated-off judge stage counts 0 whatever the judge says, so it is not asked (cost, and no
    # unscored samples among responses the earlier stages already scored).
    asked = [i for i, s in enumerate(stages) if s["format"] == 1.0 and s["tool_call"] == 1.0]
    verdicts = dict(zip(asked, judge_scores(judge, [(questions[i], references[i], answers[i]) for i in asked])))
    results = []
    for i, answer in enumerate(answers):
        scores = {**stages[i], "judge": verdicts.get(i)}
        gated = gate({**scores, "judge": scores["judge"] or 0.0}, LONG_FORM_GATES)
        unscored = i in verdicts and verdicts[i] is None
        results.append(RewardResult(None if unscored else weighted_total(gated, weights), scores, answer, gated,
                                    weights))
    return results


def prs_longform_reward(response: str, question: str, reference: str, judge: AnswerJudge,
                        tools: Mapping[str, Tool], **options) -> RewardResult:
    """`prs_longform_rewards` for one response; `options` as there (step and total_steps required).

    >>> class HalfJudge:
    ...     def score_batch(self, items): return [0.5] * len(items)
    >>> prs_longform_reward("<answer>Shakespeare.</answer>", "Who wrote Hamlet?", "William Shakespeare.",
    ...                     HalfJudge(), {}, step=9, total_steps=10, require_tool=False).total
    0.6
    """
    return prs_longform_rewards([response], [question], [reference], judge, tools, **options)[0]


def binary_longform_rewards(responses: Sequence[str], questions: Sequence[str], references: Sequence[str],
                            judge: AnswerJudge, *, match_threshold: float = 0.7) -> list[RewardResult]:
    """The long-form baseline (METHOD.md §2.5): 1 if the judge calls the final answer a match, else 0; None when the
    judge could not score it. A missing or empty answer scores 0 without asking the judge.

    >>> class ListJudge:  # scores 0.8, then 0.6, then cannot score
    ...     def score_batch(self, items): return [0.8, 0.6, None][:len(items)]
    >>> responses = ["<answer>Shakespeare</answer>", "<answer>Marlowe?</answer>", "<answer>?</answer>", "no answer"]
    >>> [r.total for r in binary_longform_rewards(responses, ["Q?"] * 4, ["William Shakespeare."] * 4, ListJudge())]
    [1.0, 0.0, None, 0.0]
    """
    answers = [extract_answer(response) for response in responses]
    asked = [i for i, answer in enumerate(answers) if answer]
    verdicts = dict(zip(asked, judge_scores(judge, [(questions[i], references[i], answers[i]) for i in asked])))
    results = []
    for i, answer in enumerate(answers):
        score = verdicts.get(i)
        # OUR READING: a match is a judge score >= 0.7, the rubric's "correct with minor omissions" band (7/10).
        match = None if i in verdicts and score is None else float(score is not None and score >= match_threshold)
        results.append(RewardResult(match, {"judge": score}, answer))
    return results


def binary_longform_reward(response: str, question: str, reference: str, judge: AnswerJudge,
                           **options) -> RewardResult:
    """`binary_longform_rewards` for one response.

    >>> class EightJudge:
    ...     def score_batch(self, items): return [0.8] * len(items)
    >>> binary_longform_reward("<answer>Shakespeare</answer>", "Who wrote Hamlet?", "Shakespeare", EightJudge()).total
    1.0
    """
    return binary_longform_rewards([response], [question], [reference], judge, **options)[0]
