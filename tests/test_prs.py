"""prs.py: answer metrics and extraction, LA-BLEU against sacrebleu, the staged and gated PRS reward and its
schedule, the reward hacks peers shipped, and the TRL and verl adapters called the way those libraries call them.
The judge and the long-form rewards on it are in test_judge.py."""

import doctest
import json
import string

import numpy as np
import pytest
import sacrebleu
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

import prs
import prs_adapters
import tools
from prs import (binary_reward, evidence_score, exact_match, format_score, la_bleu, prs_reward, stage_weights,
                 token_f1, tool_call_score)
from prs_adapters import compute_score, trl_reward
from tools import extract_answer, normalize_answer

TOOLS = {"search": tools.search_tool(lambda query, k: []), "calculator": tools.calculator_tool()}
STAGES = ("format", "tool_call", "evidence", "answer")


def call(query: str = "longest river") -> str:
    body = json.dumps({"name": "search", "arguments": {"query": query}})
    return f"{tools.TOOL_CALL_OPEN}{body}{tools.TOOL_CALL_CLOSE}"


def env(observation: str) -> str:
    """What the environment appends after a tool call."""
    return tools.format_tool_response(observation)


def respond(answer: str, gold: str = "Nile", *, think: str = "I should search.", found: bool = True) -> str:
    """A well-formed response: think, one search call, the environment's response, the answer."""
    passage = f"Doc 1 (Title: {gold}) {gold} is the answer you seek." if found else "Doc 1 (Title: Moon) Grey rock."
    return f"<think>{think}</think>{call()}{env(passage)}<answer>{answer}</answer>"


def final(response: str, gold="Nile", **options):
    """The reward at the last step of a 100-step run (answer-heavy weights)."""
    return prs_reward(response, gold, TOOLS, step=99, total_steps=100, **options)


# ---- Exact match, token F1, answer extraction ----
@pytest.mark.parametrize("prediction, answers, expected", [
    ("The Eiffel Tower!", ["eiffel tower"], 1.0),
    ("  eiffel   TOWER ", "The Eiffel Tower", 1.0),
    ("Eiffel", ["Eiffel Tower"], 0.0),
    ("Amazon", ["Nile", "Amazon River", "amazon"], 1.0),
    ("an Apple", ["apple"], 1.0),
    ("", [""], 0.0),
    (None, ["Nile"], 0.0),
    ("the", ["the"], 0.0),  # normalizes to nothing: an empty prediction never matches
    ("Nile", [], 0.0),
])
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


@pytest.mark.parametrize("prediction, answers, expected", [
    ("Eiffel", ["Eiffel Tower"], 2 * 1.0 * 0.5 / 1.5),
    ("the Eiffel Tower", ["eiffel tower"], 1.0),
    ("paris paris", ["Paris"], 2 * 0.5 * 1.0 / 1.5),  # repeated words are clipped
    ("London", ["Paris"], 0.0),
    ("", ["Paris"], 0.0),
    (None, ["Paris"], 0.0),
    ("Eiffel", ["Paris", "Eiffel"], 1.0),
])
def test_token_f1(prediction, answers, expected):
    assert token_f1(prediction, answers) == pytest.approx(expected)


def test_extract_answer_takes_the_final_block_of_the_response():
    assert extract_answer("<answer>Rome</answer> no, <answer> Paris \n</answer>\n") == "Paris"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("<answer>unfinished") is None
    assert extract_answer("Paris</answer>") is None
    assert extract_answer("<think>Paris?</think>") is None


def test_extract_answer_reads_the_response_alone_not_the_prompt():
    prompt = "Answer inside tags, for example <answer> Beijing </answer>. Question: capital of France?"
    response = "<think>It is Paris.</think><answer>Paris</answer>"
    # One tag in the response is enough (Search-R1's extractor needed two, because the prompt's example was one).
    assert extract_answer(response) == "Paris"
    assert extract_answer("<think>I do not know.</think>") is None  # the prompt's example is never the agent's
    assert binary_reward("<think>I do not know.</think>", ["Beijing"]).total == 0.0
    assert extract_answer(prompt + response) == "Paris"  # even if a caller glued them, the final block is taken


# ---- Length-aware BLEU: sacrebleu in its regime, 1 for any exact match, padding costs ----
WORDS = st.sampled_from(["nile", "river", "the", "longest", "in", "africa", "is", "a", "Paris,", "U.S.", "(1892)",
                         "ballet", "Nutcracker", "tower", "'s", "blue"])
