"""The papers' claims, measured here: train.py configurations x seeds on one budget, then a table and curves.

    python benchmarks/grid.py                      # every cell x 3 seeds (resumable), then the table and the figure
    python benchmarks/grid.py --cells core         # the 2 x 2 grid {PRS, binary} x {VSPO, GRPO} first
    python benchmarks/grid.py --report-only --results benchmarks/results/grid   # redraw the committed table
    python benchmarks/grid.py --pause / --continue # stop the running grid while other heavy work runs alone

Each run is `train.py` with the cell's flags, the budget's flags and a seed, then `eval.py` on its final checkpoint
(greedy, the first --eval-wiki `wiki` test questions and the 73 `fanoutqa` questions). What a run leaves for the
table is one small JSON summary in --results (the flags that made it, the commit, its per-step metrics, its
evaluation, its cost), beside the table (grid.md) and the curves (curves.png). --results is a scratch folder under
--runs unless named: the committed summaries are in benchmarks/results/, and a grid writes there only when told to.
All summaries of one --results folder share one budget (model, steps, prompts, group size, lr, evaluation, extra
flags): a run or a report that would mix two is refused, naming the files. The runs themselves (logs,
checkpoints) go to --runs and are deleted down to their logs once summarised; the grid deletes only folders it made.

Resumable: a run whose summary exists (with the same flags) is skipped; a run that was killed continues from its
newest checkpoint (train.py --resume), or starts again when it had none. One grid at a time runs in a --runs
folder: a second one stops at once, naming the first. Run nothing heavy beside it: two torch processes on a 2-core
machine oversubscribe OpenMP's threads and both slow down many times over.

The claims (docs/METHOD.md §3, §5 and the papers' abstracts) and the cells that test them:

    PRS beats a binary reward (format mastered sooner, higher accuracy)   prs-vspo, binary-vspo, prs-grpo, binary-grpo
    VSPO beats GRPO (fewer dead groups, higher accuracy)                 the same four
    random replacement brings no gain                                   prs-vspo vs prs-vspo-random
    without value-smoothing clipping VSPO destabilises (KL rises)       prs-vspo vs prs-vspo-noclip
    DAPO-style refilling, for reference                                 prs-dapo
    iStar's step credit beats outcome credit                            prs-vspo vs prs-vspo-istar

A difference is called one only where the seeds separate: every seed of one cell beats every seed of the other
(with 3 seeds a side, the exact two-sided permutation test's smallest p, 0.1). Otherwise the table says "no
difference at this budget".
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_folder  # noqa: E402

CELLS = {  # name: (train.py flags, what it is)
    "prs-vspo": ([], "PRS + VSPO (the papers' method)"),
    "binary-vspo": (["--reward", "binary"], "binary EM + VSPO"),
    "prs-grpo": (["--algorithm", "grpo"], "PRS + GRPO"),
    "binary-grpo": (["--reward", "binary", "--algorithm", "grpo"], "binary EM + GRPO"),
    "prs-vspo-random": (["--replacement", "random"], "PRS + VSPO, random replacement"),
    "prs-vspo-noclip": (["--value-clip", "off"], "PRS + VSPO, no value-smoothing clipping"),
    "prs-dapo": (["--algorithm", "dapo"], "PRS + DAPO (drop dead groups, refill with fresh prompts)"),
    "prs-vspo-istar": (["--credit", "istar"], "PRS + VSPO + iStar step credit"),
}
GROUPS = {"core": ["prs-vspo", "binary-vspo", "prs-grpo", "binary-grpo"],
          "ablations": ["prs-vspo-random", "prs-vspo-noclip", "prs-dapo"], "credit": ["prs-vspo-istar"]}
GROUPS["all"] = GROUPS["core"] + GROUPS["ablations"] + GROUPS["credit"]
# (cell a, cell b, metric, which way is better, the claim)
CLAIMS = [
    ("prs-vspo", "binary-vspo", "mastery_step", "lower", "PRS masters the format sooner than binary (VSPO)"),
    ("prs-grpo", "binary-grpo", "mastery_step", "lower", "PRS masters the format sooner than binary (GRPO)"),
    ("prs-vspo", "binary-vspo", "wiki_em", "higher", "PRS scores higher EM than binary (VSPO)"),
    ("prs-grpo", "binary-grpo", "wiki_em", "higher", "PRS scores higher EM than binary (GRPO)"),
    ("prs-vspo", "prs-grpo", "dead_in_batch", "lower", "VSPO trains on fewer dead groups than GRPO (PRS)"),
    ("prs-vspo", "prs-grpo", "wiki_em", "higher", "VSPO scores higher EM than GRPO (PRS)"),
    ("prs-vspo", "prs-grpo", "wiki_f1", "higher", "VSPO scores higher F1 than GRPO (PRS)"),
    ("binary-vspo", "binary-grpo", "wiki_em", "higher", "VSPO scores higher EM than GRPO (binary)"),
    ("prs-vspo", "prs-vspo-random", "wiki_em", "higher", "value-based replacement beats random replacement"),
    ("prs-vspo", "prs-vspo-noclip", "kl_max", "lower", "without value-smoothing clipping the KL rises"),
    ("prs-vspo", "prs-vspo-noclip", "wiki_em", "higher", "value-smoothing clipping gives higher EM"),
    ("prs-vspo", "prs-dapo", "wiki_em", "higher", "VSPO scores higher EM than DAPO"),
    ("prs-vspo-istar", "prs-vspo", "wiki_em", "higher", "iStar credit scores higher EM than outcome credit"),
    ("prs-vspo-istar", "prs-vspo", "wiki_f1", "higher", "iStar credit scores higher F1 than outcome credit"),
]
MASTERY = 0.9  # well-formed fraction of a step's trajectories that counts as format mastery


# ---- Running one cell x seed ----
def budget_flags(args) -> list[str]:
    """The flags every run shares: the budget, the model, no evaluation inside train.py (eval.py does it after)."""
    return ["--model", args.model, "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
            "--group-size", str(args.group_size), "--lr", str(args.lr), "--eval-size", "0",
            "--save-every", str(args.save_every), "--keep-checkpoints", "1", *args.extra]


def run_command(command: list[str], log: Path, runs: Path) -> dict:
    """Run a command with its output appended to `log`. Returns its cost: CPU seconds (user + system) and wall
    seconds, less the time the grid was paused (`--pause`) while it ran."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    after, end = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    if completed.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited with {completed.returncode}; its output is in {log}")
    return {"cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "wall_s": end - start - paused_seconds(runs, start, end)}


# The machine is shared: `--pause` stops the running grid (SIGSTOP to the grid's process and the train.py or eval.py
# it runs, nothing else) so that other heavy work can run alone, `--continue` lets it go on. Paused time is left out
# of the runs' wall times. grid.pid names the grid while it runs.
def pause(runs: Path, stop: bool) -> None:
    pid_file = runs / "grid.pid"
    try:
        pid = int(pid_file.read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        raise SystemExit(f"error: no grid is running in {runs} ({pid_file} is missing, or names no live process)")
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {pid_file}: not a process id ({error}); no grid to {'pause' if stop else 'continue'}")
    if not any(Path(part.decode(errors="replace")).name == "grid.py" for part in command):  # not tests/test_grid.py
        raise SystemExit(f"error: {pid_file} names process {pid}, which is not a grid (a stale file): nothing done")
    for process in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):  # one may have ended meanwhile
            os.kill(process, signal.SIGSTOP if stop else signal.SIGCONT)
    with open(runs / "pauses.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"paused" if stop else "continued": time.time()}) + "\n")
    print(f"grid {'paused' if stop else 'continued'}")


def descendants(pid: int) -> list[int]:
    """The processes started by `pid`, and by them, ... (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def paused_seconds(runs: Path, start: float, end: float) -> float:
    """Seconds of [start, end] during which the grid was paused."""
    path, total, since = runs / "pauses.jsonl", 0.0, None
    for row in run_folder.read_jsonl(path) if path.exists() else []:
        if "paused" in row:
            since = row["paused"] if since is None else since
        elif since is not None:
            total += max(0.0, min(end, row["continued"]) - max(start, since))
            since = None
    return total


def run_one(args, cell: str, seed: int) -> Path:
    """Train and evaluate one cell x seed (or continue a killed run), write its summary, and return its path."""
    flags = CELLS[cell][0] + budget_flags(args) + ["--seed", str(seed)]
    summary_path = Path(args.results) / f"{cell}-seed{seed}.json"
    if summary_path.exists():
        summary = read_summary(summary_path)
        if summary["flags"] == flags:
            return summary_path
        raise SystemExit(f"error: {summary_path} holds a run of other settings ({' '.join(summary['flags'])}); a "
                         f"grid never replaces one: choose another --results")
    folder = own_folder(Path(args.runs) / cell / f"seed{seed}", flags)
    log, cost_path = folder / "grid.log", folder / "cost.json"
    # what the run has cost so far, over every attempt (a killed training that continues adds to it)
    cost = json.loads(cost_path.read_text()) if cost_path.exists() else {"cpu_s": 0.0, "train_wall_s": 0.0}
    final = folder / "checkpoints" / f"step-{args.steps:06d}"
    if not final.exists():
        resume = run_folder.newest_checkpoint(folder) is not None
        command = ([sys.executable, "train.py", "--resume", str(folder)] if resume else
                   [sys.executable, "train.py", *flags, "--output-dir", str(folder)])
        print(f"{cell} seed {seed}: {'continuing' if resume else 'training'} ({log})", flush=True)
        spent = run_command(command, log, Path(args.runs))
        cost = {"cpu_s": cost["cpu_s"] + spent["cpu_s"], "train_wall_s": cost["train_wall_s"] + spent["wall_s"]}
        write_json(cost_path, cost)
    evaluation = folder / "eval"
    shutil.rmtree(evaluation, ignore_errors=True)  # a killed evaluation starts again (in the grid's own folder)
    print(f"{cell} seed {seed}: evaluating", flush=True)
    spent = run_command([sys.executable, "eval.py", "--model", str(final), "--task", "wiki", "fanoutqa", "--limit",
                         str(args.eval_wiki), "--output", str(evaluation), *args.extra_eval], log, Path(args.runs))
    cost |= {"cpu_s": cost["cpu_s"] + spent["cpu_s"], "eval_wall_s": spent["wall_s"]}
    summary = summarise(cell, seed, flags, folder, cost)
    write_json(summary_path, summary)
    shutil.rmtree(folder / "checkpoints")  # the summary and the logs are what the table needs
    return summary_path


def own_folder(folder: Path, flags: list[str]) -> Path:
    """A run folder of the grid's for `flags`: made here, or made by an earlier grid (its grid_flags.json says so);
    one of other flags is cleared first, since nothing in it can be continued. A folder the grid did not make is
    refused, never deleted."""
    marker = folder / "grid_flags.json"
    if folder.exists() and not marker.is_file() and any(folder.iterdir()):
        raise SystemExit(f"error: {folder}: not a folder this grid made (no grid_flags.json), and not empty; move it "
                         f"away or choose another --runs")
    try:
        earlier = json.loads(marker.read_text()) if marker.is_file() else flags
    except (OSError, ValueError):
        earlier = None  # a marker cut short: the grid's own folder, of unknown flags
    if earlier != flags:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(flags))
    return folder


def read_summary(path: Path) -> dict:
    """A run's summary (or the base evaluation), or an error naming the file and the field: a file cut short by a
    kill, or edited, is never averaged into the table."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(summary, dict) and isinstance(summary.get("flags"), list)):
            raise ValueError("no flags")
        check_summary_fields(summary)
        return summary
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path}: not a run summary ({error}); delete it to run that cell and seed again")


def check_summary_fields(summary: dict) -> None:
    """Raise a ValueError naming the first figure of `summary` that is not a number (or null: a metric not logged)."""
    steps, evaluation = summary.get("steps", []), summary.get("eval")
    if not (isinstance(steps, list) and all(isinstance(row, dict) and "step" in row for row in steps)):
        raise ValueError("steps: not a list of steps")
    if not (isinstance(evaluation, dict) and all(isinstance(task, dict) for task in evaluation.values())):
        raise ValueError("eval: not an evaluation per task")
    figures = [(f"steps[{i}].{key}", value) for i, row in enumerate(steps) for key, value in row.items()]
    figures += [(f"eval.{task}.{key}", value) for task, numbers in evaluation.items() for key, value in numbers.items()]
    figures += [(key, summary[key]) for key in ("train_wall_s", "eval_wall_s", "cpu_s") if key in summary]
    for where, value in figures:
        if not (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))):
            raise ValueError(f"{where}: {value!r} is not a number")


