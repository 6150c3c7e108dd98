"""benchmarks/grid.py: the claims' statistics, and a smoke run of the whole grid on the tiny agent (train.py and
eval.py as subprocesses, summaries, the table, the figure, a finished run skipped)."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import grid  # noqa: E402


def test_the_permutation_test_is_exact():
    # 3 against 3 fully separated: only the observed split and its mirror are as extreme, 2 of the 20 splits.
    assert grid.permutation_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert grid.permutation_p([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == 1.0
    # against a plain count over every relabelling
    a, b = [0.2, 0.5, 0.1], [0.4, 0.3, 0.6]
    observed = abs(sum(a) / 3 - sum(b) / 3)
    pooled = a + b
    import itertools
    count = sum(abs(sum(pooled[i] for i in s) / 3 - sum(pooled[i] for i in range(6) if i not in s) / 3)
                >= observed - 1e-12 for s in itertools.combinations(range(6), 3))
    assert grid.permutation_p(a, b) == pytest.approx(count / 20)


def test_a_claim_holds_only_where_every_seed_separates():
    assert grid.verdict([0.3, 0.4, 0.5], [0.1, 0.2, 0.25], "higher", 10)[0] == "yes"
    assert grid.verdict([0.3, 0.4, 0.5], [0.1, 0.2, 0.35], "higher", 10)[0] == "no difference at this budget"
    assert grid.verdict([0.1, 0.2, 0.25], [0.3, 0.4, 0.5], "higher", 10)[0] == "reversed"
    # a format never mastered counts as later than the budget
    assert grid.verdict([3, 4, 5], [None, None, 9], "lower", 10)[0] == "yes"
    assert grid.verdict([0.3], [0.1], "higher", 10)[0] == "too few seeds"


def test_paused_time_is_left_out_of_wall_times(tmp_path):
    (tmp_path / "pauses.jsonl").write_text('{"paused": 10.0}\n{"continued": 20.0}\n{"paused": 50.0}\n'
                                           '{"paused": 55.0}\n{"continued": 70.0}\n')
    assert grid.paused_seconds(tmp_path, 0.0, 100.0) == 10.0 + 20.0  # a second --pause while paused adds nothing
    assert grid.paused_seconds(tmp_path, 15.0, 60.0) == 5.0 + 10.0  # only the part inside the run counts
    assert grid.paused_seconds(tmp_path / "none", 0.0, 100.0) == 0.0


def test_only_agent_flags_reach_eval():
    extra = ["--max-new-tokens", "40", "--temperature", "1.0", "--no-few-shot", "--passage-chars", "60"]
    assert grid.agent_flags(extra) == ["--max-new-tokens", "40", "--no-few-shot", "--passage-chars", "60"]


def test_a_second_grid_on_the_same_runs_folder_stops_before_touching_it(tmp_path):
    runs = tmp_path / "runs"
    with grid.run_folder.exclusive(runs, "--runs"):  # what a grid running there holds
        (runs / "base").mkdir()
        with pytest.raises(SystemExit, match=f"--runs {runs}: in use by another run \\(pid "):
            grid.main(["--cells", "prs-vspo", "--runs", str(runs), "--results", str(tmp_path / "results"),
                       "--model", str(tmp_path / "no-model")])  # were it to run anything, it would fail at once
        assert sorted(p.name for p in runs.iterdir()) == ["base", "run.pid"]  # no grid.pid written over, nothing run


EXTRA = ["--extra", "--max-new-tokens", "40", "--max-total-tokens", "900", "--temperature", "1.0", "--no-few-shot",
         "--passage-chars", "60"]


def smoke_flags(agent, tmp_path, *more):
    return ["--model", str(agent), "--cells", "prs-vspo", "prs-grpo", "--seeds", "1", "--steps", "1",
            "--prompts-per-step", "2", "--group-size", "4", "--lr", "1e-3", "--eval-wiki", "2",
            "--runs", str(tmp_path / "runs"), *more, *EXTRA]


def test_the_grid_runs_summarises_skips_and_reports(tiny_agent, tmp_path, capsys):
    flags = smoke_flags(tiny_agent, tmp_path)  # no --results: a scratch folder under --runs, never the committed one
    grid.main(flags)
    results = tmp_path / "runs" / "results"
    assert not (tmp_path / "runs" / "grid.pid").exists()  # the grid says it runs only while it does
    names = sorted(p.name for p in results.glob("*.json"))
    assert names == ["base.json", "prs-grpo-seed0.json", "prs-vspo-seed0.json"]
    summary = json.loads((results / "prs-vspo-seed0.json").read_text())
    assert summary["cell"] == "prs-vspo" and summary["seed"] == 0 and len(summary["steps"]) == 1
    assert set(summary["eval"]) == {"wiki", "fanoutqa"} and summary["eval"]["wiki"]["questions"] == 2
    assert summary["cpu_s"] > 0 and summary["train_wall_s"] > 0
    assert not (tmp_path / "runs" / "prs-vspo" / "seed0" / "checkpoints").exists()  # deleted once summarised
    table = (results / "grid.md").read_text()
    assert "| prs-vspo | 1 |" in table and "| prs-grpo | 1 |" in table
    assert "VSPO scores higher EM than GRPO (PRS)" in table and "too few seeds" in table
    assert (results / "curves.png").stat().st_size > 10_000
    assert json.loads((results / "base.json").read_text())["flags"][:2] == ["--model", str(tiny_agent)]
    assert summary["flags"][:2] == ["--model", str(tiny_agent)] and summary["commit"]
    # A finished run is skipped: its summary is not written again, no train.py or eval.py runs.
    stamps = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    capsys.readouterr()
    grid.main(flags)
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")} == stamps
    assert ": training (" not in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "--steps 0: must be at least 1"), ("--group-size", "1", "--group-size 1: must be at least 2"),
    ("--lr", "nan", "--lr nan: must be a positive number"), ("--seeds", "0", "--seeds 0"),
    ("--save-every", "-1", "--save-every -1")])
def test_a_bad_budget_is_named_before_anything_runs(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        grid.main([flag, value, "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    assert message in capsys.readouterr().err and not (tmp_path / "runs").exists()


def summary_of(cell, seed, budget):
    return {"cell": cell, "seed": seed, "flags": [*grid.CELLS[cell][0], *budget, "--seed", str(seed)], "steps": [],
            "eval": {"wiki": {"questions": 100.0}, "fanoutqa": {"questions": 73.0}}}


def test_a_results_folder_never_mixes_budgets_or_models(tmp_path):
    # A smoke run of the tiny model beside a real 20-step summary: the table would average the two in one cell.
    results = tmp_path / "results"
    real = ["--model", "smollm2-135m", "--steps", "20"]
    grid.write_json(results / "prs-vspo-seed0.json", summary_of("prs-vspo", 0, real))
    tiny = ["--model", "tiny-random", "--steps", "1"]
    grid.write_json(results / "prs-vspo-seed1.json", summary_of("prs-vspo", 1, tiny))
    with pytest.raises(SystemExit, match="mixes runs of other settings: prs-vspo-seed0.json .* and prs-vspo-seed1"):
        grid.main(["--report-only", "--results", str(results)])
    assert not (results / "grid.md").exists()


def test_a_summary_of_other_settings_is_never_replaced(tiny_agent, tmp_path):
    results = tmp_path / "results"
    flags = smoke_flags(tiny_agent, tmp_path, "--results", str(results))
    extra_eval = grid.agent_flags(EXTRA[1:])
    base = ["--model", str(tiny_agent), "--task", "wiki", "fanoutqa", "--limit", "2", *extra_eval]
    grid.write_json(results / "base.json", {"flags": base, "eval": {}})
    grid.write_json(results / "prs-vspo-seed0.json", summary_of("prs-vspo", 0, ["--model", "smollm2-135m"]))
    before = (results / "prs-vspo-seed0.json").read_text()
    with pytest.raises(SystemExit, match="prs-vspo-seed0.json holds a run of other settings"):
        grid.main(flags)
    assert (results / "prs-vspo-seed0.json").read_text() == before
    assert not (tmp_path / "runs" / "prs-vspo").exists()  # nothing trained


def test_a_base_evaluation_of_other_settings_is_refused_and_a_folder_not_the_grids_is_kept(tmp_path):
    results, runs = tmp_path / "results", tmp_path / "runs"
    grid.write_json(results / "base.json", {"flags": ["--model", "smollm2-135m"], "eval": {}})
    with pytest.raises(SystemExit, match="base.json holds the evaluation of other settings"):
        grid.main(["--model", "tiny-random", "--runs", str(runs), "--results", str(results)])
    (results / "base.json").unlink()
    (runs / "base").mkdir(parents=True)
    (runs / "base" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="base: not a folder this grid made"):
        grid.main(["--model", "tiny-random", "--runs", str(runs), "--results", str(results)])
    assert (runs / "base" / "notes.txt").read_text() == "mine"


def test_a_summary_cut_short_is_named(tmp_path):
    (tmp_path / "prs-vspo-seed0.json").write_text('{"cell": "prs-vs')
    with pytest.raises(SystemExit, match="prs-vspo-seed0.json: not a run summary"):
        grid.main(["--report-only", "--results", str(tmp_path)])


@pytest.mark.parametrize("edit, named", [
    (lambda s: s["steps"][1].update(step="one"), "steps[1].step: 'one' is not a number"),
    (lambda s: s["steps"][0].update(reward=[0.5]), "steps[0].reward: [0.5] is not a number"),
    (lambda s: s["eval"]["wiki"].update(em="0.4"), "eval.wiki.em: '0.4' is not a number"),
    (lambda s: s.update(steps={"1": {}}), "steps: not a list of steps"),
    (lambda s: s.update(cpu_s=True), "cpu_s: True is not a number"),
])
def test_a_summary_with_a_field_of_the_wrong_type_is_named_not_averaged(edit, named, tmp_path):
    summary = {"cell": "prs-vspo", "seed": 0, "flags": [], "steps": [{"step": 1, "reward": 0.25},
                                                                     {"step": 2, "reward": 0.5}],
               "eval": {"wiki": {"em": 0.1}}, "train_wall_s": 1.0, "eval_wall_s": 1.0, "cpu_s": 2.0}
    (tmp_path / "prs-vspo-seed0.json").write_text(json.dumps(summary))
    assert grid.read_summary(tmp_path / "prs-vspo-seed0.json") == summary  # the summary as written reads back
    edit(summary)
    (tmp_path / "prs-vspo-seed0.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match=re.escape(f"prs-vspo-seed0.json: not a run summary ({named}")):
        grid.read_summary(tmp_path / "prs-vspo-seed0.json")


def test_summaries_reach_the_disk_before_they_replace_the_old_ones(tmp_path, monkeypatch):
    # A summary renamed into place before its bytes are on the disk can read back empty after a power cut: the
    # file's bytes and the folder's entry are both flushed (fsync) before and after the rename.
    synced = []
    real_fsync = grid.os.fsync
    monkeypatch.setattr(grid.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    grid.write_json(tmp_path / "results" / "prs-vspo-seed0.json", {"cell": "prs-vspo"})
    assert len(synced) >= 2  # the file, then the folder
    assert json.loads((tmp_path / "results" / "prs-vspo-seed0.json").read_text()) == {"cell": "prs-vspo"}
    assert [path.name for path in (tmp_path / "results").iterdir()] == ["prs-vspo-seed0.json"]  # no temporary left


def test_pause_stops_only_the_grid_and_what_it_runs(tmp_path):
    import os
    import subprocess
    import time

    runs = tmp_path / "runs"
    runs.mkdir()
    for content, message in [("", "not a process id"), ("garbage", "not a process id"),
                             (str(os.getpid()), "which is not a grid")]:  # this test's own process: never stopped
        (runs / "grid.pid").write_text(content)
        with pytest.raises(SystemExit, match=message):
            grid.main(["--pause", "--runs", str(runs)])
    # a process whose command line only ends in "grid.py" (pytest running tests/test_grid.py, say) is not a grid
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "tests/test_grid.py"])
    try:
        (runs / "grid.pid").write_text(str(other.pid))
        with pytest.raises(SystemExit, match="which is not a grid"):
            grid.main(["--pause", "--runs", str(runs)])
    finally:
        other.kill()
        other.wait()
    # a stand-in grid: a script named grid.py that starts a child, as the grid starts train.py
    script = tmp_path / "grid.py"
    script.write_text("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      "print(child.pid, flush=True)\ntime.sleep(60)\n")
    fake = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(fake.stdout.readline())
        (runs / "grid.pid").write_text(str(fake.pid))

        def state(pid):
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]

        grid.main(["--pause", "--runs", str(runs)])
        time.sleep(0.2)
        assert state(fake.pid) == state(child) == "T" and state(os.getpid()) != "T"
        grid.main(["--continue", "--runs", str(runs)])
        time.sleep(0.2)
        assert state(fake.pid) != "T" and state(child) != "T"
    finally:
        for pid in (fake.pid, child):
            os.kill(pid, 9)
        fake.wait()


def test_the_prms_figures_weigh_pairs_and_leave_out_steps_without_them():
    nan = float("nan")
    steps = [{"step": 1, "istar_pairs": 0.0, "istar_pair_accuracy": nan, "istar_outcome_correlation": nan,
              "istar_log_ratio_mean": 0.0},
             {"step": 2, "istar_pairs": 4.0, "istar_pair_accuracy": 0.0, "istar_outcome_correlation": -0.5,
              "istar_log_ratio_mean": -0.2},
             {"step": 3, "istar_pairs": 12.0, "istar_pair_accuracy": 1.0, "istar_outcome_correlation": 0.9,
              "istar_log_ratio_mean": -0.4}]
    figures = grid.istar_figures(steps)
    assert figures["prm_pair_accuracy"] == pytest.approx(12 / 16)  # pairs weigh, not steps (that would be 0.5)
    assert figures["prm_steps_without_pairs"] == 1
    assert figures["prm_outcome_correlation"] == pytest.approx(0.2)  # NaN (no pair) left out
    assert figures["prm_log_ratio"] == pytest.approx(-0.2)
    assert set(grid.istar_figures([{"step": 1, "reward": 0.5}]).values()) == {None}  # a run without iStar