PHRASES = st.lists(WORDS, min_size=1, max_size=30).map(" ".join)
_13A = Tokenizer13a()


def n_tokens(text: str) -> int:
    return len(_13A(text.rstrip()).split())


@given(st.lists(WORDS, min_size=4, max_size=14).map(" ".join), st.lists(WORDS, min_size=4, max_size=18).map(" ".join))
def test_la_bleu_equals_sacrebleu_sentence_bleu_at_order_4_when_not_longer(hypothesis, reference):
    assume(4 <= n_tokens(hypothesis) <= n_tokens(reference))
    expected = sacrebleu.sentence_bleu(hypothesis, [reference]).score / 100
    assert la_bleu(hypothesis, [reference]) == pytest.approx(min(1.0, expected), rel=1e-9, abs=1e-12)


@given(PHRASES)
def test_la_bleu_is_1_for_an_exact_match_of_any_length(text):
    assert la_bleu(text, [text]) == 1.0
    assert la_bleu(text, ["something else entirely", text]) == 1.0  # max over references


@given(st.lists(WORDS, min_size=1, max_size=10).map(" ".join), st.lists(WORDS, min_size=1, max_size=8))
def test_la_bleu_strictly_decreases_as_padding_is_appended(reference, padding):
    scores = [la_bleu(" ".join([reference, *padding[:k]]), [reference]) for k in range(len(padding) + 1)]
    assert scores[0] == 1.0
    assert all(later < earlier for earlier, later in zip(scores, scores[1:]))


def test_la_bleu_scores_short_answers_and_penalizes_both_lengths():
    assert la_bleu("", ["Nile"]) == 0.0 and la_bleu("   ", ["Nile"]) == 0.0 and la_bleu("Nile", [""]) == 0.0
    assert la_bleu("Nile", "Nile") == 1.0  # sentence BLEU-4 without an effective order gives this 0
    too_short, too_long = la_bleu("Nile", ["Nile river"]), la_bleu("Nile river", ["Nile"])
    assert 0 < too_short < 1 and 0 < too_long < 1
    assert too_short == pytest.approx(too_long * 2)  # BP = exp(1 - 2) with precision 1; LP = exp(1 - 2) with p = 1/2


# ---- The stages one by one ----
GOOD_CALL, SEARCHED = call(), env("Doc 1 (Title: Nile) The Nile is long.")


@pytest.mark.parametrize("response", [
    "<answer>Nile</answer>",
    f"<think>Search.</think>{GOOD_CALL}{SEARCHED}<answer>Nile</answer>",
    f"{GOOD_CALL}{SEARCHED}<think>Again.</think>{call('Nile')}{SEARCHED}<answer>Nile</answer>\n\n",
    f"Let me search. {GOOD_CALL}{SEARCHED}The Nile it is. <answer>Nile</answer>",
    f"{GOOD_CALL}\nuser\n<tool_response>\nDoc\n</tool_response>\nassistant\n<answer>Nile</answer>",  # chat template
])
def test_well_formed_responses(response):
    assert format_score(response) == 1.0


@pytest.mark.parametrize("response", [
    "The Nile.",  # no answer
    "<answer></answer>", "<answer>  \n</answer>",  # empty answer
    "<answer>Nile</answer><answer>Amazon</answer>",  # two answers
    "<answer>Nile</answer> or the Amazon",  # text after the answer
    f"<answer>Nile</answer>{GOOD_CALL}{SEARCHED}",  # the answer is not last
    "<think>Search.<answer>Nile</answer>",  # unclosed think
    "<think>a</think></think><answer>Nile</answer>",  # stray closing tag
    "<think>I will write <answer>Nile</answer></think><answer>Nile</answer>",  # nested tags
    f"<think>Search.</think>{SEARCHED}<answer>Nile</answer>",  # a tool response the model wrote itself
    f"{GOOD_CALL}<answer>Nile</answer>",  # a call nobody answered
    f"{GOOD_CALL} I bet it says {SEARCHED}<answer>Nile</answer>",  # model text between a call and its response
    f"<tool_call>{GOOD_CALL}</tool_call>{SEARCHED}<answer>Nile</answer>",  # nested call
])
def test_malformed_responses(response):
    assert format_score(response) == 0.0