def summarise(cell: str, seed: int, flags: list[str], folder: Path, cost: dict) -> dict:
    """One run's summary: its per-step metrics (timings aside), its evaluation and its cost."""
    steps = [{k: v for k, v in row.items() if not k.startswith("time_")}
             for row in run_folder.read_jsonl(folder / "metrics.jsonl") if row["step"] > 0]
    steps = list({row["step"]: row for row in steps}.values())  # a resumed run logs each step once; keep the last
    evaluation = json.loads((folder / "eval" / "metrics.json").read_text())
    return {"cell": cell, "seed": seed, "flags": flags, "steps": steps, "eval": evaluation,
            "train_wall_s": cost["train_wall_s"], "eval_wall_s": cost["eval_wall_s"], "cpu_s": cost["cpu_s"],
            "machine": machine(), "commit": commit()}


def commit() -> str:
    """The commit of the code that ran (with "+changes" where the checkout differs from it)."""
    def git(*arguments):
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    cores = os.cpu_count()
    try:
        import torch
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        threads = torch.get_num_threads()
    except ImportError:
        device, threads = "?", "?"
    return f"{platform.machine()}, {cores} cores, torch threads {threads}, {device}"


def evaluate_base(args) -> Path:
    """The untrained model's evaluation (the same for every cell and seed: greedy), for the table's first row; kept
    with the flags that made it, and never replaced by one of other flags."""
    path = Path(args.results) / "base.json"
    flags = ["--model", args.model, "--task", "wiki", "fanoutqa", "--limit", str(args.eval_wiki), *args.extra_eval]
    if path.exists():
        base = read_summary(path) if path.read_text().strip() else {}
        if base.get("flags") == flags:
            return path
        raise SystemExit(f"error: {path} holds the evaluation of other settings ({' '.join(base.get('flags', []))});"
                         f" choose another --results")
    folder = own_folder(Path(args.runs) / "base", flags)
    shutil.rmtree(folder / "eval", ignore_errors=True)  # a killed evaluation starts again
    print("base model: evaluating", flush=True)
    run_command([sys.executable, "eval.py", *flags, "--output", str(folder / "eval")], folder / "grid.log",
                Path(args.runs))
    write_json(path, {"flags": flags, "commit": commit(),
                      "eval": json.loads((folder / "eval" / "metrics.json").read_text())})
    return path


