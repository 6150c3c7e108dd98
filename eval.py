"""Evaluate a tool-using agent: the embedded default, a hub model or a checkpoint folder, with the real tool loop.

    python eval.py                                            # the embedded model on the wiki test split
    python eval.py --model runs/default/checkpoints/step-000020
    python eval.py --task nq_test.jsonl hotpotqa_dev.jsonl --corpus wiki-18.jsonl --retriever http://127.0.0.1:8000

Each question gets one trajectory (greedy by default) from rollout.py. Short-form answers are scored by exact match
(EM, the number the papers report), token F1 and length-aware BLEU (prs.py); long-form answers by an LLM judge
(accuracy = judge score >= 0.7). Also reported: how often the agent answered, how often its response was well
formed, tool calls per question and the share of them that parsed, and why trajectories stopped. The trajectories
are written as jsonl; a table is printed, one row per task and, with several tasks, their average (as the papers
report over NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, Musique and Bamboogle).

The settings an agent is made of (model, retrieval, tool-loop limits, judge) are settings.AgentArgs; the helpers below
build the agent from them, for eval.py and train.py alike.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import random
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import assets
import data
import judge as judge_lib
import models
import prs
import rollout
import settings
import tools as tool_lib
from cli import UsageError, parse, require


# ----------------------------------------------------------------------------------------------------------------------
# Building an agent from its settings
# ----------------------------------------------------------------------------------------------------------------------
def build_tools(args: settings.AgentArgs) -> dict[str, tool_lib.Tool]:
    """The agent's tools: `search` over the corpus (local BM25) or a Search-R1 retrieval server."""
    backend = search_backend(args.retriever, args.corpus, args.cache_dir)
    return {"search": tool_lib.search_tool(backend, topk=args.topk, passage_chars=args.passage_chars or None)}


@functools.lru_cache(maxsize=4)
def search_backend(retriever: str, corpus: str, cache_dir: str):
    """A search backend, built once per process for given settings (indexing 10k documents takes ~1 s)."""
    if retriever.startswith(("http://", "https://")):
        client = tool_lib.SearchR1Client(retriever)
        try:  # once at the start: a server that is down fails here, not as an error string in every observation
            client("test", 1)
        except RuntimeError as error:
            raise UsageError(f"--retriever {retriever!r}: {error}") from None
        return client
    require(retriever == "bm25", "retriever", retriever, "use bm25 or the http(s) URL of a Search-R1 server")
    return tool_lib.BM25Search(data.load_corpus(corpus, cache_dir or None))


def rollout_config(args: settings.AgentArgs, **settings) -> rollout.RolloutConfig:
    return rollout.RolloutConfig(max_tool_calls=args.max_tool_calls, max_new_tokens=args.max_new_tokens,
                                 max_total_tokens=args.max_total_tokens, few_shot=args.few_shot, **settings)


def check_prompts_fit(tokenizer, examples, tools, config: rollout.RolloutConfig, what: str) -> None:
    """A clear error, before any work, where a question's prompt leaves no room to answer within --max-total-tokens
    (its trajectories would be scored as failures without the model writing a token)."""
    over = rollout.prompts_without_room(tokenizer, examples, tools, config)
    if over:
        example, length = over[0]
        where = example.meta.get("location") or f"question {example.id!r}"
        raise UsageError(f"{where}: the prompt (instructions, {'worked example, ' if config.few_shot else ''}"
                         f"question) is {length} tokens, so --max-total-tokens {config.max_total_tokens} leaves no "
                         f"room to answer ({len(over)} of the {len(examples)} {what} are that long); "
                         f"shorten them, or raise --max-total-tokens")


def build_judge(args: settings.AgentArgs, cache_path: str | None = None, check: bool = False
                ) -> judge_lib.Judge | None:
    """The long-form judge, or None when no judge model is configured. With `check` (the run has long-form answers to
    score) the judge is asked a probe question first, so that an endpoint that cannot judge stops the run now."""
    if not (args.judge_model or os.environ.get("JUDGE_MODEL")):
        return None
    try:
        judge = judge_lib.Judge(model=args.judge_model or None, base_url=args.judge_base_url or None,
                                api_key=args.judge_api_key or None, cache_path=cache_path)
        if check:
            judge.check()
    except ValueError as error:  # no API key
        raise UsageError(str(error)) from None
    except judge_lib.JudgeUnavailable as error:
        raise UsageError(f"{error}; check --judge-base-url, --judge-model and the API key (or OPENAI_BASE_URL, "
                         f"JUDGE_MODEL and OPENAI_API_KEY)") from None
    return judge


