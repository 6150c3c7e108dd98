"""train.py and eval.py end to end on the tiny agent: what they write, exact resume, atomic checkpoints, clear
errors. Runs go through `main(argv)` in-process (the same code path as the command line, without re-importing torch
each time); the command-line tests run real subprocesses."""

import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import eval as evaluation
import models
import prs
import rollout
import run_folder
import settings
import train
import vspo
from cli import parse

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"step_seconds", "rollout_tokens_per_s"}  # with time_*, the only metrics that differ between identical runs


def small(agent, output, *extra):
    """Flags for a small, fast run of the tiny agent."""
    return ["--model", str(agent), "--output-dir", str(output), "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "40", "--max-total-tokens", "900", "--eval-size", "4", "--micro-batch-size", "4",
            "--temperature", "1.0", "--lr", "1e-3", "--no-few-shot", "--passage-chars", "60", *extra]


@pytest.fixture(scope="module")
def vspo_run(tiny_agent, tmp_path_factory):
    """One 2-step run of the default algorithm, shared by the tests that only read it or copy it."""
    output = tmp_path_factory.mktemp("vspo-run")
    train.main(small(tiny_agent, output, "--steps", "2"))
    return output


def copy_run(run, destination):
    shutil.copytree(run, destination)
    return destination


def rows(output):
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def assert_wrote_a_run(output, steps):
    metrics = rows(output)
    assert [row["step"] for row in metrics] == list(range(steps + 1))  # step 0 is the evaluation before training
    assert "eval_em" in metrics[0] and "eval_em" in metrics[-1]
    phases = {"time_rollout", "time_rewards", "time_replacement", "time_evaluation", "time_checkpoint"}
    assert phases <= set(metrics[-1]) and "time_evaluation" in metrics[0]  # each phase's seconds, and the whole
    assert sum(v for k, v in metrics[-1].items() if k.startswith("time_")) <= metrics[-1]["step_seconds"]
    checkpoint = output / "checkpoints" / f"step-{steps:06d}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.pt", "trainer_state.json"):
        assert (checkpoint / name).exists(), name
    assert (output / "checkpoints" / "latest").read_text() == checkpoint.name
    assert (output / "training_curves.png").stat().st_size > 10_000
    assert (output / "samples.jsonl").read_text().count("\n") >= steps
    models.load_model(str(checkpoint))  # a plain save_pretrained folder
    return metrics


@pytest.mark.parametrize("algorithm", ["vspo", "grpo", "dapo", "cispo"])
def test_each_algorithm_trains_and_writes_its_run(vspo_run, tiny_agent, tmp_path, algorithm):
    if algorithm == "vspo":
        output = vspo_run
    else:
        train.main(small(tiny_agent, tmp_path, "--steps", "2", "--algorithm", algorithm))
        output = tmp_path
    metrics = assert_wrote_a_run(output, steps=2)
    assert any(row["trained_on"] > 0 and row["skipped_updates"] == 0.0 for row in metrics[1:])
    assert all(0 <= row["reward"] <= 1 and "stage_format" in row and "clip_fraction" in row for row in metrics[1:])
    for row in metrics[1:]:
        replaced = row["extra_rollouts_per_prompt"] > 0
        assert replaced == (row["dead_fraction"] > 0 and algorithm in ("vspo", "dapo")), row


def test_binary_reward_replaces_dead_groups_and_keeps_those_it_could_not(tiny_agent, tmp_path):
    # The tiny agent almost never answers exactly: with EM every group is dead, VSPO rolls out replacements, and
    # when they are dead too they stay in the batch with advantage 0, as in GRPO (a KL-only step).
    train.main(small(tiny_agent, tmp_path, "--steps", "2", "--reward", "binary"))
    metrics = assert_wrote_a_run(tmp_path, steps=2)
    for row in metrics[1:]:
        assert row["dead_fraction"] == 1.0 and row["extra_rollouts_per_prompt"] == 4  # one round: G per prompt
        assert row["trajectories"] == 16 and row["trained_on"] == 8 and row["skipped_updates"] == 0.0
        assert "stage_exact_match" in row and "stage_format" not in row and 0 <= row["well_formed"] <= 1


