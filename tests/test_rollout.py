"""rollout.py: the batched tool loop, driven through the real `generate` of the tiny model.

A scripted policy (a logits processor placed after the log-prob recorder) forces each row to emit a known token
sequence, so masks, spans, stop points and tool responses can be checked exactly; the recorder still sees the tiny
model's own logits, so the recorded log-probs are real and can be compared with a recomputation.
"""

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessor

import eval as evaluation
import run_folder
import kv_cache
import models
import prs
import rollout
import tools
from data import Example
from rollout import RolloutConfig, collate, recompute_logprobs, response_logprobs
from tools import TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN


@pytest.fixture(scope="module")
def tok():
    tokenizer = models.load_tokenizer(models.TINY)
    tokenizer.pad_token = "<|endoftext|>"  # a pad distinct from EOS lets the script find each row's own tokens
    return tokenizer


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


def nile_backend(query, k):
    return [tools.Passage("Nile", f"The Nile is a river in Africa. You searched for {query}.", 1.0)]


TOOLS = {"search": tools.search_tool(nile_backend)}

CALL = ["<think>I should search.</think>", "<tool_call>", '{"name": "search", "arguments": {"query": "Nile"}}',
        "</tool_call>"]
BAD_CALL = ["<tool_call>", '{"name": "search", "arguments": {"query": ', "</tool_call>"]
ANSWER = ["<think>Found it.</think>", "<answer>", "Nile", "</answer>"]


class Scripted(LogitsProcessor):
    """Forces every row to follow the script of its question: a list of segments, each a list of text pieces that
    are tokenized one by one. Between segments the environment's tool response is skipped. A pure function of
    each row's context, so G copies of one question behave identically."""

    def __init__(self, tokenizer, scripts):
        self.tok = tokenizer
        self.header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        self.scripts = {key: [segment_ids(tokenizer, seg) for seg in segments] for key, segments in scripts.items()}

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids.tolist()):
            ids = [t for t in ids if t != self.tok.pad_token_id]
            start = max(i for i in range(len(ids)) if ids[i:i + len(self.header)] == self.header) + len(self.header)
            prompt = self.tok.decode(ids[:start])
            (key,) = [key for key in self.scripts if f"Question {key}?" in prompt]
            scores[row] = -float("inf")
            scores[row, self.next_token(self.scripts[key], ids[start:])] = 0.0
        return scores

    def next_token(self, segments, response):
        position = 0
        for segment in segments:
            have = response[position:position + len(segment)]
            assert have == segment[:len(have)], "the rollout changed a sampled token"
            if len(have) < len(segment):
                return segment[len(have)]
            position += len(segment)
            text = ""
            while position < len(response) and not text.endswith(TOOL_RESPONSE_CLOSE + "\n"):
                text += self.tok.decode([response[position]])
                position += 1
        return self.tok.eos_token_id


def segment_ids(tokenizer, pieces):
    return [i for piece in pieces for i in
            ([tokenizer.eos_token_id] if piece == "EOS" else tokenizer(piece, add_special_tokens=False).input_ids)]


def run(model, tok, scripts, group_size=1, first_group_id=0, **settings):
    config = RolloutConfig(group_size=group_size, temperature=1.0, max_new_tokens=settings.pop("max_new_tokens", 64),
                           max_total_tokens=settings.pop("max_total_tokens", 2048), **settings)
    examples = [Example(id=key, question=f"Question {key}?", answers=("Nile",)) for key in scripts]
    return rollout.rollout(model, tok, examples, TOOLS, config, first_group_id=first_group_id,
                           logits_processors=[Scripted(tok, scripts)])


def sampled(trajectory):
    return [i for i, m in zip(trajectory.response_ids, trajectory.loss_mask) if m == 1]


def tool_tokens(tok, observation):
    return tok(tools.format_tool_response(observation), add_special_tokens=False).input_ids