def test_tool_call_stage_is_the_fraction_of_valid_calls():
    bad_json = "<tool_call>{'name': 'search'}</tool_call>"
    unknown = '<tool_call>{"name": "browse", "arguments": {"url": "x"}}</tool_call>'
    assert tool_call_score(GOOD_CALL + GOOD_CALL, TOOLS) == 1.0
    assert tool_call_score(GOOD_CALL + bad_json, TOOLS) == 0.5
    assert tool_call_score(GOOD_CALL + bad_json + unknown, TOOLS) == pytest.approx(1 / 3)
    assert tool_call_score("<answer>Nile</answer>", TOOLS) == 0.0
    assert tool_call_score("<answer>Nile</answer>", TOOLS, require_tool=False) == 1.0
    assert tool_call_score("<answer>Nile</answer>", TOOLS, require_tool=False, no_call_score=0.5) == 0.5


def test_evidence_counts_only_tool_responses_and_whole_words():
    assert evidence_score(respond("x", "Nile"), ["Amazon", "the Nile"]) == 1.0
    assert evidence_score(respond("x", found=False), ["Nile"]) == 0.0
    assert evidence_score("<think>Nile</think><answer>Nile</answer>", ["Nile"]) == 0.0  # the model's own text
    assert evidence_score(env("Nilehouse is a pub."), ["Nile"]) == 0.0
    assert evidence_score(env("The Nile."), ["the"]) == 0.0  # a gold that normalizes to nothing is never found


# ---- Schedule and the staged reward: properties ----
STEPS = st.integers(-5, 3000)
TOTALS = st.integers(0, 2000)
WEIGHT_VECTORS = st.fixed_dictionaries({stage: st.floats(0, 10) for stage in STAGES}).filter(
    lambda w: sum(w.values()) > 0.01)


@given(STEPS, TOTALS)
def test_schedule_sums_to_1_and_moves_weight_from_format_to_answer(step, total_steps):
    now, later = stage_weights(step, total_steps), stage_weights(step + 1, total_steps)
    assert sum(now.values()) == pytest.approx(1.0, abs=1e-12) and all(w >= 0 for w in now.values())
    assert later["format"] <= now["format"] + 1e-12 and later["answer"] >= now["answer"] - 1e-12


@given(STEPS, TOTALS, WEIGHT_VECTORS, WEIGHT_VECTORS)
def test_schedule_sums_to_1_for_any_start_and_end(step, total_steps, start, end):
    weights = stage_weights(step, total_steps, start, end)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12) and all(w >= 0 for w in weights.values())


def test_schedule_ends():
    start, end = stage_weights(0, 500), stage_weights(499, 500)
    assert max(start, key=start.get) == "format" and max(end, key=end.get) == "answer"
    assert stage_weights(10_000, 500) == end and stage_weights(-3, 500) == start
    with pytest.raises(ValueError, match="non-negative"):
        stage_weights(0, 10, {"format": -1.0, "answer": 2.0}, {"format": 0.0, "answer": 1.0})
    with pytest.raises(ValueError, match="same stages"):
        stage_weights(0, 10, {"format": 1.0}, {"answer": 1.0})


GOLD = st.text(string.ascii_letters + string.digits + " .,'-", min_size=1, max_size=30).filter(normalize_answer)


@given(GOLD, STEPS, TOTALS)
def test_a_well_formed_grounded_exact_answer_scores_exactly_1_at_every_step(gold, step, total_steps):
    result = prs_reward(respond(gold, gold), [gold], TOOLS, step=step, total_steps=total_steps)
    assert result.total == 1.0 and all(score == 1.0 for score in result.stages.values())
    assert result.answer == gold.strip() and result.exact_match == 1.0


FRAGMENTS = st.sampled_from([
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<answer>",
    "</answer>", "Nile", "the Nile river", " ", "\n", "user", GOOD_CALL, SEARCHED, "<answer>Nile</answer>",
    '{"name": "search", "arguments": {"query": "Nile"}}', '{"name": "search"}', "{bad json",
])
ANY_RESPONSE = st.one_of(st.lists(FRAGMENTS, max_size=14).map("".join), st.text(max_size=200))


