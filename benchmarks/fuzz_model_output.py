"""Fuzz what a model can write through everything that reads it: the tool loop and every reward.

    python benchmarks/fuzz_model_output.py [--n 100000] [--seed 0]

A model's response is whatever text its tokens decode to, and JSON escapes inside a tool call can add what no
tokenizer emits (a lone surrogate from "\\ud800"). This script makes `--n` such texts by mutating well-formed
responses to the wiki questions (a search call, the real tool response, an answer): characters and tags inserted,
spans deleted, repeated or cut, bytes flipped, JSON values swapped for hostile ones (deep nesting, huge numbers,
long strings, lone surrogates, NUL). Each text goes through

    tool loop   tools.find_tool_calls -> parse_tool_call -> execute (real BM25 search, calculator) ->
                format_tool_response -> the embedded model's tokenizer (what rollout.py does with a segment)
    rewards     prs.prs_reward, binary_reward, prs_longform_rewards and binary_longform_rewards (with a judge that
                answers 0.5 in-process: the network is not what is fuzzed here), trl_reward, compute_score
    records     eval.jsonl_line of the call and answer, read back with json.loads (what samples.jsonl and eval's
                jsonl hold)
    verdicts    judge.parse_verdict (a judge server's reply is text too)

and the script counts, per target, the calls, the exceptions (by type) and the broken promises: a reward outside
[0, 1], an observation over its character budget, a record that does not read back to what was written. Exit status
1 if any of those counts is not 0. It is a script, not a test: its time is not asserted.
"""

import argparse
import collections
import json
import math
import pathlib
import random
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import judge  # noqa: E402
import models  # noqa: E402
import prs  # noqa: E402
import prs_adapters  # noqa: E402
import run_folder  # noqa: E402
import tools  # noqa: E402

TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<answer>", "</answer>", "<think>",
        "</think>", "<tool_call><tool_call>", "</answer></answer>", "<|im_end|>", "<|im_start|>"]
PIECES = ['"', "{", "}", "[", "]", ":", ",", "\\", "\\u", "\\ud800", "\\udfff", "\\u0000", "\\n", "\n", "\r", "\t",
          "\x00", "\ud800", "\udc00", "é", "中", "🙂", "\u202e", "\ufeff", "1e999", "-0", "NaN", "Infinity", "null",
          "true", '"name"', '"arguments"', '"query"', '"expression"', '"search"', '"calculator"', "2**10**10", "1/0"]
HOSTILE_VALUES = ["[" * 5000, "{" * 3000, "9" * 5000, "1e999", '"' + "x" * 20000 + '"', '"\\ud800 Paris"', '"\\u0000"',
                  '"' + "\\ud83d" * 50 + '"', "-1e-999", '"2**10**10"', '"(' * 400 + '1' + ')' * 400 + '"', "[]", "{}",
                  'null', '"' + "<answer>" * 200 + '"', '"</tool_call>"']


class HalfJudge:
    """The long-form rewards' judge: every answer 0.5 (prs.AnswerJudge)."""

    def score_batch(self, items):
        return [0.5] * len(items)


def seeds(registry) -> list[tuple[str, list[str], str]]:
    """(well-formed response, gold answers, question) for the first wiki questions."""
    out = []
    for example in data.load_task("wiki", "test")[:50]:
        description = example.question.split('"')[1] if '"' in example.question else example.question
        call = json.dumps({"name": "search", "arguments": {"query": description}})
        observation = tools.execute(tools.parse_tool_call(call, registry), registry).text
        calc = json.dumps({"name": "calculator", "arguments": {"expression": "(3 + 4) * 2"}})
        response = (f"<think>Look it up.</think><tool_call>{call}</tool_call>{tools.format_tool_response(observation)}"
                    f"<tool_call>{calc}</tool_call>{tools.format_tool_response('14')}"
                    f"<answer>{example.answers[-1]}</answer>")
        out.append((response, list(example.answers), example.question))
    return out


def mutate(text: str, rng: random.Random) -> str:
    """One to four random edits of `text`."""
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(text) + 1)
        kind = rng.randrange(8)
        if kind == 0:
            text = text[:at] + rng.choice(PIECES) + text[at:]
        elif kind == 1:
            text = text[:at] + rng.choice(TAGS) + text[at:]
        elif kind == 2:
            text = text[:at] + text[at + rng.randint(1, 60):]
        elif kind == 3:
            span = text[at:at + rng.randint(1, 200)]
            text = text[:at] + span * rng.randint(2, 20) + text[at:]
        elif kind == 4:
            text = text[:at]
        elif kind == 5:  # a byte flipped, decoded as a tokenizer decodes bytes that are not UTF-8
            raw = bytearray(text.encode("utf-8", "surrogatepass"))
            if raw:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            text = raw.decode("utf-8", "replace")
        elif kind == 6:  # a JSON value swapped for a hostile one
            colon = text.find(":", at)
            if colon != -1:
                end = min([i for i in (text.find(c, colon + 1) for c in ",}") if i != -1] or [len(text)])
                text = text[:colon + 1] + " " + rng.choice(HOSTILE_VALUES) + text[end:]
        else:
            text = text[:at] + "".join(rng.choice(PIECES + TAGS) for _ in range(rng.randint(5, 40))) + text[at:]
    return text