# ---- Masks, spans, tool responses, token-in/token-out ----
def test_masks_spans_and_tool_responses_are_exact(model, tok):
    (t,) = run(model, tok, {"a": [CALL, BAD_CALL, ANSWER]})
    assert t.stop_reason == "answer" and t.answer == "Nile"
    assert len(t.response_ids) == len(t.loss_mask) == len(t.logprobs)
    # token-in/token-out: the sampled ids are exactly the ids generate produced from the script
    assert sampled(t) == segment_ids(tok, CALL) + segment_ids(tok, BAD_CALL) + segment_ids(tok, ANSWER)
    # steps are the sampled segments, tool spans the environment's tokens; together they tile the response in order
    assert len(t.steps) == 3 and [c.step for c in t.tool_calls] == [0, 1]
    pieces = sorted(t.steps + [c.span for c in t.tool_calls])
    assert pieces[0][0] == 0 and pieces[-1][1] == len(t.response_ids)
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    for start, end in t.steps:
        assert set(t.loss_mask[start:end]) == {1}
    for call in t.tool_calls:
        start, end = call.span
        assert set(t.loss_mask[start:end]) == {0}  # no tool-response token is ever trained on
        assert t.response_ids[start:end] == tool_tokens(tok, call.observation)  # tokenized on its own, appended once
        assert set(t.logprobs[start:end]) == {0.0}
    assert t.tool_calls[0].call.ok and t.tool_calls[0].observation.startswith("Doc 1 (Title: Nile)")
    assert not t.tool_calls[1].call.ok and "not valid JSON" in t.tool_calls[1].call.error
    assert t.tool_calls[1].observation.startswith("Error: the tool call is not valid JSON")
    # each tool response appears exactly once in the text
    assert t.text.count(TOOL_RESPONSE_OPEN) == 2
    assert t.text.count(t.tool_calls[0].observation) == 1 and t.text.count(t.tool_calls[1].observation) == 1
    assert all(lp < 0 for lp in (p for p, m in zip(t.logprobs, t.loss_mask) if m))


def test_a_lone_surrogate_in_a_call_is_run_and_its_record_written(model, tok, tmp_path):
    # The model writes the JSON escape \ud800 (six ASCII characters): the query holds a lone surrogate, the backend
    # echoes it into the observation, and the trajectory's record must still be written and read back.
    odd_call = ["<tool_call>", '{"name": "search", "arguments": {"query": "\\ud800 Paris"}}', "</tool_call>"]
    (t,) = run(model, tok, {"a": [odd_call, ANSWER]})
    assert t.stop_reason == "answer" and t.tool_calls[0].call.arguments == {"query": "\ud800 Paris"}
    assert "You searched for ? Paris." in t.tool_calls[0].observation
    path = tmp_path / "records.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(run_folder.jsonl_line(evaluation._record(t, None)))
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["calls"][0]["arguments"]["query"] == "\ud800 Paris" and record["answer"] == "Nile"


def test_progress_hears_how_many_trajectories_finished(model, tok):
    heard = []
    config = RolloutConfig(group_size=2, temperature=1.0, max_new_tokens=64)
    examples = [Example(id=key, question=f"Question {key}?", answers=("Nile",)) for key in "ab"]
    rollout.rollout(model, tok, examples, TOOLS, config, progress=heard.append,
                    logits_processors=[Scripted(tok, {"a": [ANSWER], "b": [CALL, ANSWER]})])
    assert heard == sorted(heard) and heard[-1] == 4 and heard[0] == 2  # a's two answer in the first round


def test_the_call_that_runs_is_the_call_the_reward_scores(model, tok):
    # A segment that opens <tool_call> twice: the reward (prs.tool_call_score) reads the body from the first opening,
    # which is not valid JSON; the rollout must not run the inner, valid-looking call and report it as valid.
    doubled = ["<tool_call>", '{"name": "search", '] + CALL[1:]
    (t,) = run(model, tok, {"a": [doubled, ANSWER]})
    (record,) = t.tool_calls
    assert not record.call.ok and "not valid JSON" in record.call.error
    assert prs.tool_call_score(t.text, TOOLS) == float(record.call.ok) == 0.0


