"""tools.py: the tool-call contract (parse -> validated call or precise error; execute never raises), the calculator's
safety, BM25 over the real corpus, and the Search-R1 client against a loopback server that speaks its API."""

import doctest
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent
import tools
from cli import UsageError
from tools import (SearchR1Client, calculate, calculator_tool, execute, find_tool_calls,
                   parse_tool_call, search_tool)


def fixed_backend(query, k):
    return [tools.Passage("Nile", f"The Nile is a river. You asked: {query}", 1.0)][:k]


TOOLS = {"search": search_tool(fixed_backend), "calculator": calculator_tool()}


def test_docstring_examples_are_true():
    result = doctest.testmod(tools)
    assert result.attempted >= 8 and result.failed == 0


# ---- Parsing: each kind of error, precisely ----
def test_valid_call_parses():
    call = parse_tool_call('{"name": "search", "arguments": {"query": "longest river"}}', TOOLS)
    assert call.ok and call.name == "search" and call.arguments == {"query": "longest river"}


@pytest.mark.parametrize("body, fragment", [
    ('{"name": "search", "arguments": {"query": "x"}', "not valid JSON"),
    ("search(query='x')", "not valid JSON"),
    ('["search", {"query": "x"}]', "must be a JSON object"),
    ('{"arguments": {"query": "x"}}', 'needs a "name" string'),
    ('{"name": 3, "arguments": {}}', 'needs a "name" string'),
    ('{"name": "browse", "arguments": {"url": "x"}}', "unknown tool 'browse'; available: calculator, search"),
    ('{"name": "search", "arguments": {}}', "missing the required argument 'query'"),
    ('{"name": "search"}', "missing the required argument 'query'"),
    ('{"name": "search", "arguments": {"query": 7}}',
     "argument 'query' of tool 'search' must be a string, got integer"),
    ('{"name": "search", "arguments": {"query": null}}', "must be a string, got null"),
    ('{"name": "search", "arguments": {"query": "x", "k": 5}}', "tool 'search' has no argument 'k'"),
    ('{"name": "search", "arguments": "x"}', '"arguments" must be a JSON object'),
    ('{"name": "search", "arguments": {"query": "x"}, "id": 1}', "unexpected key 'id'"),
])
def test_each_error_kind_is_named(body, fragment):
    call = parse_tool_call(body, TOOLS)
    assert not call.ok and call.arguments is None
    assert fragment in call.error


def test_boolean_is_not_a_number():
    number_tool = tools.Tool("f", "", {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
                             lambda x: str(x))
    assert parse_tool_call('{"name": "f", "arguments": {"x": 2.5}}', {"f": number_tool}).ok
    assert "must be a number, got boolean" in parse_tool_call('{"name": "f", "arguments": {"x": true}}',
                                                              {"f": number_tool}).error


def test_find_tool_calls_ignores_unclosed_blocks():
    text = '<tool_call>{"a": 1}</tool_call> text <tool_call>{"b": 2}</tool_call><tool_call>{"open"'
    assert find_tool_calls(text) == ['{"a": 1}', '{"b": 2}']
    assert find_tool_calls("no calls here") == []


def test_execute_runs_the_tool_and_reports_errors_as_observations():
    ok = execute(parse_tool_call('{"name": "search", "arguments": {"query": "Nile"}}', TOOLS), TOOLS)
    assert ok.text.startswith("Doc 1 (Title: Nile) The Nile is a river.") and not ok.failed
    bad = execute(parse_tool_call('{"name": "nope", "arguments": {}}', TOOLS), TOOLS)
    assert bad.text.startswith("Error: unknown tool 'nope'") and not bad.failed  # the model's error, not the tool's


def test_a_tool_that_raises_becomes_an_observation():
    def broken(query, k):
        raise ConnectionError("index offline")

    registry = {"search": search_tool(broken)}
    observation = execute(parse_tool_call('{"name": "search", "arguments": {"query": "x"}}', registry), registry)
    assert observation == ("Error: tool 'search' failed: index offline", True)


def test_observations_are_truncated_to_the_budget():
    long_backend = lambda query, k: [tools.Passage("T", "word " * 2000, 1.0)]  # noqa: E731
    registry = {"search": search_tool(long_backend)}
    observation = execute(parse_tool_call('{"name": "search", "arguments": {"query": "x"}}', registry), registry,
                          max_chars=300).text
    assert len(observation) == 300 and observation.endswith("…[truncated]")
    assert tools.truncate("short", 300) == "short"


# ---- Fuzzing: arbitrary and near-miss strings never raise ----
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
near_miss = st.builds(
    lambda name, args, cut: json.dumps({"name": name, "arguments": args})[:cut],
    st.sampled_from(["search", "calculator", "Search", "", "eval"]),
    st.dictionaries(st.sampled_from(["query", "expression", "k", ""]), json_values, max_size=3),
    st.integers(min_value=0, max_value=200),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), near_miss, json_values.map(json.dumps)))
