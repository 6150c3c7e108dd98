"""examples/trl_grpo.py against the real TRL: the prompt TRL renders, TRL's parser on the worked example, PRS as the
reward TRL calls, and one round of training on the tiny model. Skipped when TRL is not installed (CI installs the
pinned release: .ci/run)."""

import json
import sys
from pathlib import Path

import pytest

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install trl==1.16.0 (.ci/run installs it)")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import trl_grpo  # noqa: E402
from trl.chat_template_utils import add_response_schema, parse_response, qwen2_5_chat_template  # noqa: E402
from trl.chat_template_utils import supports_tool_calling  # noqa: E402

import models  # noqa: E402
import prs_adapters  # noqa: E402


@pytest.fixture()
def tokenizer():
    tok = models.load_tokenizer(models.TINY)
    tok.chat_template = qwen2_5_chat_template
    return tok


def test_trl_refuses_smollm2s_own_template_and_takes_the_qwen_one(tokenizer):
    assert not supports_tool_calling(models.load_tokenizer(models.TINY))  # why the example swaps the template
    assert supports_tool_calling(tokenizer)


def test_the_prompt_describes_the_tool_once_and_teaches_real_turns(tokenizer):
    row = trl_grpo.dataset(1, 2, seed=0, max_calls=2, loop="trl")[0]
    text = tokenizer.apply_chat_template(row["prompt"], tools=[trl_grpo.make_search()], tokenize=False,
                                         add_generation_prompt=True)
    # TRL's template lists the tool, from the function's signature and docstring; the system message does not
    assert text.count("<tools>\n") == 1 and text.count("Search Wikipedia; returns the top 3 passages.") == 1
    assert "Qwen" not in text and "You can call these tools" not in text
    # the worked example: the call ends the assistant's turn, the tool answers in its own turn, then the answer
    call_end = text.rindex("</tool_call>")  # the worked example's (the first is in the template's instructions)
    assert text[call_end:].startswith("</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>")
    assert text.index("<answer>Titan</answer>") > text.index("</tool_response>")
    assert row["golden_answers"] and row["prompt"][-1]["role"] == "user"


def test_trl_parses_the_worked_example_call_and_prs_scores_the_sampled_ids(tokenizer):
    add_response_schema(tokenizer)
    example = trl_grpo.worked_example()
    prompt = tokenizer.apply_chat_template(example[:1], tokenize=False, add_generation_prompt=True)
    conversation = tokenizer.apply_chat_template(example[:2], tokenize=False)
    turn = conversation[len(prompt):].removesuffix("\n")
    ids = tokenizer(turn, add_special_tokens=False).input_ids
    prefix = tokenizer(prompt, add_special_tokens=False).input_ids  # TRL passes the prompt's ids the same way
    message = parse_response(tokenizer, ids, prefix=prefix, tools=[trl_grpo.make_search()])
    assert message["tool_calls"][0]["function"] == {"name": "search", "arguments": {"query": "largest moon of Saturn"}}
    # the rest of the trajectory as TRL appends it, and PRS on the decoded ids: a well-formed, grounded answer
    full = tokenizer.apply_chat_template(example, tokenize=False)[len(prompt):]
    completion_ids = [tokenizer(full, add_special_tokens=False).input_ids]
    reward = prs_adapters.trl_reward_for(tokenizer)
    assert reward(["Q"], [[message]], completion_ids=completion_ids, golden_answers=[["Titan"]]) == [1.0]


def test_the_search_tool_answers_as_the_projects_does():
    search = trl_grpo.make_search()
    assert "Title: Titan (moon)" in search("largest moon of Saturn")
    assert search("") == "Error: the search query is empty"


@pytest.mark.parametrize("loop", ["project", "trl"])
def test_one_round_of_trl_training_with_prs_then_eval(loop, tmp_path, capsys):
    trl_grpo.main(["--loop", loop, "--model", models.TINY, "--rounds", "1", "--eval-size", "2",
                   "--max-completion-length", "32", "--output-dir", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["reward"] <= 1 and rows[0]["peak_rss_gb"] > 0
    assert (tmp_path / "final" / "model.safetensors").exists()
    models.load_model(str(tmp_path / "final"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["wiki"]["questions"] == 2
    assert "1 rounds; median" in capsys.readouterr().out


def test_the_projects_loop_hands_trl_every_group_in_order_with_tool_tokens_masked(tiny):
    # rollout.py as TRL's rollout_func: TRL passes each prompt G times in a row and reads ids, log-probs and the mask
    model, tokenizer = tiny
    trainer = type("Trainer", (), {"num_generations": 3, "model": model, "processing_class": tokenizer})()
    config = trl_grpo.rollout.RolloutConfig(max_new_tokens=16, max_total_tokens=900, few_shot=False)
    rollout_func = trl_grpo.project_loop(trl_grpo.make_search(), config)
    prompts = [[{"role": "user", "content": q}] for q in ("Q one?", "Q two?") for _ in range(3)]
    out = rollout_func(prompts, trainer)
    assert len(out["completion_ids"]) == len(out["env_mask"]) == len(out["logprobs"]) == 6
    assert all(len(ids) == len(mask) == len(lp) for ids, mask, lp in
               zip(out["completion_ids"], out["env_mask"], out["logprobs"]))
    assert "Q one?" in tokenizer.decode(out["prompt_ids"][2]) and "Q two?" in tokenizer.decode(out["prompt_ids"][3])
    with pytest.raises(ValueError, match="3 times in a row"):
        rollout_func(prompts[:4], trainer)


def test_an_earlier_run_is_refused_before_training_starts(tmp_path, capsys):
    (tmp_path / "final").mkdir()
    with pytest.raises(SystemExit) as stop:
        trl_grpo.main(["--model", models.TINY, "--output-dir", str(tmp_path)])
    assert f"--output-dir {tmp_path} holds an earlier run (final/)" in str(stop.value.code)
    assert not (tmp_path / "rounds.jsonl").exists()  # nothing was trained


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "--lr nan: must be a positive number"), ("--lr", "-0.5", "--lr -0.5: must be"),
    ("--temperature", "inf", "--temperature inf: must be"), ("--prompts-per-round", "3", "an even number"),
    ("--group-size", "1", "--group-size 1: must be at least 2"), ("--rounds", "0", "--rounds 0"),
    ("--max-tool-calls", "0", "--max-tool-calls 0"), ("--eval-size", "0", "--eval-size 0")])
def test_a_bad_flag_is_named_before_anything_runs(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        trl_grpo.main([flag, value, "--output-dir", str(tmp_path / "run")])
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()