@given(ANY_RESPONSE, STEPS, TOTALS, st.booleans())
def test_every_reward_and_stage_is_in_0_1(response, step, total_steps, require_tool):
    result = prs_reward(response, ["Nile", "Nile River"], TOOLS, step=step, total_steps=total_steps,
                        require_tool=require_tool)
    assert 0.0 <= result.total <= 1.0
    assert all(0.0 <= score <= 1.0 for score in [*result.stages.values(), *result.gated.values()])
    assert binary_reward(response, ["Nile"]).total in (0.0, 1.0)


def build(n_valid: int, n_invalid: int, found: bool, answer: str) -> str:
    passage = env("Doc 1 (Title: Nile) The Nile is long." if found else "Doc 1 (Title: Moon) Grey rock.")
    calls = [call()] * n_valid + ["<tool_call>{not json</tool_call>"] * n_invalid
    return "<think>Plan.</think>" + "".join(c + passage for c in calls) + f"<answer>{answer}</answer>"


STRUCTURES = st.tuples(st.integers(0, 3), st.integers(0, 2), st.booleans(),
                       st.sampled_from(["Nile", "the Nile river", "Amazon", "Nile Nile Nile Nile"]))


@given(STRUCTURES, STEPS, TOTALS)
def test_gating_breaking_format_never_raises_the_reward(structure, step, total_steps):
    response = build(*structure)
    reward = prs_reward(response, ["Nile"], TOOLS, step=step, total_steps=total_steps).total
    for broken in (response + " Also maybe the Amazon.", response + "<answer>Nile</answer>",
                   response.replace("<think>", "<think><think>"), response.replace("</answer>", "")):
        assert format_score(broken) == 0.0
        assert prs_reward(broken, ["Nile"], TOOLS, step=step, total_steps=total_steps).total <= reward


@given(STRUCTURES, STEPS, TOTALS)
def test_gating_breaking_a_tool_call_never_raises_the_reward(structure, step, total_steps):
    n_valid, n_invalid, found, answer = structure
    assume(n_valid > 0)
    reward = prs_reward(build(*structure), ["Nile"], TOOLS, step=step, total_steps=total_steps).total
    worse = prs_reward(build(n_valid - 1, n_invalid + 1, found, answer), ["Nile"], TOOLS, step=step,
                       total_steps=total_steps)
    assert worse.stages["tool_call"] < 1.0 and worse.gated["evidence"] == worse.gated["answer"] == 0.0
    assert worse.total <= reward
    no_calls = prs_reward(build(0, 0, found, answer), ["Nile"], TOOLS, step=step, total_steps=total_steps)
    assert no_calls.total <= reward and no_calls.total == pytest.approx(no_calls.weights["format"])


def test_answer_is_not_gated_on_evidence_unless_asked():
    missed = respond("Nile", found=False)
    assert final(missed).stages["evidence"] == 0.0 and final(missed).gated["answer"] == 1.0
    assert final(missed).total == pytest.approx(1.0 - final(missed).weights["evidence"])
    assert final(missed, answer_needs_evidence=True).gated["answer"] == 0.0


# ---- Reward hacking: each scores low, the honest answer scores 1 ----
def test_honest_answer_scores_1():
    assert final(respond("Nile")).total == 1.0 and final(respond("the Nile.")).total == 1.0


def test_hack_empty_answer_never_matches():
    for gold in (["Nile"], [""], ["the"]):
        for response in (respond(""), respond("   ")):
            assert final(response, gold).total == 0.0
            assert binary_reward(response, gold).total == 0.0 and exact_match(extract_answer(response), gold) == 0.0


def test_hack_answer_repeated():
    result = final(respond(" ".join(["Nile"] * 20)))
    assert result.stages["answer"] < 0.01 and result.exact_match == 0.0
    assert result.total < 0.25  # what format, tool calls and evidence alone are worth at the end


def test_hack_gold_buried_in_a_list_of_candidates():
    candidates = "Amazon, Yangtze, Mississippi, Nile, Congo, Danube, Volga, Mekong, Niger, Ganges"
    result = final(respond(candidates))
    assert result.stages["answer"] < 0.01 and result.exact_match == 0.0 and result.total < 0.25


def test_hack_text_after_the_answer():
    result = final(respond("Nile") + " Or possibly the Amazon.")
    assert result.stages["format"] == 0.0 and result.total == 0.0


def test_hack_two_answer_blocks():
    response = respond("Amazon").replace("<answer>", "<answer>Nile</answer><answer>")
    assert final(response).total == 0.0


