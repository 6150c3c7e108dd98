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

The agent is built from its settings (settings.AgentArgs) by agent.py, as train.py builds it.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

import agent
import cpu_speed
import data
import models
import prs
import rollout
import settings
from cli import UsageError, parse, require
from run_folder import exclusive, jsonl_line, mean_of


# ---- Scoring one evaluation ----
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


# ---- The table ----
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


def main(argv=None) -> None:
    args = parse(settings.EvalArgs, argv, __doc__)
    agent.seed_everything(args.seed)
    try:
        device, dtype = agent.device_and_dtype(args)
        cpu_speed.keep_freed_memory(device)  # a faster CPU run, the same numbers
        names = task_names(args.task)
        require(len(set(names)) == len(names), "task", args.task, "names a task twice")
        files = [path.name for path in result_files(Path(args.output), names)]
        for i, j in ((i, j) for i in range(len(names)) for j in range(i + 1, len(names)) if files[i] == files[j]):
            raise UsageError(f"--task: {args.task[i]} and {args.task[j]} would both be written to {files[i]}, the "
                             f"second over the first; rename one of the files")
        require(not Path(args.output).exists() or Path(args.output).is_dir(), "output", args.output,
                "a file, not a folder; choose a folder for the results")
        refuse_to_replace(Path(args.output), names)  # before the model loads; again once the folder is held
        tasks = {name: data.load_task(task, args.split, args.cache_dir or None) for name, task in zip(names, args.task)}
        judge = agent.build_judge(args, check=any(e.reference for task in tasks.values() for e in task))
        model, tokenizer = models.load_model(args.model, device=device, dtype=dtype, cache=args.cache_dir or None)
        tools = agent.build_tools(args)
        config = agent.rollout_config(args, group_size=1, temperature=args.temperature, batch_size=args.batch_size)
        for name, examples in tasks.items():
            agent.check_prompts_fit(tokenizer, examples[:args.limit] if args.limit else examples, tools, config,
                                    f"questions of task {name}")
    except agent.USER_ERRORS as error:
        sys.exit(f"error: {error}")
    output = Path(args.output)
    try:
        with exclusive(output, "--output"):  # one evaluation at a time writes into a folder
            refuse_to_replace(output, names)  # another may have finished there while this one loaded its model
            results = write_results(output, names, tasks, args.limit, model, tokenizer, tools, config, judge)
    except agent.USER_ERRORS as error:
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
