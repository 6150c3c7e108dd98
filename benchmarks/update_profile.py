"""Where the update's time goes: one real batch's forward and backward passes, profiled by kind of operation.

    python benchmarks/update_profile.py [--model smollm2-135m] [--questions 2] [--dtypes fp32 bf16]

The batch is what the default run trains on at a step: `--questions` training questions x G = 5 trajectories,
sampled through the tool loop at temperature 0.7, ordered shortest first. The passes are those of `train.update`:
the shared prompt prefix encoded once with gradients, micro-batches of 4 rows through `rollout.response_logprobs`
(output layer only at sampled positions), backward through each, then through the prefix once. No optimizer step, so
every repeat sees the same weights.

For each dtype (fp32; bf16 under autocast, as `--dtype bf16` runs it), it prints the wall time of one pass (the
median of --repeats) and, from torch.profiler, the time in

    matrix products   aten::mm / addmm / bmm, with their FLOPs and the rate they ran at
    attention         scaled_dot_product_attention's kernels, forward and backward
    casts and copies  aten::copy_ / _to_copy (autocast's bf16 copies of the fp32 weights among them)
    the rest          elementwise work (RMSNorm, rotary, SiLU, the loss), allocation, autograd

(operator time, from a second profiled pass without FLOP counting; the profiler's own cost makes it somewhat longer
than the pass) and, for scale, the rate of a plain product of the MLP's shape (2048 x 576 by 576 x 1536) in that
dtype. A pass whose products run near that rate is bound by their arithmetic: only fewer FLOPs (or faster ones) make
it shorter. It is a script, not a test: nothing here is asserted.
"""
import argparse
import contextlib
import pathlib
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import models  # noqa: E402
import rollout  # noqa: E402
import tools  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
KINDS = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
         "attention": ("aten::_scaled_dot_product",),
         "casts and copies": ("aten::copy_", "aten::_to_copy")}


def kind_of(name: str) -> str:
    return next((kind for kind, prefixes in KINDS.items() if name.startswith(prefixes)), "the rest")


def update_pass(model, batch: rollout.TokenBatch, autocast_dtype, micro_batch_size: int = 4) -> None:
    """The forward and backward passes train.update runs over one mini-batch (here: the whole batch)."""
    def autocast():
        return (contextlib.nullcontext() if autocast_dtype is None
                else torch.autocast(model.device.type, dtype=autocast_dtype))
    with autocast():
        prefix = rollout.SharedPrefix(model, batch)
    for start in range(0, len(batch), micro_batch_size):
        micro = batch[start:start + micro_batch_size].to(model.device)
        with autocast():
            logprobs, _ = rollout.response_logprobs(model, micro, 0.7, with_entropy=True, prefix=prefix.cache)
        (logprobs.float().sum() / max(1, int(micro.loss_mask.sum()))).backward()  # a loss of the same graph
    prefix.backward()
    model.zero_grad(set_to_none=True)


def plain_product_rate(dtype: torch.dtype, device: str) -> float:
    """GFLOP/s of a 2048 x 576 by 576 x 1536 product (the MLP's up-projection over 2048 tokens)."""
    a = torch.randn(2048, 576, dtype=dtype, device=device)
    b = torch.randn(576, 1536, dtype=dtype, device=device)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(30):
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * 2048 * 576 * 1536 / statistics.median(times) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.EMBEDDED, help="a --model value (models.py)")
    parser.add_argument("--questions", type=int, default=2, help="training questions (x G = 5 trajectories)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="fp32 runs plain; bf16 runs under autocast over fp32 weights, as train.py --dtype bf16")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per dtype (the median is printed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = models.load_model(args.model, device=args.device, dtype=torch.float32)
    registry = {"search": tools.search_tool(tools.BM25Search(data.wiki_corpus()), passage_chars=200)}
    examples = data.load_task("wiki", "train")[:args.questions]
    with torch.no_grad():
        trajectories = rollout.rollout(model, tokenizer, examples, registry,
                                       rollout.RolloutConfig(group_size=5, temperature=0.7))
    trajectories.sort(key=lambda t: len(t.prompt_ids) + len(t.response_ids))
    batch = rollout.collate(trajectories, tokenizer.pad_token_id)
    print(f"{args.model} on {args.device}, torch threads {torch.get_num_threads()}: {len(batch)} trajectories, "
          f"{int(batch.attention_mask.sum())} tokens ({batch.prefix_length} of them the shared prefix, "
          f"{int(batch.loss_mask.sum())} sampled)")
    model.train()
    for name in args.dtypes:
        dtype = DTYPES[name]
        update_pass(model, batch, dtype)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            update_pass(model, batch, dtype)
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as counted:  # FLOPs: slows other ops
            update_pass(model, batch, dtype)
        flops = sum(event.flops for event in counted.key_averages() if kind_of(event.key) == "matrix products")
        with profile(activities=[ProfilerActivity.CPU]) as profiler:  # times
            update_pass(model, batch, dtype)
        seconds, rest = {}, {}
        for event in profiler.key_averages():
            kind = kind_of(event.key)
            seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
            if kind == "the rest":
                rest[event.key] = event.self_cpu_time_total / 1e6
        total = sum(seconds.values())
        print(f"\n{name}: one pass {statistics.median(times):.2f} s (median of {args.repeats}); profiled "
              f"{total:.2f} s of operator time:")
        for kind in (*KINDS, "the rest"):
            share = seconds.get(kind, 0.0)
            rate = f", {flops / 1e9:.0f} GFLOP at {flops / share / 1e9:.0f} GFLOP/s" if \
                kind == "matrix products" and share else ""
            largest = ", ".join(f"{key} {rest[key]:.2f} s" for key in sorted(rest, key=rest.get)[::-1][:4])
            detail = rate or (f" (largest: {largest})" if kind == "the rest" else "")
            print(f"  {kind:>16}: {share:6.2f} s ({share / total:4.0%}){detail}")
        print(f"  a plain {name} product of the MLP's shape runs at "
              f"{plain_product_rate(dtype or torch.float32, args.device):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