def test_hack_answering_without_searching():
    result = final("<think>I know this.</think><answer>Nile</answer>")
    assert result.stages["tool_call"] == 0.0 and result.gated["answer"] == 0.0
    assert result.total == pytest.approx(result.weights["format"]) and result.total < 0.1


def test_hack_tool_call_with_invalid_json():
    response = respond("Nile").replace(GOOD_CALL, '<tool_call>{"name": "search", "arguments": {query: x}}</tool_call>')
    result = final(response)
    assert result.stages["tool_call"] == 0.0 and result.total == pytest.approx(result.weights["format"])


def test_hack_tool_response_written_by_the_model():
    response = "<think>Pretend I searched.</think>" + env("Doc 1 (Title: Nile) Nile.") + "<answer>Nile</answer>"
    assert final(response).total == 0.0


# ---- Adapters, called the way TRL's GRPOTrainer and verl's NaiveRewardManager call them ----
def test_trl_reward_called_like_grpo_trainer():
    from transformers import TrainerState

    searched = respond("Nile")
    conversational = [
        {"role": "assistant", "content": "<think>Search.</think>",
         "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": '{"query": "Nile"}'}}]},
        {"role": "tool", "name": "search", "content": "Doc 1 (Title: Nile) The Nile is long."},
        {"role": "assistant", "content": "<answer>Nile</answer>"},
    ]
    inputs = [  # dataset rows, as GRPOTrainer._calculate_rewards receives them
        {"prompt": "Longest river?", "golden_answers": ["Nile", "Nile River"], "id": 1},
        {"prompt": "Longest river?", "golden_answers": ["Nile", "Nile River"], "id": 1},
        {"prompt": [{"role": "user", "content": "Longest river?"}], "golden_answers": ["Nile"], "id": 2},
        {"prompt": "Longest river?", "golden_answers": ["Nile"], "id": 3},
    ]
    prompts = [row["prompt"] for row in inputs]
    completions = [searched, "<answer>Nile</answer>", conversational, [{"role": "assistant", "content": searched}]]
    keys = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
    reward_kwargs = {key: [row[key] for row in inputs] for key in keys}
    reward_kwargs["trainer_state"] = TrainerState(global_step=0, max_steps=100)
    rewards = trl_reward(prompts=prompts, completions=completions, completion_ids=[[1, 2]] * 4, **reward_kwargs)
    assert torch.tensor(rewards, dtype=torch.float32).shape == (4,)
    no_search = prs_reward("<answer>Nile</answer>", ["Nile"], TOOLS, step=0, total_steps=100).total
    assert rewards == [1.0, no_search, 1.0, 1.0]


def test_trl_reward_scores_the_reasoning_trl_moved_out_of_the_content():
    # TRL's parser moves <think>...</think> into reasoning_content; what the model wrote there is scored too.
    def turns(reasoning):
        return [{"role": "assistant", "content": "", "reasoning_content": reasoning,
                 "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": "Nile"}}}]},
                {"role": "tool", "name": "search", "content": "Doc 1 (Title: Nile) The Nile is long."},
                {"role": "assistant", "content": "<answer>Nile</answer>"}]

    state = {"golden_answers": [["Nile"]]}
    assert prs_adapters._completion_text(turns("Search first."))[:len("<think>Search first.</think>")] == \
        "<think>Search first.</think>"
    assert trl_reward(["Q?"], [turns("Search first.")], **state) == [1.0]
    assert trl_reward(["Q?"], [turns("I know: <answer>Nile")], **state) == [0.0]  # an unclosed tag in the thinking