def write_json(path: Path, value) -> None:
    """Write a summary whole or not at all, a kill or a power cut mid-write included (run_folder.write_atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run_folder.write_atomically(path, json.dumps(value, indent=1) + "\n")


# ---- From summaries to figures per run, per cell, and the claims ----
def figures(summary: dict, prompts_per_step: int) -> dict:
    """The table's figures of one run."""
    steps = summary["steps"]
    mastered = [row["step"] for row in steps if (row.get("well_formed") or 0) >= MASTERY]
    wiki, fanout = summary["eval"].get("wiki", {}), summary["eval"].get("fanoutqa", {})
    return {"mastery_step": mastered[0] if mastered else None,
            "wiki_em": wiki.get("em"), "wiki_f1": wiki.get("f1"), "wiki_la_bleu": wiki.get("la_bleu"),
            "wiki_format": wiki.get("format"), "fanout_em": fanout.get("em"), "fanout_f1": fanout.get("f1"),
            "fanout_la_bleu": fanout.get("la_bleu"), "fanout_format": fanout.get("format"),
            "dead_fraction": statistics.fmean(row["dead_fraction"] for row in steps),
            "dead_in_batch": statistics.fmean(row.get("dead_in_batch") or 0.0 for row in steps),
            "trained_on": sum(row["trained_on"] for row in steps),
            "extra_rollouts": round(sum(row["extra_rollouts_per_prompt"] for row in steps) * prompts_per_step),
            "sampled": sum(row["trajectories"] for row in steps),
            "kl_max": max((row.get("kl_ref") or 0.0) for row in steps),
            "wall_min": (summary["train_wall_s"] + summary["eval_wall_s"]) / 60, "cpu_min": summary["cpu_s"] / 60,
            **istar_figures(steps)}


