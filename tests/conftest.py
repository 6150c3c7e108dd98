"""Shared fixtures: the real corpus, a BM25 index over it, and the tiny and embedded models (built once per run)."""

import pytest

import assets
import data
import models
import tools


@pytest.fixture(scope="session")
def corpus():
    return data.wiki_corpus()


@pytest.fixture(scope="session")
def bm25(corpus):
    return tools.BM25Search(corpus)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the 2-layer random model with SmolLM2's tokenizer."""
    return models.load_model(models.TINY)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the real embedded SmolLM2-135M-Instruct."""
    return models.load_model(models.EMBEDDED)


@pytest.fixture(scope="session")
def tiny_agent(tiny, bm25):
    """A folder with the tiny model taught the agent's format by a short supervised run (150 steps on 64 wiki
    questions: search call, tool response, answer), so that its samples at temperature 1 mix well-formed and broken
    trajectories and the rewards of a group differ: training smoke runs then really update. (The random tiny model
    writes noise, every reward is 0 and every group is dead.) Built once per machine, in the cache; use it with
    --no-few-shot and --passage-chars 60, the prompt and observations it was taught on."""
    folder = assets.cache_dir() / "models" / "tiny-agent-v1"
    if not (folder / "config.json").exists():
        models._write_atomically(folder, lambda tmp: _teach_format(*tiny, bm25, tmp))
    return folder


def _teach_format(model, tokenizer, bm25, out):
    import copy

    import torch

    import rollout

    model = copy.deepcopy(model)
    registry = {"search": tools.search_tool(bm25, passage_chars=60)}
    config = rollout.RolloutConfig(few_shot=False)
    trajectories = []
    for example in data.load_task("wiki", "train")[:64]:
        description = example.question.split('"')[1]
        pieces = [(f'<tool_call>{{"name": "search", "arguments": {{"query": "{description}"}}}}</tool_call>', 1),
                  (tools.format_tool_response(registry["search"].function(query=description)), 0),
                  (f"<answer>{example.answers[-1]}</answer>", 1)]
        trajectory = rollout.Trajectory(example, 0, rollout.prompt_ids(tokenizer, example.question, registry, config))
        for text, trained in pieces:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            trajectory.response_ids += ids
            trajectory.loss_mask += [trained] * len(ids)
            trajectory.logprobs += [0.0] * len(ids)
        trajectories.append(trajectory)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for step in range(150):
        start = (step * 8) % len(trajectories)
        batch = rollout.collate(trajectories[start:start + 8], tokenizer.pad_token_id)
        loss = -(rollout.response_logprobs(model, batch) * batch.loss_mask).sum() / batch.loss_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.random.set_rng_state(generator_state)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