def test_trl_reward_for_a_tokenizer_scores_the_sampled_order(tiny):
    # A turn with text after its call: TRL's parser puts the call after the text, a well-formed order; decoded from
    # the sampled ids (what `trl_reward_for(tokenizer)` scores) the text sits between the call and its response.
    tokenizer = tiny[1]
    sampled = (call("Nile") + " Let me also guess: Amazon." + "\nuser\n"
               + env("Doc 1 (Title: Nile) The Nile is long.") + "\nassistant\n<answer>Nile</answer>")
    ids = tokenizer(sampled, add_special_tokens=False).input_ids
    parsed = [{"role": "assistant", "content": " Let me also guess: Amazon.",
               "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": "Nile"}}}]},
              {"role": "tool", "name": "search", "content": "Doc 1 (Title: Nile) The Nile is long."},
              {"role": "assistant", "content": "<answer>Nile</answer>"}]
    columns = {"golden_answers": [["Nile"]], "completion_ids": [ids]}
    assert trl_reward(["Q?"], [parsed], **columns) == [1.0]  # the reordered text looks well formed
    reward = prs_adapters.trl_reward_for(tokenizer)
    assert reward.__name__ == "prs" and reward(["Q?"], [parsed], **columns) == [0.0]
    # and the template's role line between a call and its response ("user" once special tokens are gone) is fine
    clean = call("Nile") + "\nuser\n" + env("Doc 1 (Title: Nile) The Nile is long.") + "\nassistant\n<answer>Nile</answer>"
    assert reward(["Q?"], [parsed], golden_answers=[["Nile"]],
                  completion_ids=[tokenizer(clean, add_special_tokens=False).input_ids]) == [1.0]


def test_trl_reward_schedule_counts_generation_rounds_not_optimizer_steps():
    from transformers import TrainerState

    # 4 rounds of generation, 2 optimizer steps after each: global_step is 0, 2, 4, 6 of max_steps 8.
    text = respond("Nile River")
    last_round = TrainerState(global_step=6, max_steps=8)
    bound = prs_adapters.trl_reward_for(optimizer_steps_per_generation=2)
    assert bound(["Q?"], [text], golden_answers=[["Nile"]], trainer_state=last_round) == \
        [prs_reward(text, ["Nile"], TOOLS, step=3, total_steps=4).total] == [final(text).total]
    assert trl_reward(["Q?"], [text], golden_answers=[["Nile"]], trainer_state=last_round) != [final(text).total]
    with pytest.raises(ValueError, match="optimizer_steps_per_generation"):
        trl_reward(["Q?"], [text], golden_answers=[["Nile"]], optimizer_steps_per_generation=0)


def test_trl_reward_defaults_and_errors():
    assert trl_reward(["Q?"], ["<answer>Nile</answer>"], answer=["Nile"]) == [final("<answer>Nile</answer>").total]
    with pytest.raises(ValueError, match="golden_answers"):
        trl_reward(["Q?"], ["<answer>Nile</answer>"], label=["Nile"])


@pytest.mark.parametrize("ground_truth", ["Nile", ["Amazon", "Nile"], np.array(["Amazon", "Nile"], dtype=object),
                                          {"target": np.array(["Nile River", "Nile"], dtype=object)}])
def test_verl_compute_score_called_like_the_reward_manager(ground_truth):
    extra_info = {"index": 0, "num_turns": None}
    results = [compute_score(data_source="nq", solution_str=text, ground_truth=ground_truth, extra_info=extra_info)
               for text in (respond("Nile"), respond("Amazon Nile Congo"), "<answer>Nile</answer>")]
    reward_tensor = torch.zeros(3, 8)
    for i, result in enumerate(results):
        reward_tensor[i, 7] = result["score"]  # how NaiveRewardManager stores it
        assert set(result) == {"score", *STAGES, "exact_match"} and 0.0 <= result["score"] <= 1.0
    assert results[0]["score"] == 1.0 and results[0]["exact_match"] == 1.0
    assert results[1]["score"] < 0.5 and results[2]["score"] < 0.1
    assert compute_score("nq", respond("Amazon"), "Nile", {"step": 0, "total_steps": 10})["score"] == pytest.approx(
        prs_reward(respond("Amazon"), "Nile", TOOLS, step=0, total_steps=10).total)


def test_verl_compute_score_refuses_a_step_without_the_number_of_steps():
    with pytest.raises(ValueError, match=r"step=3 but total_steps=None: give both"):
        compute_score("nq", respond("Nile"), "Nile", step=3)
    with pytest.raises(ValueError, match=r"step=None but total_steps=10"):
        compute_score("nq", respond("Nile"), "Nile", {"total_steps": 10})
    # the keyword arguments (reward_kwargs) and extra_info may each give one
    assert compute_score("nq", respond("Amazon"), "Nile", {"total_steps": 10}, step=0)["score"] == pytest.approx(
        prs_reward(respond("Amazon"), "Nile", TOOLS, step=0, total_steps=10).total)


def test_docstring_examples_hold():
    assert doctest.testmod(prs).failed == 0