def istar_figures(steps: list[dict]) -> dict:
    """iStar's PRM over a run, from train.py's istar_* diagnostics (None without iStar): the share of its success/
    failure pairs it ranked right before each update (all of the run's pairs together), the steps without a pair, the
    mean within-group correlation of summed step rewards with the outcome, and the mean log-ratio to the policy
    (negative: drift; README, "Reading it beside the paper", says how to read them)."""
    logged = [row for row in steps if "istar_pairs" in row]
    pairs = [(row["istar_pair_accuracy"], row["istar_pairs"]) for row in logged if row["istar_pairs"]]

    def mean(key):
        values = [row[key] for row in logged if row.get(key) is not None and math.isfinite(row[key])]
        return statistics.fmean(values) if values else None

    return {"prm_pair_accuracy": sum(a * n for a, n in pairs) / sum(n for _, n in pairs) if pairs else None,
            "prm_steps_without_pairs": sum(not row["istar_pairs"] for row in logged) if logged else None,
            "prm_outcome_correlation": mean("istar_outcome_correlation"), "prm_log_ratio": mean("istar_log_ratio_mean")}


def mean_sd(values) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def permutation_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided permutation test on the difference of means: the share of all splits of the pooled values
    into groups of len(a) and len(b) whose difference is at least as large as the observed one."""
    pooled, observed = a + b, abs(statistics.fmean(a) - statistics.fmean(b))
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    extreme = 0
    for chosen in splits:
        left = [pooled[i] for i in chosen]
        right = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        extreme += abs(statistics.fmean(left) - statistics.fmean(right)) >= observed - 1e-12
    return extreme / len(splits)


def verdict(a: list, b: list, better: str, steps: int) -> tuple[str, float | None]:
    """Whether cell a beats cell b on a metric: "yes" where every seed of a beats every seed of b, "reversed" where
    every seed of b beats every seed of a, else "no difference at this budget". A format never mastered counts as
    steps + 1 (later than any step of the run)."""
    a = [steps + 1 if v is None else v for v in a]
    b = [steps + 1 if v is None else v for v in b]
    if len(a) < 2 or len(b) < 2:
        return "too few seeds", None
    p = permutation_p(a, b)
    wins = (lambda x, y: x < y) if better == "lower" else (lambda x, y: x > y)
    if all(wins(x, y) for x in a for y in b):
        return "yes", p
    if all(wins(y, x) for x in a for y in b):
        return "reversed", p
    return "no difference at this budget", p


# ---- The table and the figure ----
TABLE = [  # (column, figure key, format)
    ("format mastery step", "mastery_step", "{:.1f}"), ("wiki EM", "wiki_em", "{:.3f}"),
    ("wiki F1", "wiki_f1", "{:.3f}"), ("wiki LA-BLEU", "wiki_la_bleu", "{:.3f}"),
    ("wiki well-formed", "wiki_format", "{:.2f}"), ("fanoutqa EM", "fanout_em", "{:.3f}"),
    ("fanoutqa F1", "fanout_f1", "{:.3f}"), ("fanoutqa LA-BLEU", "fanout_la_bleu", "{:.3f}"),
    ("fanoutqa well-formed", "fanout_format", "{:.2f}"), ("dead groups sampled", "dead_fraction", "{:.2f}"),
    ("dead groups trained on", "dead_in_batch", "{:.2f}"), ("trajectories trained on", "trained_on", "{:.0f}"),
    ("extra rollouts", "extra_rollouts", "{:.0f}"), ("trajectories sampled", "sampled", "{:.0f}"),
    ("max KL", "kl_max", "{:.4f}"), ("wall min", "wall_min", "{:.1f}"),
    ("CPU min", "cpu_min", "{:.0f}"),
]
ISTAR_TABLE = [  # shown for the cells that ran iStar
    ("PRM pairs ranked right", "prm_pair_accuracy", "{:.2f}"),
    ("steps without a pair", "prm_steps_without_pairs", "{:.0f}"),
    ("step rewards' correlation with the outcome", "prm_outcome_correlation", "{:.2f}"),
    ("mean log-ratio to the policy", "prm_log_ratio", "{:.3f}")]


def cell_text(values: list, fmt: str) -> str:
    """mean ± sd (per-seed values) of one cell's figure; a format never mastered shows as —."""
    shown = ", ".join("—" if v is None else fmt.format(v) for v in values)
    stats = mean_sd(values)
    if stats is None:
        return f"— ({shown})"
    never = " + never" * (None in values)
    return f"{fmt.format(stats[0])} ± {fmt.format(stats[1])}{never} ({shown})"