@pytest.mark.parametrize("pieces, reason", [
    (["<answer>", "Nile", "</answer", ">,"], "answer"),
    (["<tool_call>", '{"name": "search", "arguments": {"query": "Nile"}}', "</tool_call", '>"'], "tool_call"),
])
def test_a_segment_stops_at_the_token_that_completes_the_stop_string(model, tok, pieces, reason):
    # '>,' and '>"' are single tokens that complete the stop string and carry one more character. The segment must
    # end with that token, kept whole; a stopper that missed it would let the script go on (EOS, or the next segment
    # without a tool response in between).
    (t,) = run(model, tok, {"a": [pieces, ANSWER]}, max_tool_calls=1)
    first_segment = t.response_ids[t.steps[0][0]:t.steps[0][1]]
    assert first_segment == segment_ids(tok, pieces) and first_segment[-1] == tok.convert_tokens_to_ids(
        tok.tokenize(pieces[-1]))[0]
    if reason == "answer":
        assert t.stop_reason == "answer" and t.answer == "Nile" and len(t.steps) == 1
    else:
        assert t.tool_calls[0].call.ok and t.stop_reason == "answer" and len(t.steps) == 2


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_draws_each_token_with_its_tempered_probability(top_p):
    # softmax(scores / T) cut to the top_p nucleus and renormalized, checked on 40,000 draws
    scores = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    torch.manual_seed(0)
    drawn = rollout.sample(scores.expand(40_000, -1), temperature=0.7, top_p=top_p)  # [40000]
    probs = torch.softmax(scores / 0.7, dim=-1).double()
    if top_p < 1.0:  # the nucleus: the fewest most likely tokens whose mass reaches top_p
        kept = (probs.cumsum(0) - probs) < top_p
        probs = torch.where(kept, probs, 0.0) / probs[kept].sum()
    counts = torch.bincount(drawn, minlength=len(scores)).double()
    sigma = (40_000 * probs * (1 - probs)).sqrt()
    assert torch.all((counts - 40_000 * probs).abs() <= 5 * sigma + 1e-9), (counts, 40_000 * probs)
    assert torch.all(counts[probs == 0] == 0)


@settings(max_examples=100, deadline=None)
@given(finite=st.lists(st.booleans(), min_size=2, max_size=40), seed=st.integers(0, 2**16),
       temperature=st.sampled_from([0.3, 0.7, 1.0, 1.5]))
def test_sampling_never_draws_a_token_of_probability_zero(finite, seed, temperature):
    # Tokens a logits processor set to -inf have probability 0: the token drawn has a finite score, at either end of
    # the vocabulary too.
    if not any(finite):
        finite[0] = True
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(64, len(finite), generator=generator) * 5  # [64, V]
    scores[:, ~torch.tensor(finite)] = float("-inf")
    torch.manual_seed(seed)
    drawn = rollout.sample(scores, temperature, top_p=1.0)  # [64]
    assert torch.isfinite(scores.gather(1, drawn[:, None])).all()


@settings(max_examples=60, deadline=None)
@given(question=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=120), slack=st.integers(-3, 3),
       few_shot=st.booleans())
def test_prompts_without_room_are_exactly_those_whose_prompt_reaches_the_limit(tok, question, slack, few_shot):
    examples = [Example("short", "What is the Nile?", ("Nile",)), Example("any", question, ("x",)),
                Example("long", "Which river? " * 40 + question, ("x",))]
    limit = len(rollout.prompt_ids(tok, examples[1].question, TOOLS, RolloutConfig(few_shot=few_shot))) + slack
    config = RolloutConfig(max_total_tokens=max(1, limit), few_shot=few_shot)
    lengths = {e.id: len(rollout.prompt_ids(tok, e.question, TOOLS, config)) for e in examples}
    assert rollout.prompts_without_room(tok, examples, TOOLS, config) == \
        [(e, lengths[e.id]) for e in examples if lengths[e.id] >= config.max_total_tokens]  # what the loop stops