class Tally:
    def __init__(self):
        self.calls = collections.Counter()
        self.errors = collections.defaultdict(collections.Counter)
        self.broken = collections.Counter()
        self.first = {}

    def run(self, target: str, function, *args, **kwargs):
        self.calls[target] += 1
        try:
            return function(*args, **kwargs)
        except Exception as error:  # counted: the point of the script
            self.errors[target][type(error).__name__] += 1
            self.first.setdefault(target, (args[:1], traceback.format_exc(limit=3)))
            return None

    def check(self, target: str, holds: bool, what: str) -> None:
        if not holds:
            self.broken[f"{target}: {what}"] += 1


def as_json_reads_it(value):
    """`value` with every high surrogate followed by a low one as the one character the pair encodes: JSON's
    "\\ud800\\udc00" is U+10000, so those two code units side by side cannot read back as two. (No tokenizer
    decodes to surrogates; the mutations insert them to try the writer.)"""
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    if isinstance(value, dict):
        return {as_json_reads_it(k): as_json_reads_it(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json_reads_it(v) for v in value]
    return value


def in_unit(value) -> bool:
    return value is None or (isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="how many mutated responses")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutations")
    parser.add_argument("--budget", type=int, default=500, help="observation character budget")
    args = parser.parse_args()

    registry = {"search": tools.search_tool(tools.BM25Search(data.wiki_corpus()), passage_chars=200),
                "calculator": tools.calculator_tool()}
    tokenizer = models.load_tokenizer(models.EMBEDDED)
    base = seeds(registry)
    rng, tally, half = random.Random(args.seed), Tally(), HalfJudge()
    start = time.perf_counter()
    for n in range(args.n):
        response, gold, question = base[n % len(base)]
        text = mutate(response, rng)
        # the tool loop, on every call the text holds (rollout runs the last one of a segment)
        for body in tally.run("find_tool_calls", tools.find_tool_calls, text) or []:
            call = tally.run("parse_tool_call", tools.parse_tool_call, body, registry)
            if call is None:
                continue
            observation = tally.run("execute", tools.execute, call, registry, args.budget)
            if observation is None:
                continue
            tally.check("execute", len(observation.text) <= args.budget, "observation over its budget")
            formatted = tally.run("format_tool_response", tools.format_tool_response, observation.text)
            tally.run("tokenizer", lambda t: tokenizer(t, add_special_tokens=False).input_ids, formatted)
            record = {"arguments": call.arguments, "error": call.error, "observation": observation.text}
            line = tally.run("jsonl_line", run_folder.jsonl_line, record)
            if line is not None:
                tally.check("jsonl_line", json.loads(line) == as_json_reads_it(record) and "\n" not in line[:-1],
                            "no round trip")
                tally.run("utf-8", line.encode, "utf-8")
        # the rewards
        for target, reward in [
                ("prs_reward", lambda: prs.prs_reward(text, gold, registry, step=n % 10, total_steps=10).total),
                ("binary_reward", lambda: prs.binary_reward(text, gold).total),
                ("prs_longform_rewards", lambda: prs.prs_longform_rewards(
                    [text], [question], [gold[-1]], half, registry, step=n % 10, total_steps=10)[0].total),
                ("binary_longform_rewards", lambda: prs.binary_longform_rewards(
                    [text], [question], [gold[-1]], half)[0].total),
                ("trl_reward", lambda: prs_adapters.trl_reward([question], [text], golden_answers=[gold])[0]),
                ("compute_score", lambda: prs_adapters.compute_score("wiki", text, {"target": gold})["score"])]:
            tally.check(target, in_unit(tally.run(target, reward)), "reward outside [0, 1]")  # None: raised
        answer = tally.run("extract_answer", tools.extract_answer, text)
        line = tally.run("jsonl_line", run_folder.jsonl_line, {"answer": answer, "response": text})
        if line is not None:
            tally.check("jsonl_line", json.loads(line) == as_json_reads_it({"answer": answer, "response": text}),
                        "no round trip")
        verdict = tally.run("parse_verdict", judge.parse_verdict, text)
        tally.check("parse_verdict", verdict is None or 0 <= verdict[0] <= 1, "score outside [0, 1]")
        if (n + 1) % 10_000 == 0:
            print(f"{n + 1} responses, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    seconds = time.perf_counter() - start
    print(f"{args.n} mutated responses (seed {args.seed}) in {seconds:.0f} s\n")
    print(f"{'target':<26}{'calls':>10}{'exceptions':>12}")
    for target, calls in tally.calls.items():
        errors = sum(tally.errors[target].values())
        kinds = ", ".join(f"{name} {count}" for name, count in tally.errors[target].items())
        print(f"{target:<26}{calls:>10}{errors:>12}" + (f"   ({kinds})" if kinds else ""))
    print(f"\nbroken promises: {sum(tally.broken.values())}")
    for what, count in tally.broken.items():
        print(f"  {what}: {count}")
    for target, (example, trace) in tally.first.items():
        print(f"\nfirst exception in {target} on {str(example)[:200]!r}:\n{trace}")
    sys.exit(1 if tally.errors or tally.broken else 0)


if __name__ == "__main__":
    main()