def device_and_dtype(args: settings.AgentArgs) -> tuple[torch.device, torch.dtype]:
    """--device auto: CUDA when available; --dtype auto: bf16 on CUDA, fp32 on the CPU (CPUs without native bf16,
    most of them, run bf16 matrix products far slower than fp32)."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r}: use auto, cpu, cuda or cuda:N") from None
        require(device.type != "cuda" or torch.cuda.is_available(), "device", args.device,
                "no CUDA device is available here; use --device cpu")
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return device, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]


def keep_freed_memory(device: torch.device) -> None:
    """Have the C library's allocator keep the memory that freed tensors leave, for the next tensors, instead of
    handing it back to the system and faulting it in again, where `device` is the CPU (train.py and eval.py call it).

    On a CPU every activation, gradient and logit of a pass is a fresh allocation of megabytes, and the largest (the
    output layer's gradient, 113 MB; logits over the vocabulary) are fresh every micro-batch. glibc maps each
    allocation above its mmap threshold (at most 32 MB) on its own and unmaps it when freed, and gives freed memory
    at the top of its heap back beyond a trim threshold; the next allocation then page-faults every 4 KB page in
    again, each zeroed by the kernel. Here every allocation comes from the heap and up to 2 GB may stay free at its
    top. The default run (2 cores, Intel Xeon, each run alone) took 2.5 million page faults against 9.3 million, 32
    against 52 s of system time, and 380 against 392 s (its update 136 against 150 s), every logged number the same.
    The cost: memory freed stays with the process, so its size stays near its peak (7.2 against 6.9 GB here). Not
    for a GPU run, whose host memory holds large one-off buffers (a checkpoint's copies). Where the C library is not
    glibc it does nothing."""
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_max, 0)  # every allocation from the heap
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # an int: 2 GB


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring one evaluation
# ----------------------------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, examples, tools, config: rollout.RolloutConfig, judge: prs.AnswerJudge | None = None,
             progress: str | None = None):
    """Roll out one trajectory per example and score it. Returns (metrics, records): metrics is a flat dict of
    floats (means over questions), records one dict per question for the jsonl file. With `progress` (a name), a
    progress bar counts the questions answered."""
    with tqdm(total=len(examples), desc=progress, unit="question", disable=progress is None, leave=False,
              dynamic_ncols=True) as bar:
        trajectories = rollout.rollout(model, tokenizer, examples, tools, config,
                                       progress=lambda done: bar.update(done - bar.n))
    judged = _judge_scores(trajectories, judge)
    records = [_record(t, judged.get(i)) for i, t in enumerate(trajectories)]
    metrics = {name: mean_of(r[name] for r in records)
               for name in ("em", "f1", "la_bleu", "answered", "format", "tool_calls", "evidence")}
    calls = [c for t in trajectories for c in t.tool_calls]
    metrics["valid_calls"] = mean_of(c.call.ok for c in calls)  # None without a single call
    metrics["tool_failures"] = float(sum(c.failed for c in calls))  # valid calls whose tool raised
    stops = Counter(t.stop_reason for t in trajectories)
    metrics |= {f"stop_{reason}": stops[reason] / len(trajectories) for reason in rollout.STOP_REASONS}
    if any(r["reference"] for r in records):  # long-form: the judge's accuracy over the answers it could score
        metrics["judge_accuracy"] = mean_of(r["judge_match"] for r in records)
        metrics["judge_unscored"] = float(sum(i in judged and judged[i] is None for i in range(len(records))))
    metrics["questions"] = float(len(records))
    return metrics, records


def jsonl_line(record: dict) -> str:
    """One jsonl line for `record`, non-ASCII text kept readable. A model can write any escape, also a lone
    surrogate ("\\ud800"), which UTF-8 cannot encode; it is written as its JSON escape, so the line is valid UTF-8
    and reads back to the same string.

    >>> jsonl_line({"query": "\\ud800 Paris, café"})
    '{"query": "\\\\ud800 Paris, café"}\\n'
    >>> json.loads(jsonl_line({"query": "\\ud800 Paris"}))["query"] == "\\ud800 Paris"
    True
    """
    text = json.dumps(record, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8") + "\n"  # only lone surrogates are replaced


def mean_of(values) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _judge_scores(trajectories, judge) -> dict[int, float | None]:
    """Judge match (1/0, None = unscored) of the long-form trajectories, by index."""
    long_form = [i for i, t in enumerate(trajectories) if t.example.reference]
    if not long_form or judge is None:
        return {}
    results = prs.binary_longform_rewards([trajectories[i].text for i in long_form],
                                          [trajectories[i].example.question for i in long_form],
                                          [trajectories[i].example.reference for i in long_form], judge)
    return {i: r.total for i, r in zip(long_form, results)}


def _record(t: rollout.Trajectory, judge_match) -> dict:
    gold = list(t.example.answers)
    short_form = not t.example.reference  # long-form answers are judged, not matched against the title
    return {
        "id": t.example.id, "question": t.example.question, "gold": gold, "reference": t.example.reference,
        "answer": t.answer, "em": prs.exact_match(t.answer, gold) if short_form else None,
        "f1": prs.token_f1(t.answer, gold) if short_form else None,
        "la_bleu": prs.answer_score(t.answer, gold) if short_form else None, "answered": float(t.answer is not None),
        "format": prs.format_score(t.text), "evidence": prs.evidence_score(t.text, gold),
        "tool_calls": float(len(t.tool_calls)), "judge_match": judge_match, "stop_reason": t.stop_reason,
        "calls": [{"ok": c.call.ok, "error": c.call.error, "arguments": c.call.arguments, "failed": c.failed}
                  for c in t.tool_calls],
        "response": t.text,
    }


# ----------------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------------
COLUMNS = (("EM", "em"), ("F1", "f1"), ("LA-BLEU", "la_bleu"), ("answered", "answered"), ("format", "format"),
           ("calls/q", "tool_calls"), ("valid calls", "valid_calls"), ("judge acc", "judge_accuracy"),
           ("unscored", "judge_unscored"), ("N", "questions"))


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Rows per task; with more than one task, a final row with the unweighted average over the tasks that have the
    metric (as the papers average EM over datasets) and the total number of questions."""
    rows = dict(results)
    if len(results) > 1:
        rows["average"] = {key: mean_of(m.get(key) for m in results.values()) for _, key in COLUMNS}
        rows["average"]["questions"] = sum(m["questions"] for m in results.values())
        rows["average"]["judge_unscored"] = None
    columns = [(title, key) for title, key in COLUMNS if any(m.get(key) is not None for m in rows.values())]
    width = max(len(name) for name in rows) + 2
    lines = [f"{'task':<{width}}" + "".join(f"{title:>12}" for title, _ in columns)]
    for name, metrics in rows.items():
        cells = [_cell(metrics.get(key), key) for _, key in columns]
        lines.append(f"{name:<{width}}" + "".join(f"{cell:>12}" for cell in cells))
    return "\n".join(lines)


def _cell(value, key) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if key in ("questions", "judge_unscored") else f"{value:.3f}"


def task_names(tasks: list[str]) -> list[str]:
    """A short name per task: the built-in name or the file name; `folder/file` where file names repeat (FlashRAG
    keeps nq/test.jsonl next to hotpotqa/test.jsonl)."""
    stems = [Path(task).stem if task.endswith(".jsonl") else task for task in tasks]
    return [f"{Path(task).parent.name}/{stem}" if stems.count(stem) > 1 else stem for task, stem in zip(tasks, stems)]


def result_files(output: Path, names: list[str]) -> list[Path]:
    """What an evaluation writes into --output: one <task>.jsonl per task, then metrics.json."""
    return [output / f"{name.replace('/', '_')}.jsonl" for name in names] + [output / "metrics.json"]


USER_ERRORS = (UsageError, data.DataError, models.ModelLoadError, assets.AssetError)


def main(argv=None) -> None:
    args = parse(settings.EvalArgs, argv, __doc__)
    seed_everything(args.seed)
    try:
        device, dtype = device_and_dtype(args)
        keep_freed_memory(device)  # a faster CPU run, the same numbers
        names = task_names(args.task)
        require(len(set(names)) == len(names), "task", args.task, "names a task twice")
        require(not Path(args.output).exists() or Path(args.output).is_dir(), "output", args.output,
                "a file, not a folder; choose a folder for the results")
        refuse_to_replace(Path(args.output), names)  # before the model loads; again once the folder is held
        tasks = {name: data.load_task(task, args.split, args.cache_dir or None) for name, task in zip(names, args.task)}
        judge = build_judge(args, cache_path=None, check=any(e.reference for task in tasks.values() for e in task))
        model, tokenizer = models.load_model(args.model, device=device, dtype=dtype, cache=args.cache_dir or None)
        tools = build_tools(args)
        config = rollout_config(args, group_size=1, temperature=args.temperature, batch_size=args.batch_size)
        for name, examples in tasks.items():
            check_prompts_fit(tokenizer, examples[:args.limit] if args.limit else examples, tools, config,
                              f"questions of task {name}")
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    output = Path(args.output)
    import run_folder  # here, not at the top: run_folder imports this module
    try:
        with run_folder.exclusive(output, "--output"):  # one evaluation at a time writes into a folder
            refuse_to_replace(output, names)  # another may have finished there while this one loaded its model
            results = write_results(output, names, tasks, args.limit, model, tokenizer, tools, config, judge)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    print(format_table(results))
    print(f"trajectories and metrics.json written to {output}/")


def refuse_to_replace(output: Path, names: list[str]) -> None:
    written = [path.name for path in result_files(output, names) if path.exists()]
    require(not written, "output", str(output), f"would replace files already there ({', '.join(written)}: an "
                                                f"earlier evaluation, or a task file); choose another --output")


def write_results(output: Path, names, tasks, limit, model, tokenizer, tools, config, judge) -> dict:
    """Evaluate each task and write its trajectories (one .jsonl per task) and, last, metrics.json."""
    results, files = {}, result_files(output, names)
    for (name, examples), path in zip(tasks.items(), files):
        examples = examples[:limit] if limit else examples
        metrics, records = evaluate(model, tokenizer, examples, tools, config, judge, progress=name)
        if any(e.reference for e in examples) and judge is None:
            print(f"{name}: long-form answers need a judge (--judge-model, --judge-base-url); judge accuracy "
                  f"is not reported")
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(jsonl_line(record) for record in records)
        results[name] = metrics
    files[-1].write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
