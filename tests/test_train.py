"""train.py and eval.py end to end on the tiny agent: what they write, exact resume, atomic checkpoints, clear
errors. Runs go through `main(argv)` in-process (the same code path as the command line, without re-importing torch
each time); the command-line tests run real subprocesses."""

import dataclasses
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import eval as evaluation
import models
import prs
import rollout
import settings
import train
import vspo
from cli import parse
from conftest import copy_run, rows, small

ROOT = Path(__file__).resolve().parent.parent


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


# ---- Long-form: the judge behind a loopback chat-completions server (the one network boundary) ----
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
    with pytest.raises(SystemExit, match="--task 'wiki-long': long-form: its rewards need a judge"):
        train.main(["--model", models.TINY, "--task", "wiki-long", "--output-dir", str(tmp_path)])


# ---- eval.py ----
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


def test_two_tasks_that_would_write_one_file_are_refused_before_anything_is_written(tmp_path):
    for folder in ("d1", "x", "y/d1"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    row = '{"question": "Which river?", "golden_answers": ["Nile"]}\n'
    tasks = [tmp_path / "d1" / "test.jsonl", tmp_path / "x" / "d1_test.jsonl", tmp_path / "y" / "test.jsonl"]
    for task in tasks:
        task.write_text(row)
    with pytest.raises(SystemExit, match="would both be written to d1_test.jsonl"):
        evaluation.main(["--model", models.TINY, "--task", *map(str, tasks), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
