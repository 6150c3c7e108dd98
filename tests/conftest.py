"""Shared fixtures and helpers: the real corpus, a BM25 index over it, the tiny and embedded models (built once per
run), the tiny agent taught the format, and a small training run of it."""

import json
import shutil
from pathlib import Path

import pytest

import assets
import data
import models
import tools
import train

TIMING = {"step_seconds", "rollout_tokens_per_s"}  # with time_*, the only metrics that differ between identical runs


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


def small(agent, output, *extra):
    """Flags for a small, fast run of the tiny agent."""
    return ["--model", str(agent), "--output-dir", str(output), "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "40", "--max-total-tokens", "900", "--eval-size", "4", "--micro-batch-size", "4",
            "--temperature", "1.0", "--lr", "1e-3", "--no-few-shot", "--passage-chars", "60", *extra]


@pytest.fixture(scope="session")
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


def assert_same_steps(a_rows, b_rows, steps, ignore=()):
    def kept(row):
        return {k: v for k, v in row.items() if k not in TIMING and not k.startswith("time_") and k not in ignore}

    a, b = {row["step"]: kept(row) for row in a_rows}, {row["step"]: kept(row) for row in b_rows}
    for step in steps:
        assert a[step] == b[step], step