def test_a_prompt_that_fills_the_budget_samples_nothing(model, tok):  # why train.py and eval.py check it first
    question = "Which river? " * 40
    limit = len(rollout.prompt_ids(tok, question, TOOLS, RolloutConfig()))
    (t,) = rollout.rollout(model, tok, [Example("long", question, ("x",))], TOOLS,
                           RolloutConfig(group_size=1, temperature=0.0, max_total_tokens=limit))
    assert t.stop_reason == "length" and t.response_ids == []
    assert rollout.prompts_without_room(tok, [t.example], TOOLS, RolloutConfig(max_total_tokens=limit)) == [
        (t.example, limit)]


def test_a_tool_response_that_exactly_fills_the_budget_is_kept(model, tok):
    (free,) = run(model, tok, {"a": [CALL, ANSWER]})
    observation = free.tool_calls[0].observation
    exact = len(free.prompt_ids) + len(segment_ids(tok, CALL)) + len(tool_tokens(tok, observation))

    (t,) = run(model, tok, {"a": [CALL, ANSWER]}, max_total_tokens=exact)
    assert t.stop_reason == "length" and len(t.prompt_ids) + len(t.response_ids) == exact
    assert t.tool_calls[0].span != (-1, -1) and t.text.count(observation) == 1

    (short,) = run(model, tok, {"a": [CALL, ANSWER]}, max_total_tokens=exact - 1)
    assert short.stop_reason == "length" and short.tool_calls[0].span == (-1, -1)
    assert TOOL_RESPONSE_OPEN not in short.text and sampled(short) == segment_ids(tok, CALL)


# ---- Stop reasons and groups ----
def test_the_cache_goes_by_the_name_the_installed_transformers_reads(model, tok):
    class Before(torch.nn.Module):  # transformers before the rename
        def forward(self, input_ids=None, past_key_values=None):
            pass

    class After(torch.nn.Module):
        def forward(self, input_ids=None, cache=None):
            pass

    assert kv_cache.with_cache(Before(), "kv") == {"past_key_values": "kv"}
    assert kv_cache.with_cache(After(), "kv") == {"cache": "kv"}
    # the tool loop and the log-prob pass use the installed release's name: no warning about the old one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (trajectory,) = run(model, tok, {"calls": [CALL, ANSWER]})
        response_logprobs(model, collate([trajectory], tok.pad_token_id))
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_stop_reasons(model, tok):
    eos, too_many_calls = run(model, tok, {"eos": [["Just some words", "EOS"]], "calls": [CALL, CALL, ANSWER]},
                              max_tool_calls=1)
    (long_segment,) = run(model, tok, {"long": [["word " * 40]]}, max_new_tokens=12)
    assert eos.stop_reason == "eos" and eos.answer is None
    assert eos.response_ids[-1] == tok.eos_token_id and eos.loss_mask[-1] == 1  # the policy sampled EOS
    assert long_segment.stop_reason == "length" and len(long_segment.response_ids) == 12
    assert too_many_calls.stop_reason == "max_tool_calls" and len(too_many_calls.tool_calls) == 1
    assert too_many_calls.text.count(TOOL_RESPONSE_OPEN) == 1  # the call over the limit is not executed
    assert len(too_many_calls.steps) == 2 and set(rollout.STOP_REASONS) >= {t.stop_reason for t in
                                                                          (eos, long_segment, too_many_calls)}


def test_group_ids_are_shared_within_a_group_and_distinct_across(model, tok):
    trajectories = run(model, tok, {"a": [ANSWER], "b": [CALL, ANSWER]}, group_size=3, first_group_id=10)
    assert [t.group_id for t in trajectories] == [10, 10, 10, 11, 11, 11]
    assert [t.example.id for t in trajectories] == ["a"] * 3 + ["b"] * 3
    assert len({tuple(t.response_ids) for t in trajectories[:3]}) == 1