def test_parse_and_execute_never_raise(body):
    call = parse_tool_call(body, TOOLS)
    assert call.ok == (call.error is None)
    observation = execute(call, TOOLS, max_chars=200)
    assert isinstance(observation.text, str) and len(observation.text) <= 200
    find_tool_calls(f"<tool_call>{body}</tool_call>{body}")


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(alphabet="0123456789+-*/%(). e", max_size=60),
    st.text(max_size=60),
    st.builds(lambda a, b: f"{a} ** {b}", st.integers(-10**6, 10**6), st.integers(-10**6, 10**6)),
))
def test_calculator_tool_never_raises(expression):
    result = calculator_tool().function(expression=expression)
    assert isinstance(result, str)


# ---- Calculator: arithmetic yes, code and huge numbers no ----
@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 / 2", 3.5), ("7 // 2", 3), ("7 % 4", 3), ("-2 ** 2", -4),
    ("2 ** -1", 0.5), ("1e3 + 0.5", 1000.5), ("10 ** 100", 10 ** 100),
    ("(" * 99 + "1" + ")" * 99, 1), ("-" * 199 + "1", -1),
])
def test_calculator_computes(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('echo hacked')", "not Call"),
    ("open('/etc/passwd').read()", "not Call"),
    ("x + 1", "not Name"),
    ("pi * 2", "not Name"),
    ("(lambda: 1)()", "not Call"),
    ("[1, 2][0]", "not Subscript"),
    ("'a' * 3", "not Constant"),
    ("True + 1", "not Constant"),
    ("1 if 1 else 2", "not IfExp"),
    ("().__class__", "not Attribute"),
    ("9 ** 9 ** 9", "too large"),
    ("10 ** 101", "too large"),
    ("2 ** 100000", "too large"),
    ("1e999 - 1", "finite"), ("1e60 * 1e60", "too large"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 / 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("1" * 201, "longer than 200"),
    ("1 +", "not a valid arithmetic expression"),
])
def test_calculator_refuses(expression, reason):
    with pytest.raises(tools.CalculatorError, match=reason):
        calculate(expression)


def test_calculator_tool_formats_results():
    tool = calculator_tool()
    assert tool.function(expression="2 ** 10") == "1024"
    assert tool.function(expression="1 / 3") == "0.333333333333"
    assert tool.function(expression="import os") == "Error: not a valid arithmetic expression"


# ---- BM25 over the real corpus ----
@pytest.mark.parametrize("query, title", [
    ("1892 ballet by Pyotr Ilyich Tchaikovsky", "The Nutcracker"),
    ("15th-century Inca citadel in Peru", "Machu Picchu"),
    ("chemical element atomic number 10 Ne noble gas", "Neon"),
    ("capital of Jiangsu", "Nanjing"),
])
def test_bm25_finds_the_right_summary(bm25, query, title):
    passages = bm25(query, 3)
    assert len(passages) == 3 and title in [p.title for p in passages]
    assert passages[0].score >= passages[1].score >= passages[2].score > 0


def test_bm25_returns_nothing_for_stopwords_only(bm25):
    assert bm25("the of a", 3) == []
    assert search_tool(bm25).function(query="!!!") == "No results found."


