"""The command line of train.py and eval.py: --help explains every flag, a bad flag or a bad input file is named
(flag, value, file and line), every number is checked against its range."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import eval as evaluation
import models
import settings
import train
from conftest import small

ROOT = Path(__file__).resolve().parent.parent


# ---- The command line: --help, bad flags, missing files ----
def run_cli(*arguments):
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_explains_every_flag():
    result = run_cli("train.py", "--help")
    assert result.returncode == 0
    for field in dataclasses.fields(settings.TrainArgs):
        flag = "--" + field.name.replace("_", "-")
        assert flag in result.stdout, flag
    assert "(the paper: 5) (default: 5); at least 2" in " ".join(result.stdout.split())  # the group size


def test_a_bad_flag_on_the_command_line_is_named():
    result = run_cli("train.py", "--algorithm", "ppo")
    assert result.returncode == 2 and "argument --algorithm: invalid choice: 'ppo'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("main, arguments, message", [
    (train.main, ["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (train.main, ["--task", "missing.jsonl"], "error: missing.jsonl: no such file"),
    (train.main, ["--model", "./no-such-model"], "error: --model './no-such-model': no such folder"),
    (train.main, ["--resume", "/no/such/run"], "error: --resume /no/such/run: no checkpoint there"),
    (train.main, ["--retriever", "elastic"], "error: --retriever 'elastic': use bm25 or the http(s) URL"),
    (train.main, ["--step", "3"], "unrecognized arguments: --step 3"),
    (train.main, ["--retriever", "http://127.0.0.1:9"], "error: --retriever 'http://127.0.0.1:9': retrieval server "
                                                        "http://127.0.0.1:9/retrieve unreachable"),
    (train.main, ["--device", "gpu"], "error: --device 'gpu': use auto, cpu, cuda or cuda:N"),
    (train.main, ["--plot-only", "/no/such/run"], "error: --plot-only /no/such/run: no metrics.jsonl there"),
    (evaluation.main, ["--split", "dev"], "argument --split: invalid choice: 'dev'"),
    (evaluation.main, ["--model", "Qwen2.5-0.5B"], "could not load 'Qwen/Qwen2.5-0.5B-Instruct' from the Hugging"),
])
def test_bad_input_is_named(main, arguments, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unreachable hub, at once
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as stop:
        main([*arguments, "--output" if main is evaluation.main else "--output-dir", str(tmp_path)])
    said = str(stop.value.code) + capsys.readouterr().err
    assert stop.value.code != 0 and message in said


def test_a_question_whose_prompt_leaves_no_room_to_answer_is_a_clear_error_naming_its_line(tiny_agent, tmp_path):
    questions = tmp_path / "questions.jsonl"
    rows_ = [{"question": "Who wrote Hamlet?", "golden_answers": ["Shakespeare"]},
             {"question": "Who painted it? " * 300, "golden_answers": ["x"]}]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows_))
    rule = (f"{re.escape(str(questions))}:2: the prompt \\(instructions, question\\) is \\d+ tokens, so "
            f"--max-total-tokens 900 leaves no room to answer \\(1 of the 2 ")
    with pytest.raises(SystemExit, match=rule + "training questions"):  # before the first step, not a run of zeros
        train.main(small(tiny_agent, tmp_path / "run", "--task", str(questions), "--eval-task", "wiki"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(SystemExit, match=rule + "questions of task questions"):
        evaluation.main(["--model", str(tiny_agent), "--task", str(questions), "--output", str(tmp_path / "out"),
                         "--max-total-tokens", "900", "--no-few-shot"])
    assert not (tmp_path / "out").exists()


def test_a_malformed_question_file_names_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "ok?", "golden_answers": ["a"]}) + "\n" + json.dumps({"question": "q"}))
    with pytest.raises(SystemExit) as stop:
        evaluation.main(["--task", str(bad), "--model", models.TINY, "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"would replace files already there \(bad.jsonl: an earlier evaluation, or a "
                                         r"task file\)"):  # the task file itself is never written over
        evaluation.main(["--task", str(bad), "--model", models.TINY, "--output", str(tmp_path)])
    assert f"{bad}:2: missing field 'golden_answers'" in str(stop.value.code)


# ---- Nothing crashes, nothing is lost ----
@pytest.mark.parametrize("flag, value, message", [
    ("--istar-lr", "-1", "--istar-lr -1.0: must be at least 0"),
    ("--max-grad-norm", "-1", "--max-grad-norm -1.0: must be above 0"),
    ("--max-grad-norm", "0", "--max-grad-norm 0.0: must be above 0"),
    ("--lr", "inf", "--lr inf: must be a finite number above 0"),
    ("--kl-beta", "inf", "--kl-beta inf: must be a finite number at least 0"),
    ("--temperature", "inf", "--temperature inf: must be a finite number above 0"),
    ("--temperature", "0", "--temperature 0.0: must be above 0"),
    ("--success-threshold", "nan", "--success-threshold nan: must be a finite number in [0, 1)"),
    ("--istar-alpha", "nan", "--istar-alpha nan: must be a finite number at least 0"),
    ("--istar-beta", "-5", "--istar-beta -5.0: must be above 0"),
    ("--clip-eps-low", "5", "--clip-eps-low 5.0: must be in [0, 1)"),
    ("--group-size", "1", "--group-size 1: must be at least 2"),
    ("--top-p", "1.5", "--top-p 1.5: must be in (0, 1]"),
    ("--seed", "-1", f"--seed -1: must be in [0, {2**32 - 1}]"),
    ("--seed", str(2**32), f"--seed {2**32}: must be in [0, {2**32 - 1}]"),  # numpy's seeds end there
])
def test_every_number_is_checked_against_its_range_naming_its_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main([flag, value])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_eval_numbers_are_checked_too(capsys):
    with pytest.raises(SystemExit):
        evaluation.main(["--temperature", "nan"])
    assert "--temperature nan: must be a finite number at least 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluation.main(["--seed", str(2**32)])
    assert f"--seed {2**32}: must be in [0, {2**32 - 1}]" in capsys.readouterr().err


def test_help_shows_ranges_and_no_empty_choice():
    result = run_cli("train.py", "--help")
    assert "{," not in result.stdout and "{value,random,filter,none}" in result.stdout
    assert "(default: 1.0); above 0" in " ".join(result.stdout.split())  # --max-grad-norm's range