def test_grpo_keeps_dead_groups_in_the_batch_and_dapo_drops_them(tiny_agent, tmp_path):
    # Vanilla GRPO (TRL, verl): a dead group's tokens count in the token-mean and the KL term, so the batch is every
    # trajectory. DAPO's filter leaves dead groups out: with every group dead there is nothing to train on.
    for algorithm in ("grpo", "dapo"):
        train.main(small(tiny_agent, tmp_path / algorithm, "--steps", "2", "--reward", "binary", "--eval-size", "0",
                         "--algorithm", algorithm))
    grpo, dapo = rows(tmp_path / "grpo"), rows(tmp_path / "dapo")
    for row in grpo:
        assert row["dead_fraction"] == 1.0 and row["trajectories"] == row["trained_on"] == 8
        assert row["skipped_updates"] == 0.0 and row["kl_ref"] >= 0  # a KL-only step: every advantage is 0
    for row in dapo:
        assert row["dead_fraction"] == 1.0 and row["trajectories"] == 16 and row["trained_on"] == 0
        assert row["skipped_updates"] == 1.0


def test_a_dead_group_in_the_batch_dilutes_the_token_mean():
    # What keeping dead groups changes (METHOD.md §3.5): their zero-advantage tokens join the denominator, so the
    # policy term of the live groups shrinks by live / all tokens, and the KL term covers their tokens too.
    live = torch.tensor([[1.0, -1.0, 0.5]])  # [1, 3] advantages of a live row
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.ones(1, 3)

    def loss(advantages, logps, masks):
        value, _ = vspo.policy_loss(logps, logps.detach(), advantages, masks, kind="ppo")
        return value

    alone = loss(live, logprobs, mask)
    with_dead = loss(torch.cat([live, torch.zeros(1, 3)]), torch.cat([logprobs, logprobs.detach()]),
                     torch.ones(2, 3))
    assert torch.allclose(with_dead, alone * 3 / 6)
    (grad_alone,) = torch.autograd.grad(alone, logprobs)
    (grad_with_dead,) = torch.autograd.grad(with_dead, logprobs)
    assert torch.allclose(grad_with_dead, grad_alone / 2)


def assert_same_steps(a_rows, b_rows, steps, ignore=()):
    def kept(row):
        return {k: v for k, v in row.items() if k not in TIMING and not k.startswith("time_") and k not in ignore}

    a, b = {row["step"]: kept(row) for row in a_rows}, {row["step"]: kept(row) for row in b_rows}
    for step in steps:
        assert a[step] == b[step], step


