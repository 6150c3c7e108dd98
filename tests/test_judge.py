"""judge.py: the LLM judge through the real openai client, against a loopback chat-completions server (the one
network boundary): verdicts, retries, timeouts, garbage, the cache, the key; and prs.py's long-form rewards on it."""

import doctest
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import judge as judge_lib
import prs
import tools
from judge import Judge, parse_verdict
from prs import binary_longform_rewards, prs_longform_rewards, stage_weights

TOOLS = {"search": tools.search_tool(lambda query, k: []), "calculator": tools.calculator_tool()}


def call(query: str = "longest river") -> str:
    body = json.dumps({"name": "search", "arguments": {"query": query}})
    return f"{tools.TOOL_CALL_OPEN}{body}{tools.TOOL_CALL_CLOSE}"


def env(observation: str) -> str:
    """What the environment appends after a tool call."""
    return tools.format_tool_response(observation)


API_KEY = "sk-test-SECRET-4f9a1c"


class ChatServer:
    """Speaks POST /v1/chat/completions. `reply(request)` returns (status, assistant text), or ("raw", body) for a
    200 whose body is exactly `body`, and may sleep; `request` holds the parsed body, the headers and its 1-based
    arrival number."""

    def __init__(self, reply):
        self.reply, self.requests, self.lock = reply, [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {name.lower(): value for name, value in self.headers.items()}
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "headers": headers})
                    request = dict(server.requests[-1], n=len(server.requests))
                status, text = server.reply(request)
                if status == "raw":  # the body exactly as given, with status 200: a reply cut short, garbage
                    status, payload = 200, text
                else:
                    payload = (json.dumps(chat_completion(text, body["model"])) if status == 200
                               else json.dumps({"error": {"message": text, "type": "server_error"}}))
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload.encode())))
                    self.end_headers()
                    self.wfile.write(payload.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def prompts(self) -> list[str]:
        return [" ".join(m["content"] for m in r["body"]["messages"]) for r in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_completion(text: str, model: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}


def verdict(score, reason="ok") -> str:
    return json.dumps({"score": score, "reason": reason})


def score_in_answer(request) -> tuple[int, str]:
    """Grades answers of the form 'sN' with score N; anything else gets garbage."""
    found = re.search(r"<graded_answer>\ns(\d+)\n</graded_answer>", request["body"]["messages"][1]["content"])
    return (200, verdict(int(found.group(1)))) if found else (200, "I cannot grade this.")


@pytest.fixture
def chat_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def start(reply):
        servers.append(ChatServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def make_judge(server, **options) -> Judge:
    defaults = dict(model="judge-model", base_url=server.url, api_key=API_KEY, timeout_s=2.0, max_retries=2,
                     backoff_s=0.01)
    return Judge(**{**defaults, **options})


def test_judge_valid_verdict_at_temperature_0_with_only_question_reference_and_answer(chat_server):
    server = chat_server(lambda request: (200, verdict(9, "close")))
    judge = make_judge(server)
    assert judge.score("Longest river?", "The Nile, in Africa.", "Nile") == 0.9
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions" and request["body"]["temperature"] == 0
    assert request["body"]["model"] == "judge-model" and request["headers"]["authorization"] == f"Bearer {API_KEY}"
    prompt = server.prompts()[0]
    assert "Longest river?" in prompt and "The Nile, in Africa." in prompt and "<graded_answer>\nNile\n" in prompt
    assert judge.stats == {"requests": 1, "cache_hits": 0, "scored": 1, "failures": 0, "unparseable": 0}


@pytest.mark.parametrize("reply, expected", [
    ('```json\n{"score": "7", "reason": "minor omission"}\n```', 0.7),
    ('Here is my verdict: {"score": 10, "reason": "all {points} covered"} Thanks.', 1.0),
    ('{"score": 4.5}', 0.45),
])
def test_judge_parses_verdicts_robustly(chat_server, reply, expected):
    server = chat_server(lambda request: (200, reply))
    assert make_judge(server).score("Q?", "R.", "A.") == pytest.approx(expected)


@pytest.mark.parametrize("reply", ["The answer is correct.", '{"score": 12}', '{"score": "high"}', '{"score": null}',
                                   '{"reason": "no score"}', "", '{"score": true}', '{"score": 1%s}' % ("0" * 400)])
def test_judge_garbage_is_unscored_and_counted_not_retried(chat_server, reply):
    server = chat_server(lambda request: (200, reply))
    judge = make_judge(server)
    assert judge.score("Q?", "R.", "A.") is None
    assert judge.stats["unparseable"] == 1 and judge.stats["requests"] == 1 and len(server.requests) == 1


def test_parse_verdict_directly():
    assert parse_verdict('{"score": 3, "reason": "x"}') == (0.3, "x")
    assert parse_verdict('{"score": " 8 "}') == (0.8, "")
    assert parse_verdict('{"score": 0.5}', scale=1) == (0.5, "")
    assert parse_verdict('{"note": {"a": 1}} then {"score": 6}') == (0.6, "")
    assert parse_verdict('{"score": -1}') is None and parse_verdict('{"score": NaN}') is None
    assert parse_verdict("{not json") is None


def test_judge_retries_500s_then_succeeds(chat_server):
    server = chat_server(lambda request: (500, "overloaded") if request["n"] <= 2 else (200, verdict(8)))
    judge = make_judge(server, max_retries=2)
    assert judge.score("Q?", "R.", "A.") == 0.8
    assert judge.stats["requests"] == 3 and judge.stats["failures"] == 0


def test_judge_persistent_500s_are_unscored_counted_and_never_leak_the_key(chat_server, caplog):
    # A hostile or misconfigured server echoes the Authorization header in its error body.
    server = chat_server(lambda request: (500, f"boom, your header was {request['headers']['authorization']}"))
    judge = make_judge(server, max_retries=2)
    with caplog.at_level(logging.DEBUG):
        assert judge.score("Q?", "R.", "A.") is None
    assert judge.stats["failures"] == 1 and judge.stats["requests"] == 3 and len(server.requests) == 3
    assert "failed after 3 attempt" in caplog.text and "***" in caplog.text
    assert API_KEY not in caplog.text and API_KEY not in repr(judge) and API_KEY not in str(judge.stats)


def test_judge_timeouts_are_unscored_and_counted(chat_server):
    server = chat_server(lambda request: (time.sleep(1.5), (200, verdict(9)))[1])
    judge = make_judge(server, timeout_s=0.2, max_retries=1)
    started = time.monotonic()
    assert judge.score("Q?", "R.", "A.") is None
    assert time.monotonic() - started < 1.2
    assert judge.stats["failures"] == 1 and judge.stats["requests"] == 2


def test_judge_batch_runs_concurrently_and_stays_aligned(chat_server):
    n, delay = 8, 0.4
    server = chat_server(lambda request: (time.sleep(delay), score_in_answer(request))[1])
    judge = make_judge(server, max_workers=n)
    items = [("Q?", "R.", f"s{i}") for i in range(n)]
    started = time.monotonic()
    scores = judge.score_batch(items)
    assert time.monotonic() - started < n * delay / 2
    assert scores == [i / 10 for i in range(n)]


def test_judge_caches_in_memory_and_dedupes_a_batch(chat_server):
    server = chat_server(score_in_answer)
    judge = make_judge(server)
    assert judge.score("Q?", "R.", "s6") == 0.6 and judge.score("Q?", "R.", "s6") == 0.6
    assert len(server.requests) == 1 and judge.stats["cache_hits"] == 1
    assert judge.score_batch([("Q?", "R.", "s3"), ("Q?", "R.", "s3"), ("Q?", "R.", "s6")]) == [0.3, 0.3, 0.6]
    assert len(server.requests) == 2


def test_judge_disk_cache_survives_a_new_judge_and_holds_no_key(chat_server, tmp_path):
    server = chat_server(score_in_answer)
    path = tmp_path / "judge_cache.jsonl"
    first = make_judge(server, cache_path=str(path))
    assert first.score_batch([("Q?", "R.", "s7"), ("Q?", "R.", "bad")]) == [0.7, None]
    resumed = make_judge(server, cache_path=str(path))
    assert resumed.score("Q?", "R.", "s7") == 0.7 and len(server.requests) == 2  # a cache hit, no request
    assert resumed.score("Q?", "R.", "bad") is None and len(server.requests) == 3  # failures are not cached
    assert API_KEY not in path.read_text() and len(path.read_text().splitlines()) == 1
    other_model = make_judge(server, cache_path=str(path), model="another-judge")
    assert other_model.score("Q?", "R.", "s7") == 0.7 and len(server.requests) == 4  # the model is in the key


def test_check_passes_on_a_judge_that_gives_verdicts_and_leaves_no_trace(chat_server, tmp_path):
    server = chat_server(lambda request: (200, verdict(2)))  # any usable verdict: the probe tests the endpoint
    judge = make_judge(server, cache_path=str(tmp_path / "cache.jsonl"))
    judge.check()
    assert len(server.requests) == 1 and judge_lib.PROBE[0] in server.prompts()[0]
    assert judge.stats["requests"] == 0 and not (tmp_path / "cache.jsonl").exists()  # neither counted nor cached


@pytest.mark.parametrize("reply, said", [
    (lambda request: (401, "invalid api key"), "AuthenticationError"),
    (lambda request: (404, "model judge-model does not exist"), "does not exist"),
    (lambda request: (503, "loading"), "InternalServerError"),
    (lambda request: (200, "Sure! Paris is right."), "without a usable verdict"),
])
def test_check_stops_a_judge_that_cannot_judge_naming_the_endpoint_and_the_error(chat_server, reply, said):
    server = chat_server(reply)
    judge = make_judge(server, max_retries=1)
    with pytest.raises(judge_lib.JudgeUnavailable, match=said) as raised:
        judge.check()
    assert server.url in str(raised.value) and "judge-model" in str(raised.value)
    assert API_KEY not in str(raised.value)


def test_check_names_an_endpoint_nobody_listens_on(chat_server):
    server = chat_server(lambda request: (200, verdict(9)))
    url = server.url
    server.close()  # the port is free again: the connection is refused
    judge = Judge(model="judge-model", base_url=url, api_key=API_KEY, timeout_s=2.0, max_retries=1, backoff_s=0.01)
    with pytest.raises(judge_lib.JudgeUnavailable, match="APIConnectionError") as raised:
        judge.check()
    assert url in str(raised.value)


def test_judge_reads_settings_from_the_environment(chat_server, monkeypatch):
    server = chat_server(lambda request: (200, verdict(5)))
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("JUDGE_MODEL", "env-judge")
    assert Judge(max_retries=0).score("Q?", "R.", "A.") == 0.5
    assert server.requests[0]["body"]["model"] == "env-judge"
    monkeypatch.delenv("JUDGE_MODEL")
    with pytest.raises(ValueError, match="JUDGE_MODEL"):
        Judge()
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        Judge(model="m")


def test_longform_reward_judges_only_the_final_answer_and_marks_failures_unscored(chat_server):
    server = chat_server(score_in_answer)
    judge = make_judge(server)
    think, tool_text = "SECRET_THOUGHT", "TOOL_TEXT_ONLY"
    good = f"<think>{think}</think>{call()}{env(tool_text)}<answer>s10</answer>"
    partial = f"<think>{think}</think>{call()}{env(tool_text)}<answer>s4</answer>"
    broken = f"{call()}{env(tool_text)}<answer>s10</answer> trailing"
    garbage = f"{call()}{env(tool_text)}<answer>unreadable</answer>"
    no_search = "<answer>s10</answer>"
    results = prs_longform_rewards([good, partial, broken, garbage, no_search], ["Q?"] * 5, ["R."] * 5, judge, TOOLS,
                                   step=0, total_steps=10)
    good_r, partial_r, broken_r, garbage_r, no_search_r = results
    assert good_r.total == 1.0 and good_r.stages == {"format": 1.0, "tool_call": 1.0, "judge": 1.0}
    assert partial_r.total == pytest.approx(1.0 - partial_r.weights["judge"] * 0.6)
    assert broken_r.total == 0.0 and broken_r.stages["judge"] is None  # gated off: the judge is not asked
    assert garbage_r.total is None and garbage_r.stages["judge"] is None  # unscored, never 0
    assert no_search_r.total == pytest.approx(no_search_r.weights["format"])
    assert len(server.requests) == 3 and judge.stats["unparseable"] == 1
    assert not any(think in prompt or tool_text in prompt for prompt in server.prompts())
    weights = stage_weights(0, 10, prs.LONG_FORM_START, prs.LONG_FORM_END)
    assert max(weights, key=weights.get) == "format"
    end = stage_weights(9, 10, prs.LONG_FORM_START, prs.LONG_FORM_END)
    assert max(end, key=end.get) == "judge" and sum(end.values()) == pytest.approx(1.0)


def test_binary_longform_reward_thresholds_the_judge(chat_server):
    server = chat_server(score_in_answer)
    responses = ["<answer>s7</answer>", "<answer>s6</answer>", "<answer>garbage</answer>", "<answer></answer>",
                 "no answer"]
    results = binary_longform_rewards(responses, ["Q?"] * 5, ["R."] * 5, make_judge(server))
    assert [r.total for r in results] == [1.0, 0.0, None, 0.0, 0.0]
    assert len(server.requests) == 3  # empty and missing answers are not sent


def test_docstring_examples_hold():
    assert doctest.testmod(judge_lib).failed == 0


# ---- Whatever a server answers, a judge call ends as a score or as unscored and counted ----
@pytest.mark.parametrize("body", ['{"choices": [', "not json at all", "", '{"choices": "none"}', "[1, 2]",
                                  '{"choices": [{"message": {"content": 7}}]}', '{"choices": {}}',
                                  '{"choices": {"0": 1}}'])
def test_a_200_the_client_cannot_read_is_retried_then_unscored_and_counted(chat_server, body):
    server = chat_server(lambda request: ("raw", body))
    judge = make_judge(server, max_retries=2)
    assert judge.score("Q?", "R.", "A.") is None
    stats = judge.stats
    assert stats["failures"] + stats["unparseable"] == 1 and stats["scored"] == 0
    assert stats["requests"] == (3 if stats["failures"] else 1)  # a reply that cannot be read is asked again


def test_a_deeply_nested_or_huge_verdict_is_no_verdict_in_bounded_work(chat_server, monkeypatch):
    server = chat_server(lambda request: (200, '{"score": ' + "[" * 3000))
    judge = make_judge(server)
    assert judge.score("Q?", "R.", "A.") is None and judge.stats["unparseable"] == 1
    decoded = []
    real = json.JSONDecoder.raw_decode
    monkeypatch.setattr(json.JSONDecoder, "raw_decode", lambda self, text, start=0: decoded.append(start) or real(
        self, text, start))
    assert parse_verdict("{" * 100_000) is None and parse_verdict('{"a": {' * 50_000) is None
    assert len(decoded) <= 2 * judge_lib.MAX_OBJECTS_TRIED  # not one attempt per brace
    assert parse_verdict("x" * 30_000 + '{"score": 7}') is None  # beyond what is read: no verdict
    assert parse_verdict("{" * 40 + ' {"score": 7, "reason": "ok"}') == (0.7, "ok")


def test_any_text_a_model_writes_is_judged_and_cached(chat_server, tmp_path):
    server = chat_server(lambda request: (200, '{"score": 8, "reason": "\\ud800 odd"}'))
    path = tmp_path / "cache.jsonl"
    judge = make_judge(server, cache_path=str(path))
    assert judge.score("Capital of \ud800 France?", "Paris.", "\ud800 Paris") == 0.8  # a lone surrogate
    assert "\\ud800" not in json.dumps(server.requests[0]["body"])  # sent as text the server can read
    path.read_text(encoding="utf-8")
    resumed = make_judge(server, cache_path=str(path))
    assert resumed.score("Capital of \ud800 France?", "Paris.", "\ud800 Paris") == 0.8
    assert resumed.stats["cache_hits"] == 1 and len(server.requests) == 1


def test_a_cache_line_cut_short_by_a_kill_loses_no_later_verdict(chat_server, tmp_path):
    server = chat_server(score_in_answer)
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "abc", "sco')  # a kill in the middle of a write: no newline at the end
    make_judge(server, cache_path=str(path)).score("Q?", "R.", "s8")
    fresh = make_judge(server, cache_path=str(path))
    assert fresh.score("Q?", "R.", "s8") == 0.8
    assert fresh.stats["cache_hits"] == 1 and len(server.requests) == 1


@pytest.mark.parametrize("line", ['{"score": 0.8}', '{"key": ["a"], "score": 0.8}', '{"key": null, "score": 0.8}'])
def test_a_cache_line_without_a_key_is_skipped(chat_server, tmp_path, line):
    server = chat_server(score_in_answer)
    path = tmp_path / "cache.jsonl"
    path.write_text(line + "\n")
    assert make_judge(server, cache_path=str(path)).score("Q?", "R.", "s6") == 0.6


@pytest.mark.parametrize("score", ["NaN", '"nan"', "7", "-0.5", "true", '"0.8"', "null"])
def test_a_cached_score_that_is_no_verdict_is_asked_again(chat_server, tmp_path, score):
    server = chat_server(score_in_answer)
    path = tmp_path / "cache.jsonl"
    key = make_judge(server)._key("Q?", "R.", "s6")
    path.write_text('{"key": "%s", "score": %s, "reason": "edited"}\n' % (key, score))
    judge = make_judge(server, cache_path=str(path))
    assert judge.score("Q?", "R.", "s6") == 0.6 and judge.stats["cache_hits"] == 0 and len(server.requests) == 1


class FixedJudge:
    """A custom judge (prs.AnswerJudge) that answers the given scores, whatever it is asked."""

    def __init__(self, scores):
        self.scores = scores

    def score_batch(self, items):
        return list(self.scores)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, 1.5, True, "0.9"])
def test_a_custom_judge_score_that_is_no_number_in_0_1_is_unscored_never_a_silent_0(bad):
    responses = ["<answer>x</answer>", "<answer>y</answer>"]
    binary = binary_longform_rewards(responses, ["Q?"] * 2, ["R."] * 2, FixedJudge([bad, 0.9]))
    assert [r.total for r in binary] == [None, 1.0]
    well_formed = f"<think>t</think>{call()}{env('obs')}<answer>x</answer>"
    shaped = prs_longform_rewards([well_formed] * 2, ["Q?"] * 2, ["R."] * 2, FixedJudge([bad, 0.9]), TOOLS,
                                  step=0, total_steps=10)
    assert shaped[0].total is None and shaped[1].total is not None


def test_a_custom_judge_that_returns_too_few_scores_is_an_error_not_zeros():
    with pytest.raises(ValueError, match="1 score.* for 2 answers"):
        binary_longform_rewards(["<answer>x</answer>"] * 2, ["Q?"] * 2, ["R."] * 2, FixedJudge([0.9]))