def budget_of(summary: dict) -> tuple:
    """What a run shares with every run it may be compared with: its flags without the cell's own and the seed, and
    how many questions of each task its evaluation answered."""
    flags = summary["flags"][len(CELLS.get(summary.get("cell"), ([], ""))[0]):]
    flags = flags[:-2] if flags[-2:-1] == ["--seed"] else flags
    return tuple(flags), tuple(sorted((task, m.get("questions")) for task, m in summary.get("eval", {}).items()))


def report(args) -> tuple[Path, Path]:
    """Write the markdown table (with the claims) and the figure from the summaries in --results, all of one budget
    (a folder that mixes two is refused, naming a file of each)."""
    results = Path(args.results)
    runs, budgets = {}, {}
    for path in sorted(results.glob("*-seed*.json")):
        summary = read_summary(path)
        runs.setdefault(summary["cell"], []).append(summary)
        budgets.setdefault(budget_of(summary), path)
    if not runs:
        raise SystemExit(f"error: no run summaries in {results}; run the grid first")
    if len(budgets) > 1:
        (a, path_a), (b, path_b) = list(budgets.items())[:2]
        raise SystemExit(f"error: {results} mixes runs of other settings: {path_a.name} ({' '.join(a[0])}) and "
                         f"{path_b.name} ({' '.join(b[0])}); keep one budget per --results folder")
    (flags, questions), = budgets
    budget = dict(zip(flags[0::2], flags[1::2]))
    steps = int(budget.get("--steps", args.steps))
    cells = [cell for cell in CELLS if cell in runs]
    prompts = int(budget.get("--prompts-per-step", args.prompts_per_step))
    per_cell = {cell: [figures(s, prompts) for s in sorted(runs[cell], key=lambda s: s["seed"])] for cell in cells}
    lines = [f"Budget: {' '.join(flags)}; evaluation greedy on "
             f"{' and '.join(f'{n:.0f} `{task}`' for task, n in questions)} questions. Each cell: mean ± sd over seeds "
             f"(the per-seed values in brackets, seed 0 first); format mastery is the first step whose trajectories "
             f"are ≥ {MASTERY:.0%} well-formed (— : not within the budget).", ""]
    base_path = results / "base.json"
    if base_path.exists():
        base = read_summary(base_path)["eval"]
        lines += [f"Before training (the same for every cell and seed): wiki EM {base['wiki']['em']:.3f}, F1 "
                  f"{base['wiki']['f1']:.3f}, well-formed {base['wiki']['format']:.2f}; fanoutqa EM "
                  f"{base['fanoutqa']['em']:.3f}, F1 {base['fanoutqa']['f1']:.3f}, well-formed "
                  f"{base['fanoutqa']['format']:.2f}.", ""]
    istar_cells = [cell for cell in cells if any(f["prm_pair_accuracy"] is not None for f in per_cell[cell])]
    for block, shown in ((TABLE[:9], cells), (TABLE[9:], cells), (ISTAR_TABLE, istar_cells)):
        if not shown:
            continue
        lines += ["| cell | seeds | " + " | ".join(name for name, _, _ in block) + " |",
                  "|---|---|" + "---|" * len(block)]
        for cell in shown:
            lines.append(f"| {cell} | {len(per_cell[cell])} | " + " | ".join(
                cell_text([f[key] for f in per_cell[cell]], fmt) for _, key, fmt in block) + " |")
        lines.append("")
    lines += ["| claim | metric | a | b | seeds separate? | permutation p |", "|---|---|---|---|---|---|"]
    for a, b, key, better, claim in CLAIMS:
        if a in per_cell and b in per_cell:
            answer, p = verdict([f[key] for f in per_cell[a]], [f[key] for f in per_cell[b]], better, steps)
            fmt = dict((k, f) for _, k, f in TABLE).get(key, "{:.3f}")
            lines.append(f"| {claim} | {key} ({better} is better) | {a}: "
                         f"{cell_text([f[key] for f in per_cell[a]], fmt)} | {b}: "
                         f"{cell_text([f[key] for f in per_cell[b]], fmt)} | {answer} | "
                         f"{'—' if p is None else f'{p:.2f}'} |")
    machines = sorted({s["machine"] for summaries in runs.values() for s in summaries})
    lines += ["", f"Machine: {'; '.join(machines)}. Wall time of the whole grid: "
                  f"{sum(f['wall_min'] for fs in per_cell.values() for f in fs) / 60:.1f} h."]
    table = results / "grid.md"
    table.write_text("\n".join(lines) + "\n")
    return table, plot(runs, cells, results / "curves.png", prompts)