def test_a_ragged_batch_gives_each_trajectory_what_it_gets_alone(model, tok):
    scripts = {"a": [ANSWER], "b": [CALL, BAD_CALL, ANSWER], "c": [CALL, ANSWER], "d": [["Hmm", "EOS"]]}
    together = run(model, tok, scripts)
    in_pairs = run(model, tok, scripts, batch_size=2)
    for key, joint, paired in zip(scripts, together, in_pairs):
        (alone,) = run(model, tok, {key: scripts[key]})
        for other in (joint, paired):
            assert other.response_ids == alone.response_ids and other.loss_mask == alone.loss_mask
            assert other.steps == alone.steps and other.stop_reason == alone.stop_reason
            assert torch.allclose(torch.tensor(other.logprobs), torch.tensor(alone.logprobs), atol=1e-4)


def test_encode_lays_rows_out_after_the_shared_prefix_each_as_it_is_alone(model):
    contexts = [[5, 6, 7, 8, 9], [5, 6, 11, 12]]
    with torch.no_grad():
        prefix = kv_cache.prefix_cache(model, torch.tensor([[5, 6]]), rows=1)
        cache, mask = kv_cache.encode(model, contexts, prefix, prefix_length=2, pad_id=0)
        alone = [kv_cache.returned_cache(model(input_ids=torch.tensor([c[:-1]]), use_cache=True)) for c in contexts]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]  # [prefix | padding | own], all of a row but its last token
    for layer, first, second in zip(cache.layers, alone[0].layers, alone[1].layers):
        assert torch.allclose(layer.keys[0], first.keys[0], atol=1e-5)  # each row as it is alone
        assert torch.allclose(layer.keys[1, :, [0, 1, 3]], second.keys[0], atol=1e-5)


# ---- Log-probs: recorded while sampling == recomputed afterwards ----
def assert_recompute_matches(model, tok, trajectories, temperature=1.0):
    batch = collate(trajectories, tok.pad_token_id)
    mask = batch.loss_mask.bool()
    for micro in (1, 3, 64):
        recomputed = recompute_logprobs(model, batch, micro_batch_size=micro, temperature=temperature)
        assert torch.allclose(recomputed[mask], batch.sampling_logprobs[mask], atol=2e-4), micro
    with torch.no_grad():
        shared = response_logprobs(model, batch, temperature)
        full = response_logprobs(model, batch, temperature, share_prefix=False)
    assert torch.allclose(shared, full, atol=2e-5)
    assert (shared[~batch.loss_mask.bool()] == 0).all()


def test_recomputed_logprobs_match_sampling_logprobs_of_scripted_tool_trajectories(model, tok):
    trajectories = run(model, tok, {"a": [CALL, BAD_CALL, ANSWER], "b": [ANSWER], "c": [CALL, ANSWER]})
    assert_recompute_matches(model, tok, trajectories)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_recomputed_logprobs_match_freely_sampled_trajectories(model, tok, temperature):
    torch.manual_seed(0)
    config = RolloutConfig(group_size=3, temperature=temperature, max_new_tokens=24, max_total_tokens=2048)
    examples = [Example("x", "Who wrote Hamlet?", ("Shakespeare",)), Example("y", "Where is the Nile?", ("Africa",))]
    trajectories = rollout.rollout(model, tok, examples, TOOLS, config)
    assert len({tuple(t.response_ids) for t in trajectories}) > 1  # really sampled
    assert_recompute_matches(model, tok, trajectories, temperature)


def test_logprobs_carry_gradients_and_entropy_is_masked(model, tok):
    trajectories = run(model, tok, {"a": [CALL, ANSWER], "b": [ANSWER]})
    batch = collate(trajectories, tok.pad_token_id)
    logprobs, entropy = response_logprobs(model, batch, with_entropy=True)
    assert logprobs.requires_grad and logprobs.shape == entropy.shape == batch.response_ids.shape
    (logprobs * batch.loss_mask).sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    model.zero_grad()
    sampled = batch.loss_mask.bool()  # tool-response tokens and padding get neither a log-prob nor an entropy
    assert (entropy[sampled] > 0).all() and (entropy[~sampled] == 0).all() and (logprobs[~sampled] == 0).all()
    assert (batch.response_mask.bool() & ~sampled).any()  # there are tool tokens to leave out
    with torch.no_grad():  # reference: each row alone, unpadded, every position's logits, the sampled ones picked
        for row in range(len(batch)):
            ids = batch.input_ids[row][batch.attention_mask[row].bool()]
            n = int(batch.response_mask[row].sum())
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, -n - 1:-1].float(), dim=-1)  # [n, V]
            own = sampled[row, :n]
            assert torch.allclose(entropy[row, :n][own], -(logp.exp() * logp).sum(-1)[own], atol=1e-4)
            expected = logp.gather(1, ids[-n:, None]).squeeze(1)  # [n]
            assert torch.allclose(logprobs[row, :n][own], expected[own], atol=1e-4)


