"""Rollout throughput: the same 16 trajectories generated as one batch and one at a time, on the embedded model.

    python benchmarks/rollout_speed.py [--model smollm2-135m] [--trajectories 16] [--device cpu]

Prints, for each way, the sampled and tool-response tokens, the wall time and sampled tokens per second, then the
ratio batched / one-at-a-time. Both runs use the same questions, seed and settings; only the batch size differs.
Greedy decoding by default, so that both ways do the same work (the same trajectories, up to float rounding); with
--temperature > 0 the two runs sample different text, so compare tokens per second.
"""

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import models  # noqa: E402
import rollout  # noqa: E402
import tools  # noqa: E402


def run(model, tokenizer, examples, registry, config, seed):
    torch.manual_seed(seed)
    start = time.perf_counter()
    trajectories = rollout.rollout(model, tokenizer, examples, registry, config)
    seconds = time.perf_counter() - start
    sampled = sum(sum(t.loss_mask) for t in trajectories)
    tool = sum(len(t.loss_mask) - sum(t.loss_mask) for t in trajectories)
    return sampled, tool, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.EMBEDDED, help="a --model value (models.py)")
    parser.add_argument("--trajectories", type=int, default=16, help="how many trajectories (8 questions x 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both runs")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the same work both ways)")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = models.load_model(args.model, device=args.device, dtype=dtype)
    registry = {"search": tools.search_tool(tools.BM25Search(data.wiki_corpus()), passage_chars=200)}
    examples = data.load_task("wiki", "test")[:args.trajectories // 2]
    settings = dict(group_size=2, temperature=args.temperature, max_new_tokens=96, max_total_tokens=1024,
                    max_tool_calls=2)
    print(f"{args.model} on {args.device}, {len(examples)} questions x 2 = {2 * len(examples)} trajectories, "
          f"torch threads {torch.get_num_threads()}")
    results = {}
    for name, batch_size in (("batched", 2 * len(examples)), ("one at a time", 1)):
        config = rollout.RolloutConfig(batch_size=batch_size, **settings)
        sampled, tool, seconds = run(model, tokenizer, examples, registry, config, args.seed)
        results[name] = sampled / seconds
        print(f"{name:>14}: {sampled:5d} sampled + {tool:5d} tool tokens in {seconds:6.1f} s = "
              f"{sampled / seconds:6.1f} sampled tokens/s")
    print(f"ratio batched / one at a time: {results['batched'] / results['one at a time']:.2f}x")


if __name__ == "__main__":
    main()