def test_resume_continues_exactly(tiny_agent, tmp_path):
    whole, split, extended = tmp_path / "whole", tmp_path / "split", tmp_path / "extended"
    train.main(small(tiny_agent, whole, "--steps", "3", "--save-every", "1", "--keep-checkpoints", "3"))
    # an interrupted run: resume from its step-1 checkpoint (into another folder, to compare)
    train.main(["--resume", str(whole / "checkpoints" / "step-000001"), "--output-dir", str(split)])
    assert [row["step"] for row in rows(split)] == [2, 3]
    assert_same_steps(rows(whole), rows(split), [2, 3])
    # N steps, then M more: the same as N + M uninterrupted when the PRS schedule was planned for N + M
    train.main(small(tiny_agent, extended, "--steps", "1", "--schedule-steps", "3"))
    train.main(["--resume", str(extended), "--steps", "3"])
    assert [row["step"] for row in rows(extended)] == [0, 1, 2, 3]
    assert_same_steps(rows(whole), rows(extended), [2, 3])
    evaluation_at_the_first_end = {k for k in rows(extended)[1] if k.startswith("eval_")}
    assert_same_steps(rows(whole), rows(extended), [1], ignore=evaluation_at_the_first_end)
    weights = [(folder / "checkpoints" / "step-000003" / "model.safetensors").read_bytes()
               for folder in (whole, split, extended)]
    assert weights[0] == weights[1] == weights[2]
    # every step really updated (so the AdamW moments restored on resume were used), and they match too
    assert all(row["trained_on"] > 0 and row["skipped_updates"] == 0.0 for row in rows(whole)[1:])
    assert weights[0] != (whole / "checkpoints" / "step-000002" / "model.safetensors").read_bytes()
    states = [torch.load(folder / "checkpoints" / "step-000003" / "optimizer.pt")["optimizer"]["state"]
              for folder in (whole, split, extended)]
    assert states[0] and all(state[0]["step"] == 3 * 2 for state in states)  # 2 mini-batches a step
    for other in states[1:]:
        assert all(torch.equal(states[0][key][name], other[key][name]) for key in states[0] for name in states[0][key])
    assert sorted(p.name for p in (whole / "checkpoints").glob("step-*")) == [f"step-00000{i}" for i in (1, 2, 3)]
    assert sorted(p.name for p in (split / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]


def test_a_resumed_run_keeps_every_sample_row_whatever_text_it_holds(tmp_path):
    # JSON leaves U+2028, U+2029 and U+0085 unescaped; a reader splitting lines at them drops the row (a retrieved
    # passage or a model's response can hold any of them).
    texts = ["line\u2028separator", "paragraph\u2029separator", "next\x85line", "form\x0cfeed", "plain"]
    rows = [{"step": 1 + i % 2, "response": text} for i, text in enumerate(texts)]
    (tmp_path / "samples.jsonl").write_text("".join(evaluation.jsonl_line(row) for row in rows), encoding="utf-8")
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{}")  # resumed from its step 2
    run_folder.Logger(tmp_path, types.SimpleNamespace(wandb=False), start_step=2).close()
    assert run_folder.read_jsonl(tmp_path / "samples.jsonl") == rows


def test_resume_from_an_output_folder_trains_further(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    train.main(["--resume", str(run), "--steps", "3"])
    assert [row["step"] for row in rows(run)] == [0, 1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text() == "step-000003"
    assert json.loads((run / "args.json").read_text())["steps"] == 3


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_whole(vspo_run, tiny_agent, tmp_path,
                                                                       monkeypatch):
    run = copy_run(vspo_run, tmp_path / "run")
    before = (run / "checkpoints" / "step-000002" / "model.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died after the weights, before the rest

    monkeypatch.setattr(type(models.load_tokenizer(str(tiny_agent))), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--resume", str(run), "--steps", "3"])
    monkeypatch.undo()
    latest = run_folder.find_checkpoint(str(run))
    assert latest.name == "step-000002" and (latest / "model.safetensors").read_bytes() == before
    assert not (run / "checkpoints" / "step-000003").exists()
    models.load_model(str(latest))
    train.main(["--resume", str(run), "--steps", "3"])  # and the run goes on from there
    assert run_folder.find_checkpoint(str(run)).name == "step-000003"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_a_checkpoint_is_on_disk_before_its_name_is(vspo_run, tmp_path, monkeypatch):
    # A rename is atomic against a kill, not against a power cut: each file's data, then the folder, must be flushed
    # before the name that promises them (the checkpoint's folder, then `latest`) is switched.
    run = copy_run(vspo_run, tmp_path / "run")
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b))[1])
    train.main(["--resume", str(run), "--steps", "3"])
    monkeypatch.undo()
    root = run / "checkpoints"
    renamed = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(root / "step-000003"))
    tmp = Path(events[renamed][1])
    synced = {e[1] for e in events[:renamed] if e[0] == "fsync"}
    written = {str(tmp / p.relative_to(root / "step-000003")) for p in (root / "step-000003").rglob("*")}
    assert written and written | {str(tmp)} <= synced, sorted(written - synced)
    switched = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(root / "latest"))
    assert ("fsync", str(root)) in events[renamed:switched]  # the new name itself, before `latest` names it
    assert ("fsync", str(root / ".latest.tmp")) in events[renamed:switched]
    assert ("fsync", str(root)) in events[switched:]


def test_sigkill_at_any_moment_leaves_a_loadable_latest_checkpoint(tiny_agent, tmp_path):
    command = [sys.executable, "train.py", *small(tiny_agent, tmp_path, "--steps", "50", "--save-every", "1",
                                                  "--eval-size", "0")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "checkpoints" / "step-000002").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    latest = run_folder.find_checkpoint(str(tmp_path))
    models.load_model(str(latest))
    json.loads((latest / "trainer_state.json").read_text())
    torch.load(latest / "optimizer.pt", weights_only=False)