def test_a_shared_prefix_backpropagated_once_gives_the_full_gradient(model, tok):
    trajectories = run(model, tok, {"a": [CALL, ANSWER], "b": [ANSWER], "c": [CALL, BAD_CALL, ANSWER]})
    batch = collate(trajectories, tok.pad_token_id)

    def gradients():
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return grads

    response_logprobs(model, batch, share_prefix=False).sum().backward()  # one pass, no sharing
    expected = gradients()
    prefix = rollout.SharedPrefix(model, batch)  # micro-batches of 2 and 1 rows, the prefix's backward run once
    assert batch.prefix_length > 0 and prefix.cache is not None
    for rows in ([0, 1], [2]):
        response_logprobs(model, batch[rows], prefix=prefix.cache).sum().backward()
    prefix.backward()
    shared = gradients()
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(expected, shared))


# ---- Prompt and padding ----
def test_prompt_describes_the_tools_and_holds_the_question(tok):
    text = tok.apply_chat_template(rollout.build_messages("Where is the Nile?", TOOLS, 4, few_shot=True),
                                   tokenize=False, add_generation_prompt=True)
    assert tools.describe_tools(TOOLS) in text and "up to 4 times" in text
    assert rollout.FEW_SHOT_QUESTION in text and text.rstrip().endswith("assistant")
    assert text.index(rollout.FEW_SHOT_QUESTION) < text.index("Where is the Nile?")
    plain = tok.apply_chat_template(rollout.build_messages("Where is the Nile?", TOOLS, 4, few_shot=False),
                                    tokenize=False, add_generation_prompt=True)
    assert rollout.FEW_SHOT_QUESTION not in plain


def test_pad_batch_keeps_each_rows_tokens_at_positions_from_zero():
    rows = [[5, 6, 7, 8, 9], [5, 6, 1], [5, 6, 2, 3]]
    prefix = kv_cache.shared_prefix_length(rows)
    assert prefix == 2
    ids, mask = kv_cache.pad_batch(rows, pad_id=0, prefix_length=prefix)
    position = kv_cache.positions(mask)
    for row, seq in enumerate(rows):
        assert ids[row][mask[row].bool()].tolist() == seq
        assert position[row][mask[row].bool()].tolist() == list(range(len(seq)))
    assert kv_cache.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # every row keeps a token of its own


# ---- The real embedded model ----
@pytest.mark.slow
def test_embedded_model_searches_with_a_valid_call(embedded, bm25):
    model, tokenizer = embedded
    registry = {"search": tools.search_tool(bm25, passage_chars=200)}
    examples = [Example("q1", 'Which Wikipedia article has the short description "Sprint race"?', ("100 metres",)),
                Example("q2", 'Which Wikipedia article has the short description "Spiritual leader of Tibet since '
                              '1940"?', ("14th Dalai Lama",))]
    config = RolloutConfig(group_size=1, temperature=0.0, max_new_tokens=64, max_total_tokens=1024)
    trajectories = rollout.rollout(model, tokenizer, examples, registry, config)
    for t, title in zip(trajectories, ["100 metres", "14th Dalai Lama"]):
        assert t.tool_calls and t.tool_calls[0].call.ok and t.tool_calls[0].call.name == "search"
        assert f"(Title: {title})" in t.tool_calls[0].observation  # the search found the gold article
        assert t.text.count(TOOL_RESPONSE_OPEN) == len([c for c in t.tool_calls if c.span != (-1, -1)])
    assert_recompute_matches(model, tokenizer, trajectories)