def plot(runs: dict, cells: list[str], path: Path, prompts_per_step: int) -> Path:
    """Curves of every cell, mean ± sd over seeds: against steps and against trajectories sampled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("well_formed", "well-formed (training rollouts)"), ("exact_match", "EM (training rollouts)"),
              ("dead_in_batch", "dead groups in the batch")]
    rows = [[c for c in GROUPS["core"] if c in cells], ["prs-vspo"] * ("prs-vspo" in cells)
            + [c for c in GROUPS["ablations"] + GROUPS["credit"] if c in cells]]
    rows = [row for row in rows if row]
    figure, axes = plt.subplots(len(rows), 2 * len(panels) - 1, figsize=(24, 4.5 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for colour, cell in zip(plt.cm.tab10.colors, row):
            series = [s["steps"] for s in runs[cell]]
            length = min(len(steps) for steps in series)
            x_steps = np.arange(1, length + 1)
            x_sampled = np.mean([np.cumsum([row_["trajectories"] for row_ in steps[:length]]) for steps in series], 0)
            for p, (key, title) in enumerate(panels):
                values = np.array([[row_.get(key) or 0.0 for row_ in steps[:length]] for steps in series])
                mean, sd = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(length)
                axes_x = [(axes[r][p], x_steps, "step")]
                if key != "dead_in_batch":
                    axes_x.append((axes[r][len(panels) + p], x_sampled, "trajectories sampled"))
                for axis, x, label in axes_x:
                    axis.plot(x, mean, color=colour, label=f"{cell} (n={len(series)})")
                    axis.fill_between(x, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=colour,
                                      alpha=0.15)  # every panel is a fraction
                    axis.set_title(title)
                    axis.set_xlabel(label)
                    axis.grid(alpha=0.3)
        axes[r][0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


# ---- The command line ----
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["all"],
                        help=f"cells or groups of cells to run: {', '.join(GROUPS)}, or any of {', '.join(CELLS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (0 .. N-1)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of every run")
    parser.add_argument("--prompts-per-step", type=int, default=2, help="prompts per step (before replacements)")
    parser.add_argument("--group-size", type=int, default=5, help="G, trajectories per prompt")
    parser.add_argument("--lr", type=float, default=2e-5, help="learning rate of every run")
    parser.add_argument("--save-every", type=int, default=5,
                        help="checkpoint every N steps, so that a killed run continues from there")
    parser.add_argument("--eval-wiki", type=int, default=100, help="wiki test questions of the final evaluation")
    parser.add_argument("--model", default="smollm2-135m", help="model of every run (tiny-random for a smoke test)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further train.py flags for every run (last on the line), e.g. --max-new-tokens 40")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "grid"), help="folder of the runs (not committed)")
    parser.add_argument("--results", default="",
                        help="folder of the per-run summaries, the table grid.md and the curves curves.png (default: "
                             "<runs>/results, a scratch folder; the committed grids are in benchmarks/results/)")
    parser.add_argument("--report-only", action="store_true", help="only redraw the table and the figure")
    parser.add_argument("--pause", action="store_true",
                        help="stop the running grid (and its train.py) so that other work can run alone; the paused "
                             "time is left out of its wall times")
    parser.add_argument("--continue", dest="go_on", action="store_true", help="let a paused grid go on")
    args = parser.parse_args(argv)
    if args.pause or args.go_on:
        return pause(Path(args.runs), stop=args.pause)
    args.results = args.results or str(Path(args.runs) / "results")
    cells = [c for name in args.cells for c in GROUPS.get(name, [name])]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        parser.error(f"--cells {' '.join(unknown)}: unknown; use {', '.join(GROUPS)} or {', '.join(CELLS)}")
    for flag, value, least in [("--steps", args.steps, 1), ("--seeds", args.seeds, 1),
                               ("--eval-wiki", args.eval_wiki, 1), ("--prompts-per-step", args.prompts_per_step, 1),
                               ("--group-size", args.group_size, 2), ("--save-every", args.save_every, 0)]:
        if value < least:
            parser.error(f"{flag} {value}: must be at least {least}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr {args.lr}: must be a positive number")
    # eval.py must build the same agent as train.py: the agent flags of --extra go to it too
    args.extra_eval = agent_flags(args.extra)
    if not args.report_only:
        try:  # one grid at a time in a --runs folder: a second would clear the first one's evaluations and runs
            with run_folder.exclusive(Path(args.runs), "--runs"):
                pid_file = Path(args.runs) / "grid.pid"
                pid_file.write_text(str(os.getpid()))
                try:
                    evaluate_base(args)
                    for seed in range(args.seeds):  # seed-major: every cell gets its first seed before any its third
                        for cell in cells:
                            path = run_one(args, cell, seed)
                            print(f"{cell} seed {seed}: {path}", flush=True)
                finally:
                    pid_file.unlink(missing_ok=True)
        except run_folder.UsageError as error:
            raise SystemExit(f"error: {error}") from None
    table, figure = report(args)
    print(table.read_text())
    print(f"table in {table}, figure in {figure}")


def agent_flags(extra: list[str]) -> list[str]:
    """The flags of `extra` that eval.py also takes (the agent's: model limits, retrieval, prompt)."""
    import dataclasses

    import settings

    agent = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(settings.AgentArgs)}
    agent |= {"--no-" + name[2:] for name in agent}
    kept, i = [], 0
    while i < len(extra):
        takes_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if extra[i] in agent:
            kept += extra[i:i + 1 + takes_value]
        i += 1 + takes_value
    return kept


if __name__ == "__main__":
    main()
