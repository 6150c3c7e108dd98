"""prs_adapters.compute_score as verl calls it: README's config line, the file loaded by its path the way verl's
`load_extern_object` loads it (spec_from_file_location under a fresh module name, not in sys.modules, its folder
not on sys.path), `reward_kwargs` bound as verl binds them, and the call its reward loop's naive manager makes
(keyword arguments, the decoded multi-turn response, the extra_info it assembles, from worker threads)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import models

ROOT = Path(__file__).resolve().parent.parent

VERL_WORKER = r'''
import functools, importlib.util, json, os, sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

path, name, responses, reward_kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
# verl/utils/import_utils.py load_extern_object: a module made from the file, never registered, sys.path untouched
spec = importlib.util.spec_from_file_location(f"custom_module_{hash(os.path.abspath(path))}", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
raw_fn = getattr(module, name)

def _call_with_kwargs(raw_fn, extra_kwargs, *args, **kwargs):  # verl/trainer/ppo/reward.py: config values win
    return raw_fn(*args, **{**kwargs, **extra_kwargs})

compute_score = functools.partial(_call_with_kwargs, raw_fn, reward_kwargs)

def one(solution_str):  # experimental/reward_loop/reward_manager/naive.py
    extra_info = {"index": 0, "split": "train", "raw_prompt": [{"role": "user", "content": "Longest river?"}],
                  "turn_scores": [], "tool_rewards": [], "num_turns": np.int64(4), "rollout_reward_scores": {}}
    return compute_score(data_source="searchR1_nq", solution_str=solution_str,
                         ground_truth={"target": np.array(["Nile", "Nile River"], dtype=object)},
                         extra_info=extra_info)

with ThreadPoolExecutor(4) as pool:  # a plain function runs in executor threads
    results = list(pool.map(one, responses))
print(json.dumps(results))
'''


def readme_config() -> tuple[str, str]:
    match = re.search(r"custom_reward_function\.path=(\S+) custom_reward_function\.name=(\w+)",
                      (ROOT / "README.md").read_text())
    assert match, "README gives verl's config line"
    return match.group(1), match.group(2)


def multi_turn_response(answer: str, tokenizer) -> str:
    """A Qwen-template multi-turn response as verl decodes it: the tool turn's role header stays, special tokens go."""
    rendered = ('<think>Look it up.</think>\n<tool_call>\n{"name": "search", "arguments": {"query": "longest river"}}'
                "\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nDoc 1 (Title: Nile) The Nile is the "
                "longest river.\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
                f"<answer>{answer}</answer><|im_end|>")
    return tokenizer.decode(tokenizer(rendered, add_special_tokens=False).input_ids, skip_special_tokens=True)


def test_compute_score_runs_in_verl_as_readme_configures_it(tmp_path):
    path, name = readme_config()
    assert name == "compute_score" and Path(path).name == "prs_adapters.py"
    tokenizer = models.load_tokenizer(models.TINY)
    responses = [multi_turn_response("Nile", tokenizer), multi_turn_response("Amazon", tokenizer),
                 "<answer>Nile</answer>"]
    # from another folder, with nothing of this project on sys.path: prs_adapters.py finds prs.py and tools.py
    # beside it
    out = subprocess.run([sys.executable, "-c", VERL_WORKER, str(ROOT / path), name, json.dumps(responses),
                          json.dumps({"total_steps": 10, "step": 9})],
                         cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    # every sample returns the same keys in the same order (verl takes the first sample's keys for all), "score" in
    assert len({tuple(r) for r in results}) == 1 and "score" in results[0]
    assert results[0]["score"] == 1.0 and results[0]["exact_match"] == 1.0  # the tool turn's "user" header is fine
    assert results[1]["score"] < 0.5 and results[1]["format"] == 1.0
    assert results[2]["tool_call"] == 0.0 and results[2]["score"] < 0.1  # answered without searching
