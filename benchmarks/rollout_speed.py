"""Rollout throughput: the same trajectories generated three ways, on the embedded model, in one run.

    python benchmarks/rollout_speed.py [--model smollm2-135m] [--trajectories 16] [--device cpu] [--dtype auto]

The three ways, all greedy (so each does the same work: the same trajectories, up to float rounding), with the same
questions, tools and limits:

    one at a time     this project's tool loop with a batch of 1
    HF generate       transformers' `generate` with `stop_strings`, all rows batched, one call per segment and the
                      tool loop around it: what a trainer without an inference server (TRL without vLLM) does.
                      Every call encodes each row's whole context again, and a call runs until its last row stops.
    this project      the batched loop: the shared prompt prefix encoded once, rows leaving as their segments end

It prints, for each, the sampled and tool-response tokens, the wall time and sampled tokens per second, then the
ratios of this project's loop to the others.
"""
import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import agent  # noqa: E402
import cpu_speed  # noqa: E402
import kv_cache  # noqa: E402
import models  # noqa: E402
import rollout  # noqa: E402
import tools  # noqa: E402


def project_loop(model, tokenizer, examples, registry, config):
    """(sampled tokens, tool-response tokens) of this project's rollout."""
    trajectories = rollout.rollout(model, tokenizer, examples, registry, config)
    sampled = sum(sum(t.loss_mask) for t in trajectories)
    return sampled, sum(len(t.loss_mask) for t in trajectories) - sampled


def hf_generate_loop(model, tokenizer, examples, registry, config):
    """The tool loop around transformers' `generate`: one batched call per round, then tools for the rows that
    stopped at `</tool_call>`. Returns (sampled tokens, tool-response tokens)."""
    contexts = [rollout.prompt_ids(tokenizer, e.question, registry, config)
                for e in examples for _ in range(config.group_size)]
    calls, active = [0] * len(contexts), list(range(len(contexts)))
    sampled = tool = 0
    stops = list(rollout.STOP_STRINGS)
    while active:
        ids, mask = kv_cache.pad_batch([contexts[i] for i in active], tokenizer.pad_token_id)
        budget = min(config.max_new_tokens, config.max_total_tokens - max(len(contexts[i]) for i in active))
        if budget <= 0:
            break
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                             max_new_tokens=budget, stop_strings=stops, tokenizer=tokenizer,
                             pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:].tolist()
        still = []
        for i, new in zip(active, out):
            new = _until_stop(new, tokenizer, stops)
            contexts[i] = contexts[i] + new
            sampled += len(new)
            text = tokenizer.decode(new)
            if text.endswith(tools.TOOL_CALL_CLOSE) and calls[i] < config.max_tool_calls:
                calls[i] += 1
                bodies = tools.find_tool_calls(text)
                call = tools.parse_tool_call(bodies[-1], registry) if bodies else tools.ToolCall(text, error="no call")
                response = tokenizer(tools.format_tool_response(tools.execute(call, registry).text),
                                     add_special_tokens=False).input_ids
                contexts[i] += response
                tool += len(response)
                if len(contexts[i]) < config.max_total_tokens:
                    still.append(i)
        active = still
    return sampled, tool


def _until_stop(new: list[int], tokenizer, stops) -> list[int]:
    """A row's generated tokens up to the one that completes a stop string, or up to and including EOS."""
    text = ""
    for n, token in enumerate(new, start=1):
        if token in (tokenizer.eos_token_id, tokenizer.pad_token_id):
            return new[:n]
        text += tokenizer.decode([token])
        if any(stop in text for stop in stops):
            return new[:n]
    return new


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.EMBEDDED, help="a --model value (models.py)")
    parser.add_argument("--trajectories", type=int, default=16, help="how many trajectories (questions x 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="the weights' dtype (auto: bf16 on CUDA, fp32 on the CPU, as train.py --dtype auto)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["one", "hf"],
                        help="ways to leave out (one at a time is slow at large --trajectories)")
    args = parser.parse_args()

    device, dtype = agent.device_and_dtype(args)  # --dtype auto as train.py reads it
    cpu_speed.keep_freed_memory(device)  # as train.py and eval.py
    model, tokenizer = models.load_model(args.model, device=device, dtype=dtype)
    registry = {"search": tools.search_tool(tools.BM25Search(data.wiki_corpus()), passage_chars=200)}
    examples = data.load_task("wiki", "test")[:args.trajectories // 2]
    settings = dict(group_size=2, temperature=0.0, max_new_tokens=96, max_total_tokens=1024, max_tool_calls=2)
    print(f"{args.model} on {args.device} in {dtype}, {len(examples)} questions x 2 = {2 * len(examples)} "
          f"trajectories, torch threads {torch.get_num_threads()}")
    ways = {"one at a time": ("one", project_loop, dict(batch_size=1)),
            "HF generate": ("hf", hf_generate_loop, {}),
            "this project": ("", project_loop, dict(batch_size=len(examples) * 2))}
    speed = {}
    for name, (key, loop, extra) in ways.items():
        if key in args.skip:
            continue
        config = rollout.RolloutConfig(**settings, **extra)
        start = time.perf_counter()
        with torch.no_grad():
            sampled, tool = loop(model, tokenizer, examples, registry, config)
        seconds = time.perf_counter() - start
        speed[name] = sampled / seconds
        print(f"{name:>14}: {sampled:5d} sampled + {tool:5d} tool tokens in {seconds:6.1f} s = "
              f"{speed[name]:6.1f} sampled tokens/s", flush=True)
    for name in speed:
        if name != "this project":
            print(f"this project / {name}: {speed['this project'] / speed[name]:.2f}x")


if __name__ == "__main__":
    main()
