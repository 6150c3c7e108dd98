"""Tool calls and the tools the agent can use (METHOD.md §1).

The agent writes one assistant turn that interleaves thinking, tool calls and, at the end, an answer:

    <think>I should look this up.</think>
    <tool_call>{"name": "search", "arguments": {"query": "1892 ballet Tchaikovsky"}}</tool_call>
    <tool_response>                                      <- appended by the environment, never by the model
    Doc 1 (Title: The Nutcracker) The Nutcracker is an 1892 two-act ballet ...
    </tool_response>
    <answer>The Nutcracker</answer>

The call is the Qwen2.5 / Hermes JSON tool-call format, so "a parseable tool call" has a precise meaning:
the text between the tags is one JSON object {"name": <known tool>, "arguments": {...}} whose arguments satisfy the
tool's signature (a small JSON-schema subset: an object with typed `properties` and a `required` list).

The contract of this module:
- `parse_tool_call(body, tools)` returns a `ToolCall`: either valid (`.ok`) or carrying one precise, model-readable
  `.error` (bad JSON, not an object, unknown tool, missing argument, wrongly typed argument, unexpected argument).
- `execute(call, tools)` never raises: a failed parse, a tool that fails or a backend that times out all become an
  observation string the model can read, cut to a character budget. It also says whether the tool itself failed
  (raised: a backend down or too slow), which the model's call did not cause and training counts.

Tools: `search` (top-k passages from a local BM25 index or a Search-R1 retrieval server) and `calculator` (safe
arithmetic: it parses the expression and evaluates only numbers and + - * / // % ** and parentheses; it never
runs code).
"""

from __future__ import annotations

import ast
import http.client
import json
import math
import operator
import re
import string
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

MAX_OBSERVATION_CHARS = 1500  # a search result of 3 summaries is ~1,400 characters

_PUNCTUATION = set(string.punctuation)

_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,),
               "array": (list,)}


# ---- Tools and calls ----
@dataclass(frozen=True)
class Tool:
    """A tool: its name, what it does, its signature (JSON-schema subset) and the function that runs it."""

    name: str
    description: str
    parameters: dict  # {"type": "object", "properties": {arg: {"type": ..., "description": ...}}, "required": [...]}
    function: Callable[..., str]

    def signature(self) -> dict:
        """The tool as chat templates and OpenAI-style APIs describe functions."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """One parsed `<tool_call>` body: valid (`error is None`) or with the reason it is not."""

    raw: str
    name: str | None = None
    arguments: dict | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def find_blocks(text: str, open_tag: str, close_tag: str) -> list[str]:
    """The bodies of all complete `open_tag…close_tag` blocks in `text`, in order; an unclosed one is left out.

    >>> find_blocks("<b>1</b> <b>2</b> <b>3", "<b>", "</b>")
    ['1', '2']
    """
    bodies, start = [], 0
    while (open_at := text.find(open_tag, start)) != -1:
        close_at = text.find(close_tag, open_at + len(open_tag))
        if close_at == -1:
            break
        bodies.append(text[open_at + len(open_tag):close_at])
        start = close_at + len(close_tag)
    return bodies


def find_tool_calls(text: str) -> list[str]:
    """The bodies of all complete `<tool_call>…</tool_call>` blocks in `text`, in order.

    >>> find_tool_calls('<tool_call>{"name": "search"}</tool_call> and <tool_call>x</tool_call>')
    ['{"name": "search"}', 'x']
    """
    return find_blocks(text, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)


def parse_tool_call(body: str, tools: Mapping[str, Tool]) -> ToolCall:
    """Parse and validate one tool-call body against the tools' signatures.

    >>> tools = {"search": search_tool(lambda query, k: [])}
    >>> parse_tool_call('{"name": "search", "arguments": {"query": "Nile"}}', tools).arguments
    {'query': 'Nile'}
    >>> parse_tool_call('{"name": "search", "arguments": {}}', tools).error
    "tool 'search' is missing the required argument 'query'"
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:
        return ToolCall(body, error=f"the tool call is not valid JSON ({_short(error)})")
    if not isinstance(payload, dict):
        return ToolCall(body, error='the tool call must be a JSON object like {"name": ..., "arguments": {...}}')
    name = payload.get("name")
    if not isinstance(name, str):
        return ToolCall(body, error='the tool call needs a "name" string')
    if name not in tools:
        return ToolCall(body, name=name, error=f"unknown tool {_clip(name)!r}; available: {', '.join(sorted(tools))}")
    extra_keys = set(payload) - {"name", "arguments"}
    if extra_keys:
        return ToolCall(body, name=name, error=f"unexpected key {_clip(sorted(extra_keys)[0])!r} in the tool call")
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, dict):
        return ToolCall(body, name=name, error='"arguments" must be a JSON object')
    error = _check_arguments(tools[name], arguments)
    return ToolCall(body, name=name, arguments=arguments if error is None else None, error=error)