def test_istar_credit_trains_a_prm_and_saves_it(tiny_agent, tmp_path):
    train.main(small(tiny_agent, tmp_path, "--steps", "2", "--credit", "istar", "--istar-lr", "1e-3"))
    metrics = assert_wrote_a_run(tmp_path, steps=2)
    trained = [row for row in metrics[1:] if "istar_dpo_loss" in row]
    assert trained and all("kl_ref" not in row for row in trained)  # iStar runs without a reference model
    for row in metrics[1:]:  # dead groups stay in the batch: their steps still get step advantages
        # 2 prompts x G = 4, plus the replacement rollouts (extra_rollouts_per_prompt counts trajectories per prompt)
        assert row["trained_on"] == 2 * 4 + row["extra_rollouts_per_prompt"] * 2 - row["unscored"]
    prm = tmp_path / "checkpoints" / "step-000002" / "prm"
    assert (prm / "model.safetensors").exists()
    train.main(["--resume", str(tmp_path), "--steps", "3"])  # the PRM and its optimizer come back
    assert rows(tmp_path)[-1]["step"] == 3


def test_checkpointing_reaches_the_policy_and_the_prm_it_trains(tiny_agent, tmp_path):
    # transformers checkpoints a layer only in training mode: the PRM, trained every step, must be in it.
    args = parse(settings.TrainArgs, small(tiny_agent, tmp_path, "--credit", "istar", "--gradient-checkpointing", "on"))
    run, _ = train.setup(args)
    assert rollout._checkpointing(run.policy) and rollout._checkpointing(run.prm.model) and run.prm.model.training


