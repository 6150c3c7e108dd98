"""Building the agent from its settings, for train.py and eval.py alike: its tools, its judge, the settings of its
tool loop, the device and precision it runs in, and the seeds.

The settings an agent is made of (model, retrieval, tool-loop limits, judge) are settings.AgentArgs; each function
here turns some of them into what rollout.py, prs.py and judge.py take, and refuses a value that cannot work with an
error naming its flag (cli.UsageError).
"""

from __future__ import annotations

import functools
import os
import random

import numpy as np
import torch

import assets
import data
import judge as judge_lib
import models
import rollout
import settings
import tools as tool_lib
from cli import UsageError, require

USER_ERRORS = (UsageError, data.DataError, models.ModelLoadError, assets.AssetError)  # a message, no traceback


def build_tools(args: settings.AgentArgs) -> dict[str, tool_lib.Tool]:
    """The agent's tools: `search` over the corpus (local BM25) or a Search-R1 retrieval server."""
    backend = search_backend(args.retriever, args.corpus, args.cache_dir)
    return {"search": tool_lib.search_tool(backend, topk=args.topk, passage_chars=args.passage_chars or None)}


@functools.lru_cache(maxsize=4)
def search_backend(retriever: str, corpus: str, cache_dir: str):
    """A search backend, built once per process for given settings (indexing 10k documents takes ~1 s)."""
    if retriever.startswith(("http://", "https://")):
        client = tool_lib.SearchR1Client(retriever)
        try:  # once at the start: a server that is down fails here, not as an error string in every observation
            client("test", 1)
        except RuntimeError as error:
            raise UsageError(f"--retriever {retriever!r}: {error}") from None
        return client
    require(retriever == "bm25", "retriever", retriever, "use bm25 or the http(s) URL of a Search-R1 server")
    return tool_lib.BM25Search(data.load_corpus(corpus, cache_dir or None))


def rollout_config(args: settings.AgentArgs, **sampling) -> rollout.RolloutConfig:
    """The tool loop's settings: the agent's limits from `args`, the sampling (group size, temperature...) given."""
    return rollout.RolloutConfig(max_tool_calls=args.max_tool_calls, max_new_tokens=args.max_new_tokens,
                                 max_total_tokens=args.max_total_tokens, few_shot=args.few_shot, **sampling)


def check_prompts_fit(tokenizer, examples, tools, config: rollout.RolloutConfig, what: str) -> None:
    """A clear error, before any work, where a question's prompt leaves no room to answer within --max-total-tokens
    (its trajectories would be scored as failures without the model writing a token)."""
    over = rollout.prompts_without_room(tokenizer, examples, tools, config)
    if over:
        example, length = over[0]
        where = example.meta.get("location") or f"question {example.id!r}"
        raise UsageError(f"{where}: the prompt (instructions, {'worked example, ' if config.few_shot else ''}"
                         f"question) is {length} tokens, so --max-total-tokens {config.max_total_tokens} leaves no "
                         f"room to answer ({len(over)} of the {len(examples)} {what} are that long); "
                         f"shorten them, or raise --max-total-tokens")


def build_judge(args: settings.AgentArgs, cache_path: str | None = None, check: bool = False
                ) -> judge_lib.Judge | None:
    """The long-form judge, or None when no judge model is configured. With `check` (the run has long-form answers to
    score) the judge is asked a probe question first, so that an endpoint that cannot judge stops the run now."""
    if not (args.judge_model or os.environ.get("JUDGE_MODEL")):
        return None
    try:
        judge = judge_lib.Judge(model=args.judge_model or None, base_url=args.judge_base_url or None,
                                api_key=args.judge_api_key or None, cache_path=cache_path)
        if check:
            judge.check()
    except ValueError as error:  # no API key
        raise UsageError(str(error)) from None
    except judge_lib.JudgeUnavailable as error:
        raise UsageError(f"{error}; check --judge-base-url, --judge-model and the API key (or OPENAI_BASE_URL, "
                         f"JUDGE_MODEL and OPENAI_API_KEY)") from None
    return judge


def device_and_dtype(args: settings.AgentArgs) -> tuple[torch.device, torch.dtype]:
    """--device auto: CUDA when available; --dtype auto: bf16 on CUDA, fp32 on the CPU (CPUs without native bf16,
    most of them, run bf16 matrix products far slower than fp32)."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r}: use auto, cpu, cuda or cuda:N") from None
        require(device.type != "cuda" or torch.cuda.is_available(), "device", args.device,
                "no CUDA device is available here; use --device cpu")
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return device, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