def _check_arguments(tool: Tool, arguments: dict) -> str | None:
    properties = tool.parameters.get("properties", {})
    for required in tool.parameters.get("required", []):
        if required not in arguments:
            return f"tool {tool.name!r} is missing the required argument {required!r}"
    for key, value in arguments.items():
        if key not in properties:
            return f"tool {tool.name!r} has no argument {_clip(key)!r}; its arguments: {', '.join(properties)}"
        expected = properties[key].get("type", "string")
        is_bool = isinstance(value, bool)
        if not isinstance(value, _JSON_TYPES[expected]) or (is_bool and expected != "boolean"):
            return f"argument {key!r} of tool {tool.name!r} must be a {expected}, got {_json_type(value)}"
    return None


def _json_type(value) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), "null")


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _short(error: Exception) -> str:
    return _clip(str(error) or type(error).__name__, 120)


class Observation(NamedTuple):
    text: str  # what the model reads in the tool response
    failed: bool  # the call was valid but the tool raised (a backend down or too slow): not the model's doing


def execute(call: ToolCall, tools: Mapping[str, Tool], max_chars: int = MAX_OBSERVATION_CHARS) -> Observation:
    """Run a parsed call and return the observation. Never raises: every failure is an observation.

    >>> broken = {"search": search_tool(lambda query, k: 1 / 0)}
    >>> execute(parse_tool_call('{"name": "search", "arguments": {"query": "Nile"}}', broken), broken)
    Observation(text="Error: tool 'search' failed: division by zero", failed=True)
    """
    if not call.ok:
        text, failed = f"Error: {call.error}", False
    else:
        try:
            text, failed = str(tools[call.name].function(**call.arguments)), False
        except Exception as error:  # a tool is model-facing: whatever it raises, the model reads it
            text, failed = f"Error: tool {call.name!r} failed: {_short(error)}", True
    # What UTF-8 cannot encode (a lone surrogate the model wrote as "\ud800" and a tool echoed) becomes "?": the
    # observation is tokenized next, and tokenizers refuse such text.
    return Observation(truncate(text.encode("utf-8", "replace").decode("utf-8"), max_chars), failed)


def truncate(text: str, max_chars: int) -> str:
    """Cut `text` to at most `max_chars` characters, marking the cut."""
    marker = " …[truncated]"
    if len(text) <= max_chars:
        return text
    return text[:max(0, max_chars - len(marker))] + marker


def format_tool_response(observation: str) -> str:
    """How the environment appends an observation to the trajectory (its tokens get loss mask 0)."""
    return f"\n{TOOL_RESPONSE_OPEN}\n{observation}\n{TOOL_RESPONSE_CLOSE}\n"


def describe_tools(tools: Mapping[str, Tool]) -> str:
    """One JSON signature per line, as Qwen2.5's chat template lists tools inside <tools></tools>."""
    return "\n".join(json.dumps(tool.signature()) for tool in tools.values())


# ---- The final answer: extraction and SQuAD normalization (what rewards, metrics and data generation compare) ----
def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lowercase, drop punctuation and the articles a/an/the, collapse whitespace.

    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains_words(haystack: str, needle: str) -> bool:
    """Whole-word containment after SQuAD normalization; an empty needle is never contained.

    >>> contains_words("The Nile is a river.", "the nile"), contains_words("Nilesh", "Nile")
    (True, False)
    """
    needle = normalize_answer(needle)
    return bool(needle) and f" {needle} " in f" {normalize_answer(haystack)} "


def extract_answer(response: str) -> str | None:
    """The text of the final `<answer>…</answer>` of the response, stripped; None when there is none.

    Give it the response alone: a prompt's example answer is not the agent's (METHOD.md §6: Search-R1's extractor
    counted the prompt's example as one of the agent's answers).

    >>> extract_answer("<think>Two candidates.</think><answer> Paris </answer>")
    'Paris'
    >>> extract_answer("I think it is Paris.") is None
    True
    """
    close_at = response.rfind(ANSWER_CLOSE)
    open_at = response.rfind(ANSWER_OPEN, 0, max(close_at, 0))
    if close_at == -1 or open_at == -1:
        return None
    return response[open_at + len(ANSWER_OPEN):close_at].strip()


# ---- search: a local BM25 index or a Search-R1 retrieval server ----
@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    score: float


class BM25Search:
    """BM25 (bm25s) over a list of documents with `.title` and `.text` (data.Document)."""

    def __init__(self, documents: Sequence):
        import bm25s  # imported here so that the rest of tools.py works without it

        self._bm25s = bm25s
        self.documents = list(documents)
        if not self.documents:
            raise ValueError("BM25Search needs at least one document")
        tokens = bm25s.tokenize([f"{d.title}\n{d.text}" for d in self.documents], stopwords="en",
                                show_progress=False)
        self.index = bm25s.BM25()
        self.index.index(tokens, show_progress=False)

    def __call__(self, query: str, k: int) -> list[Passage]:
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:  # only stopwords or punctuation: nothing to match
            return []
        ids, scores = self.index.retrieve(tokens, k=min(k, len(self.documents)), show_progress=False)
        return [Passage(self.documents[i].title, self.documents[i].text, float(s))
                for i, s in zip(ids[0], scores[0]) if s > 0]