def test_plot_only_redraws_the_curves(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    (run / "training_curves.png").unlink()
    train.main(["--plot-only", str(run)])
    assert (run / "training_curves.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------------------------------
# Long-form: the judge behind a loopback chat-completions server (the one network boundary)
# ----------------------------------------------------------------------------------------------------------------------
class JudgeHandler(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):
        JudgeHandler.calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        verdict = "no verdict here" if JudgeHandler.calls % 2 == 0 else json.dumps({"score": JudgeHandler.calls % 11})
        body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "judge", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_long_form_training_with_a_judge_counts_unscored_samples(tiny_agent, tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    JudgeHandler.calls = 0
    try:  # the tiny agent answers about one long-form question in ten: 60 tokens give the judge a few to score
        train.main(small(tiny_agent, tmp_path, "--steps", "2", "--max-new-tokens", "60", "--task", "wiki-long",
                         "--reward", "binary", "--judge-model", "judge",
                         "--judge-base-url", f"http://127.0.0.1:{server.server_address[1]}/v1",
                         "--judge-api-key", "sk-secret-key"))
    finally:
        server.shutdown()
        server.server_close()
    metrics = rows(tmp_path)
    assert JudgeHandler.calls >= 2 and "eval_judge_accuracy" in metrics[0]  # a verdict and a garbage one at least
    assert all("unscored" in row for row in metrics[1:])
    assert sum(row["unscored"] for row in metrics[1:]) > 0  # every 2nd verdict is garbage: counted, not scored 0
    for written in [tmp_path / "args.json", *tmp_path.rglob("trainer_state.json"), *tmp_path.rglob("*.jsonl")]:
        assert "sk-secret-key" not in written.read_text(), written


def test_a_judge_that_cannot_be_reached_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.server_close()  # nobody listens there now
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with pytest.raises(SystemExit, match=f"the judge 'judge' at {re.escape(url)}.*check --judge-base-url"):
        train.main(["--model", models.TINY, "--task", "wiki-long", "--judge-model", "judge", "--judge-base-url", url,
                    "--output-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # stopped in setup: no log, no rollout


def test_long_form_without_a_judge_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("JUDGE_MODEL", raising=False)
    with pytest.raises(SystemExit, match="--task wiki-long: long-form, its rewards need a judge"):
        train.main(["--model", models.TINY, "--task", "wiki-long", "--output-dir", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------------------------
# eval.py
# ----------------------------------------------------------------------------------------------------------------------
def test_eval_prints_and_writes_its_table(tiny_agent, tmp_path, capsys):
    evaluation.main(["--model", str(tiny_agent), "--task", "wiki", "fanoutqa", "--limit", "3", "--output",
                     str(tmp_path), "--max-new-tokens", "40", "--no-few-shot", "--passage-chars", "60"])
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("task"))
    assert "EM" in header and "F1" in header and "LA-BLEU" in header and "calls/q" in header
    assert any(line.startswith("wiki ") for line in table.splitlines())
    assert any(line.startswith("fanoutqa") for line in table.splitlines())
    assert any(line.startswith("average") for line in table.splitlines())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["wiki"]["questions"] == 3 and set(metrics) == {"wiki", "fanoutqa"}
    records = [json.loads(line) for line in (tmp_path / "wiki.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert {"question", "gold", "answer", "em", "f1", "stop_reason", "response"} <= set(records[0])


def test_eval_on_search_r1_files_reports_each_dataset_and_the_average(tiny_agent, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"Doc {i}"\nText about topic {i}.'}) + "\n"
                              for i in range(20)))
    for name in ("nq", "hotpotqa"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": f"What is topic {i}?", "golden_answers": [f"Doc {i}"]}) + "\n" for i in range(3)))
    evaluation.main(["--model", str(tiny_agent), "--task", str(tmp_path / "nq.jsonl"), str(tmp_path / "hotpotqa.jsonl"),
                     "--corpus", str(corpus), "--output", str(tmp_path / "out"), "--max-new-tokens", "24",
                     "--no-few-shot"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if line.split() and line.split()[0] in ("nq", "hotpotqa", "average")] \
        == ["nq", "hotpotqa", "average"]


# ----------------------------------------------------------------------------------------------------------------------
# The command line: --help, bad flags, missing files
# ----------------------------------------------------------------------------------------------------------------------
def run_cli(*arguments):
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=300)


FAULTS_OF_TEN_TENSORS = """
import resource, sys, torch
import eval
if sys.argv[1] == "kept":
    eval.keep_freed_memory(torch.device("cpu"))
torch.ones(16 * 2**20)  # 64 MB, allocated, written and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20)  # the same size again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's allocator")
def test_a_cpu_run_keeps_freed_memory_for_the_next_tensors():
    # By default glibc hands a freed 64 MB tensor back to the system, and the next one faults its 16,384 pages in
    # again (the kernel zeroes each); a CPU run has glibc keep them (eval.keep_freed_memory). Now and then one of the
    # ten still comes from fresh memory, never most of them.
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_OF_TEN_TENSORS, mode], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
              for mode in ("default", "kept")}
    assert faults["default"] > 9 * 16_384 and faults["kept"] < 3 * 16_384, faults


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


def test_an_earlier_run_is_never_overwritten_and_a_finished_one_says_so(vspo_run, tiny_agent):
    before = (vspo_run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=f"--output-dir {vspo_run} holds an earlier run: continue it with --resume"):
        train.main(small(tiny_agent, vspo_run, "--steps", "2"))
    with pytest.raises(SystemExit, match="the checkpoint is already at step 2: pass --steps above it"):
        train.main(["--resume", str(vspo_run)])
    assert (vspo_run / "metrics.jsonl").read_text() == before


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


# ----------------------------------------------------------------------------------------------------------------------
# Nothing crashes, nothing is lost
# ----------------------------------------------------------------------------------------------------------------------
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


class RetrievalHandler(BaseHTTPRequestHandler):
    """A Search-R1 retrieval server that answers its first request (the check at start) and fails every later one."""

    requests = 0

    def do_POST(self):
        RetrievalHandler.requests += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if RetrievalHandler.requests > 1:
            self.send_error(503)
            return
        body = json.dumps({"result": [[{"document": {"contents": '"Nile"\nA river.'}, "score": 1.0}]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_failed_searches_are_counted_per_step_and_said(tiny_agent, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), RetrievalHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    RetrievalHandler.requests = 0
    try:
        train.main(small(tiny_agent, tmp_path, "--steps", "1", "--retriever",
                         f"http://127.0.0.1:{server.server_address[1]}"))
    finally:
        server.shutdown()
        server.server_close()
    metrics = rows(tmp_path)
    assert RetrievalHandler.requests > 1 and metrics[1]["tool_failures"] > 0
    failed = metrics[0]["eval_tool_failures"] + metrics[1]["tool_failures"] + metrics[1]["eval_tool_failures"]
    assert failed == RetrievalHandler.requests - 1  # every search after the check at start, none unsaid
    assert "valid tool calls failed in the tool itself" in capsys.readouterr().out


def test_a_run_killed_before_its_first_checkpoint_is_started_again_in_its_folder(vspo_run, tiny_agent, tmp_path,
                                                                                 capsys):
    run = copy_run(vspo_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")  # what a kill after the first evaluation, before the first save, leaves
    with pytest.raises(SystemExit, match="stopped before its first checkpoint, so there is nothing to resume"):
        train.main(["--resume", str(run)])
    train.main(small(tiny_agent, run, "--steps", "2"))
    assert "holds a run that stopped before its first checkpoint; this run starts again" in capsys.readouterr().out
    assert [row["step"] for row in rows(run)] == [0, 1, 2]
    assert_same_steps(rows(vspo_run), rows(run), [0, 1, 2])  # the same run again, its logs not doubled
    assert (run / "samples.jsonl").read_text() == (vspo_run / "samples.jsonl").read_text()


def test_a_branch_killed_before_its_first_checkpoint_can_be_started_again(vspo_run, tmp_path, monkeypatch, capsys):
    source, branch = copy_run(vspo_run, tmp_path / "source"), tmp_path / "branch"
    command = ["--resume", str(source), "--output-dir", str(branch), "--steps", "3"]
    monkeypatch.setattr(run_folder, "save", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # step 3 of the branch is logged, then the process dies before its save
        train.main(command)
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=f"run the command that started it again \\(--resume {re.escape(str(source))} "
                                         f"--output-dir {re.escape(str(branch))}"):
        train.main(["--resume", str(branch)])  # not "run it again without --resume": that would start from step 0
    train.main(command)  # the same command: the branch starts again, in place of its cut-short logs
    assert "stopped before its first checkpoint; this run (from" in capsys.readouterr().out
    assert [row["step"] for row in rows(branch)] == [3]
    assert run_folder.find_checkpoint(str(branch)).name == "step-000003"


def test_a_run_from_elsewhere_keeps_no_row_of_a_run_cut_short_in_its_folder(vspo_run, tiny_agent, tmp_path):
    source, other = copy_run(vspo_run, tmp_path / "source"), copy_run(vspo_run, tmp_path / "other")
    shutil.rmtree(other / "checkpoints")  # another run, steps 0 to 2 logged, killed before its first checkpoint
    train.main(["--resume", str(source), "--output-dir", str(other), "--steps", "3"])
    assert [row["step"] for row in rows(other)] == [3]  # not that run's 0, 1, 2 under this one's 3
    assert {row["step"] for row in run_folder.read_jsonl(other / "samples.jsonl")} == {3}


def test_a_second_run_in_a_folder_a_run_is_training_in_stops_at_once_and_a_killed_run_leaves_no_lock(tiny_agent,
                                                                                                      tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(  # another process holding the folder as a training run does, until it is killed
        [sys.executable, "-c", "import pathlib, sys, time, run_folder\n"
         "with run_folder.exclusive(pathlib.Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)",
         str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=f"--output-dir {re.escape(str(run))}: in use by another run "
                                             f"\\(pid {holder.pid} on "):
            train.main(small(tiny_agent, run, "--steps", "1"))
        assert sorted(p.name for p in run.iterdir()) == ["run.pid"]  # nothing of the second run written
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    with run_folder.exclusive(run):  # the OS let the lock go with the process: nothing stale to clear
        assert f"pid {os.getpid()} " in (run / "run.pid").read_text()
    assert not (run / "run.pid").exists()


@pytest.mark.parametrize("flag", ["--output-dir", "--cache-dir"])
def test_a_folder_flag_that_names_a_file_is_a_clear_error(tmp_path, flag):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    flags = {"--output-dir": str(tmp_path / "run"), flag: str(file)}
    with pytest.raises(SystemExit, match=f"{flag} {re.escape(str(file))}"):
        train.main(["--model", models.TINY, *[x for pair in flags.items() for x in pair]])
    assert file.read_text() == "mine"


def test_an_evaluation_into_a_folder_another_is_writing_stops_before_writing(tmp_path):
    out = tmp_path / "out"
    with run_folder.exclusive(out, "--output"):  # what an evaluation (or a training run) writing there holds
        with pytest.raises(SystemExit, match=f"--output {re.escape(str(out))}: in use by another run \\(pid "):
            evaluation.main(["--model", models.TINY, "--output", str(out), "--limit", "2"])
        assert sorted(p.name for p in out.iterdir()) == ["run.pid"]  # no result of the second written


def test_eval_output_that_names_a_file_is_a_clear_error(tmp_path):
    file = tmp_path / "results.txt"
    file.write_text("mine")
    with pytest.raises(SystemExit, match=f"--output '{re.escape(str(file))}': a file, not a folder"):
        evaluation.main(["--model", models.TINY, "--output", str(file)])
    assert file.read_text() == "mine"


def test_going_back_to_an_earlier_checkpoint_moves_latest_there_at_once(tiny_agent, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train.main(small(tiny_agent, run, "--steps", "2", "--save-every", "1", "--keep-checkpoints", "2"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the new branch's step 2 is logged, then the process dies before its save

    monkeypatch.setattr(run_folder, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--resume", str(run / "checkpoints" / "step-000001"), "--lr", "5e-4", "--steps", "3"])
    monkeypatch.undo()
    # `latest` names the checkpoint the branch started from, not the old step 2 whose log row was dropped
    assert run_folder.find_checkpoint(str(run)).name == "step-000001"
    assert [row["step"] for row in rows(run)] == [0, 1, 2]
    train.main(["--resume", str(run), "--steps", "3"])
    assert [row["step"] for row in rows(run)] == [0, 1, 2, 3]
    assert run_folder.find_checkpoint(str(run)).name == "step-000003"


def test_resuming_into_a_folder_that_holds_another_run_is_refused(vspo_run, tmp_path):
    other, source = copy_run(vspo_run, tmp_path / "other"), copy_run(vspo_run, tmp_path / "source")
    before = (other / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=f"--output-dir {other} holds another run"):
        train.main(["--resume", str(source), "--output-dir", str(other), "--steps", "3"])
    assert (other / "metrics.jsonl").read_text() == before
    assert (other / "checkpoints" / "latest").read_text() == "step-000002"


def test_resuming_with_other_training_data_is_refused_naming_the_task(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "Who wrote Hamlet?", "golden_answers": ["Shakespeare"]}\n')
    with pytest.raises(SystemExit, match=f"--task {questions}: not the training data"):
        train.main(["--resume", str(run), "--task", str(questions), "--steps", "3"])
    assert [row["step"] for row in rows(run)] == [0, 1, 2]


class FakeWandb(types.ModuleType):
    """The wandb package at its network boundary: records what a run asks of it."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []

    def init(self, **options):
        self.inits.append(options)
        return types.SimpleNamespace(log=lambda metrics, step: self.logged.append(step), finish=lambda: None)


class FakeSummaryWriter:
    made = []

    def __init__(self, log_dir, purge_step=None):
        FakeSummaryWriter.made.append(purge_step)

    def add_scalar(self, name, value, step):
        pass

    def close(self):
        pass


def test_a_resumed_run_goes_on_in_its_wandb_run_and_tensorboard_drops_the_steps_it_redoes(vspo_run, tiny_agent,
                                                                                          tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    FakeSummaryWriter.made.clear()
    run = copy_run(vspo_run, tmp_path / "run")
    train.main(["--resume", str(run), "--steps", "3", "--wandb"])
    train.main(["--resume", str(run / "checkpoints" / "step-000002"), "--steps", "3", "--wandb"])  # step 3 again
    assert [options["id"] for options in fake.inits] == [(run / "wandb_id").read_text()] * 2
    assert all(options["resume"] == "allow" for options in fake.inits) and set(fake.logged) == {3}
    assert FakeSummaryWriter.made == [3, 3]  # events from step 3 on are dropped: no step drawn twice
    train.main(small(tiny_agent, tmp_path / "new", "--steps", "1", "--wandb", "--eval-size", "0"))
    assert fake.inits[-1]["id"] != fake.inits[0]["id"] and FakeSummaryWriter.made[-1] == 0


def test_a_checkpoint_renamed_into_place_is_found_without_latest(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    (run / "checkpoints" / "latest").unlink()  # a kill between the rename and the switch of `latest`
    assert run_folder.find_checkpoint(str(run)).name == "step-000002"
    with pytest.raises(SystemExit, match="holds an earlier run"):
        train.main(["--output-dir", str(run)])


def test_checkpoints_are_readable_as_the_umask_says(vspo_run):
    umask = os.umask(0)
    os.umask(umask)
    checkpoint = vspo_run / "checkpoints" / "step-000002"
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o777 & ~umask
    for path in checkpoint.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_a_non_finite_reward_is_unscored_and_counted(tiny_agent, tmp_path, monkeypatch):
    # A custom reward (or judge) that returns nan: its group must not turn into nan advantages.
    run, state = train.setup(parse(settings.TrainArgs, small(tiny_agent, tmp_path)))
    groups = train.roll_out(run, state.stream.take(2), replays=[0, 0])
    real = prs.prs_reward
    verdicts = iter([float("nan"), float("inf")] + [None] * 100)

    def odd_reward(*args, **kwargs):
        result = real(*args, **kwargs)
        odd = next(verdicts)
        return result if odd is None else dataclasses.replace(result, total=odd)

    monkeypatch.setattr(prs, "prs_reward", odd_reward)
    groups = train.score(run, groups, step=0)
    assert [r.total is None for r in groups[0].results][:2] == [True, True]
    assert len(groups[0].scored()) == len(groups[0].trajectories) - 2
    _, _, stats = train.replace_dead_groups(run, state, groups)
    assert stats["unscored"] >= 2
    batch = train.make_batch(run, groups)
    assert torch.isfinite(train.advantages(run, batch, None)).all()


def test_eval_never_writes_over_an_earlier_evaluation_and_shows_progress(tiny_agent, tmp_path, capsys):
    arguments = ["--model", str(tiny_agent), "--limit", "2", "--output", str(tmp_path), "--max-new-tokens", "24",
                 "--no-few-shot", "--passage-chars", "60"]
    evaluation.main(arguments)
    assert "question" in capsys.readouterr().err  # the progress bar
    before = {path.name: path.read_text() for path in tmp_path.iterdir()}
    with pytest.raises(SystemExit, match=r"--output .* would replace files already there \(wiki.jsonl, metrics.json"):
        evaluation.main(arguments)
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == before


def test_the_batch_is_shortest_first_and_each_row_keeps_its_own_reward_group_and_replays(tiny_agent, tmp_path):
    # Micro-batches are padded to their longest row, so make_batch orders rows by length; every per-row field must
    # follow its trajectory there.
    run, state = train.setup(parse(settings.TrainArgs, small(tiny_agent, tmp_path)))
    groups = train.score(run, train.roll_out(run, state.stream.take(2), replays=[0, 3]), step=0)
    batch = train.make_batch(run, groups)
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in batch.trajectories]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1
    owner = {id(t): (reward, g.trajectories[0].group_id, g.replays) for g in groups for t, reward in g.scored()}
    assert len(batch.trajectories) == len(owner)
    for i, t in enumerate(batch.trajectories):
        reward, group_id, replays = owner[id(t)]
        assert (batch.rewards[i].item(), batch.group_ids[i].item(), batch.replays[i].item()) == (
            pytest.approx(reward), group_id, replays)
        n = len(t.response_ids)
        assert batch.tokens.response_ids[i, :n].tolist() == t.response_ids
        assert batch.tokens.loss_mask[i, :n].tolist() == t.loss_mask