def test_search_tool_output_names_titles(bm25):
    observation = search_tool(bm25, topk=2).function(query="Machu Picchu Inca citadel")
    assert observation.startswith("Doc 1 (Title: Machu Picchu) ")
    assert observation.count("\nDoc ") == 1


# ---- Search-R1 retrieval server client, against a loopback server speaking its API ----
class RetrievalHandler(BaseHTTPRequestHandler):
    mode = "ok"
    requests: list = []

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        RetrievalHandler.requests.append((self.path, payload))
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "error":
            self.send_response(500)
            self.end_headers()
            return
        if self.mode == "garbage":
            body = b"<html>oops</html>"
        elif self.mode == "wrong-shape":
            body = json.dumps({"results": []}).encode()
        elif self.mode == "huge-score":  # a score no float holds
            body = ('{"result": [[{"document": {"contents": "T\\nx"}, "score": 1%s}]]}' % ("0" * 400)).encode()
        else:
            hits = [{"document": {"id": str(i), "contents": f'"Doc {i}"\nAbout {q}.'}, "score": 10.0 - i}
                    for q in payload["queries"] for i in range(payload["topk"])]
            body = json.dumps({"result": [hits]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the client of the "slow" case hangs up before the answer: a broken pipe here is expected


@pytest.fixture()
def retrieval_server():
    server = QuietServer(("127.0.0.1", 0), RetrievalHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    RetrievalHandler.mode, RetrievalHandler.requests = "ok", []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_search_r1_client_speaks_the_api(retrieval_server):
    passages = SearchR1Client(retrieval_server)("river", 3)
    assert [(p.title, p.text, p.score) for p in passages] == [
        ("Doc 0", "About river.", 10.0), ("Doc 1", "About river.", 9.0), ("Doc 2", "About river.", 8.0)]
    path, payload = RetrievalHandler.requests[0]
    assert path == "/retrieve" and payload == {"queries": ["river"], "topk": 3, "return_scores": True}


@pytest.mark.parametrize("mode, message", [
    ("error", "answered HTTP 500"),
    ("garbage", "not JSON"),
    ("wrong-shape", "without a readable result list"),
    ("huge-score", "without a readable result list"),
    ("slow", "unreachable or too slow"),
])
def test_search_r1_failures_become_observations(retrieval_server, mode, message):
    RetrievalHandler.mode = mode
    registry = {"search": search_tool(SearchR1Client(retrieval_server, timeout=0.3))}
    call = parse_tool_call('{"name": "search", "arguments": {"query": "x"}}', registry)
    observation, failed = execute(call, registry)
    assert observation.startswith("Error: tool 'search' failed: retrieval server") and message in observation
    assert failed


def test_search_r1_unreachable_server():
    registry = {"search": search_tool(SearchR1Client("http://127.0.0.1:9", timeout=0.5))}
    observation, failed = execute(parse_tool_call('{"name": "search", "arguments": {"query": "x"}}', registry),
                                  registry)
    assert "unreachable or too slow" in observation and failed


def test_a_retrieval_url_that_does_not_speak_http_is_a_clear_error_at_the_start():
    """A port where something else listens (it answers bytes that are no HTTP status line): the check at the start
    names --retriever, and during a run the call fails as an observation, like any unreachable server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def answer_garbage():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(RuntimeError, match="does not speak HTTP"):
            SearchR1Client(url, timeout=2)("x", 1)
        with pytest.raises(UsageError, match=f"--retriever '{url}'"):
            agent.search_backend(url, "", "")
    finally:
        listener.close()


def test_an_observation_is_text_any_tokenizer_takes():
    # A model can write "\ud800" in a call's JSON: the query then holds a lone surrogate, which a backend may echo.
    registry = {"search": search_tool(lambda query, k: [tools.Passage("Echo", f"you asked {query}", 1.0)])}
    call = parse_tool_call('{"name": "search", "arguments": {"query": "\\ud800 Paris"}}', registry)
    assert call.ok and call.arguments["query"] == "\ud800 Paris"
    observation = execute(call, registry)
    assert observation.text.endswith("you asked ? Paris") and not observation.failed
    observation.text.encode("utf-8")