class SearchR1Client:
    """Client of the Search-R1 retrieval server: POST {url}/retrieve {"queries", "topk", "return_scores"} ->
    {"result": [[{"document": {"contents": "\\"Title\\"\\ntext"}, "score": s}, ...]]}."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/retrieve") else "/retrieve")
        self.timeout = timeout

    def __call__(self, query: str, k: int) -> list[Passage]:
        body = json.dumps({"queries": [query], "topk": k, "return_scores": True}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"retrieval server {self.url} answered HTTP {error.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise RuntimeError(f"retrieval server {self.url} unreachable or too slow ({reason})") from None
        except http.client.HTTPException as error:  # something listens there, but its answer is no HTTP
            raise RuntimeError(f"retrieval server {self.url} does not speak HTTP ({type(error).__name__})") from None
        except ValueError:
            raise RuntimeError(f"retrieval server {self.url} answered something that is not JSON") from None
        return self._passages(payload)

    def _passages(self, payload) -> list[Passage]:
        try:
            hits = payload["result"][0]
            passages = []
            for hit in hits:
                contents = hit["document"]["contents"] if isinstance(hit, dict) and "document" in hit else hit
                score = float(hit.get("score", 0.0)) if isinstance(hit, dict) else 0.0
                title, _, text = str(contents).partition("\n")
                passages.append(Passage(title.strip().strip('"'), text.strip(), score))
            return passages
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError):
            raise RuntimeError(f"retrieval server {self.url} answered JSON without a readable result list") from None


def format_passages(passages: Sequence[Passage], passage_chars: int | None = None) -> str:
    """Search-R1's observation layout: one `Doc i (Title: …) text` line per passage, each text cut to
    `passage_chars` characters (at a word boundary) when given.

    >>> format_passages([Passage("Nile", "The Nile is a major river in Africa.", 1.0)], passage_chars=20)
    'Doc 1 (Title: Nile) The Nile is a major…'
    """
    if not passages:
        return "No results found."
    lines = []
    for i, passage in enumerate(passages, start=1):
        text = passage.text
        if passage_chars is not None and len(text) > passage_chars:
            text = text[:passage_chars].rsplit(" ", 1)[0] + "…"
        lines.append(f"Doc {i} (Title: {passage.title}) {text}")
    return "\n".join(lines)


def search_tool(backend: Callable[[str, int], list[Passage]], topk: int = 3, passage_chars: int | None = None,
                max_query_chars: int = 300) -> Tool:
    """The `search` tool over any backend `backend(query, k) -> list[Passage]` (BM25Search, SearchR1Client).
    `passage_chars` shortens each passage (every token of a tool response costs prefill time on a CPU)."""

    def search(query: str) -> str:
        query = query.strip()[:max_query_chars]
        if not query:
            return "Error: the search query is empty"
        return format_passages(backend(query, topk), passage_chars)

    parameters = {"type": "object",
                  "properties": {"query": {"type": "string", "description": "what to look up"}},
                  "required": ["query"]}
    return Tool("search", f"Search Wikipedia; returns the top {topk} passages.", parameters, search)


# ---- calculator: arithmetic only, with bounded sizes ----
MAX_EXPRESSION_CHARS = 200
MAX_ABS_VALUE = 1e100  # no intermediate value may exceed this: 10**10**10 is refused before it is computed

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    pass


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression without executing code: the expression is parsed into a syntax tree and
    only numbers, + - * / // % ** and parentheses are evaluated.

    >>> calculate("2 * (3 + 4) ** 2")
    98
    >>> calculate("__import__('os')")
    Traceback (most recent call last):
    ...
    tools.CalculatorError: only numbers and + - * / // % ** ( ) are allowed, not Call
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("not a valid arithmetic expression") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
    raise CalculatorError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > 1000:
        raise CalculatorError("exponent too large")
    if base != 0 and exponent > 0 and exponent * math.log10(abs(base)) > math.log10(MAX_ABS_VALUE):
        raise CalculatorError("result too large")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero")


def _bounded(value):
    if isinstance(value, complex):
        raise CalculatorError("result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    if abs(value) > MAX_ABS_VALUE:
        raise CalculatorError("result too large")
    return value


def calculator_tool() -> Tool:
    def calculator(expression: str) -> str:
        try:
            value = calculate(expression)
        except CalculatorError as error:
            return f"Error: {error}"
        return str(value) if isinstance(value, int) else format(value, ".12g")

    parameters = {"type": "object",
                  "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * 2 / 7"}},
                  "required": ["expression"]}
    return Tool("calculator", "Evaluate an arithmetic expression.", parameters, calculator)
