"""data.py: the real corpus and tasks, and the Search-R1 jsonl loaders with their errors."""

import json

import pytest

import data
from tools import normalize_answer


def test_corpus_is_the_ten_thousand_summaries(corpus):
    assert len(corpus) == 10033
    titles = {d.title for d in corpus}
    assert {"The Nutcracker", "Machu Picchu", "Neon"} <= titles
    assert all(d.text for d in corpus)


@pytest.mark.parametrize("split", ["train", "test"])
def test_wiki_questions_have_their_answer_in_one_document(corpus, split):
    by_title = {d.title: d.text for d in corpus}
    questions = data.load_task("wiki", split)
    assert len(questions) > (5000 if split == "train" else 500)
    for example in questions:
        title = example.id.removeprefix("wiki:")
        assert example.answers[0] == title
        assert normalize_answer(example.answers[-1]) in normalize_answer(by_title[title])
        description = example.question.split('"')[1]
        assert normalize_answer(example.answers[-1]) not in normalize_answer(description)


def test_wiki_split_is_fixed_and_disjoint():
    train = {e.id for e in data.load_task("wiki", "train")}
    test = {e.id for e in data.load_task("wiki", "test")}
    assert not train & test
    assert data.load_task("wiki", "test") == data.load_task("wiki", "test")
    assert 0.07 < len(test) / (len(train) + len(test)) < 0.13


def test_fanoutqa_subquestions_are_answerable_from_the_corpus(corpus):
    by_title = {d.title: d.text for d in corpus}
    questions = data.load_task("fanoutqa", "test")
    assert len(questions) == 73  # the count README reports
    for example in questions:
        assert normalize_answer(example.answers[0]) in normalize_answer(by_title[example.meta["evidence"]])
    with pytest.raises(data.DataError, match="evaluation only"):
        data.load_task("fanoutqa", "train")


def test_longform_references_come_from_the_summary(corpus):
    by_title = {d.title: d.text for d in corpus}
    questions = data.load_task("wiki-long", "test")
    assert len(questions) > 500
    for example in questions[:50]:
        title = example.id.removeprefix("wiki-long:")
        assert example.question == f"Describe {title} in two or three sentences."
        assert by_title[title].startswith(example.reference)


def test_unknown_task_and_split_are_named():
    with pytest.raises(data.DataError, match="unknown task 'nq'"):
        data.load_task("nq")
    with pytest.raises(data.DataError, match="unknown split 'dev'"):
        data.load_task("wiki", "dev")


# ---- Search-R1 / FlashRAG jsonl ----
def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_search_r1_questions_load(tmp_path):
    path = write_lines(tmp_path / "nq_test.jsonl", [
        json.dumps({"id": "test_0", "question": "who got the first nobel prize in physics?",
                    "golden_answers": ["Wilhelm Conrad Röntgen"], "data_source": "nq"}),
        "",
        json.dumps({"question": "how many moons does mars have", "golden_answers": [2, "two"]}),
    ])
    examples = data.load_task(str(path))
    assert [e.id for e in examples] == ["test_0", "nq_test:3"]
    assert examples[1].answers == ("2", "two") and examples[1].source == "nq_test"


def test_search_r1_corpus_loads(tmp_path):
    path = write_lines(tmp_path / "wiki.jsonl", [
        json.dumps({"id": "0", "contents": '"Aaron"\nAaron is a prophet, high priest, and the brother of Moses.'}),
        json.dumps({"id": 1, "contents": "Title only"}),
    ])
    documents = data.load_corpus(str(path))
    assert documents[0] == data.Document("0", "Aaron", "Aaron is a prophet, high priest, and the brother of Moses.")
    assert documents[1] == data.Document("1", "Title only", "")


@pytest.mark.parametrize("line, message", [
    ('{"question": "q"', ":2: not valid JSON"),
    ('{"question": "q", "golden_answers": [' + "9" * 5000 + "]}", ":2: not valid JSON (an integer of over 4300 digits"),
    ('["q", ["a"]]', ":2: expected a JSON object, got list"),
    ('{"golden_answers": ["a"]}', ":2: missing field 'question'"),
    ('{"question": "q"}', ":2: missing field 'golden_answers'"),
    ('{"question": "q", "golden_answers": "a"}', ":2: field 'golden_answers' must be list, got str"),
    ('{"question": 5, "golden_answers": ["a"]}', ":2: field 'question' must be str, got int"),
    ('{"question": "  ", "golden_answers": ["a"]}', ":2: field 'question' is empty"),
    ('{"question": "q", "golden_answers": []}', ":2: field 'golden_answers' must be a non-empty list"),
    ('{"question": "q", "golden_answers": [null]}', ":2: field 'golden_answers' must be a non-empty list"),
    ('{"question": "Who sang \\ud83d?", "golden_answers": ["a"]}', ":2: field 'question' holds a lone surrogate"),
])
def test_bad_question_rows_name_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "q.jsonl", [json.dumps({"question": "ok", "golden_answers": ["a"]}), line])
    with pytest.raises(data.DataError) as error:
        data.read_questions_jsonl(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


@pytest.mark.parametrize("line, message", [
    ('{"contents": "T\\ntext"}', ":1: missing field 'id'"),
    ('{"id": "1"}', ":1: missing field 'contents'"),
    ('{"id": "1", "contents": ["T"]}', ":1: field 'contents' must be str, got list"),
])
def test_bad_corpus_rows_name_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "c.jsonl", [line])
    with pytest.raises(data.DataError, match=message):
        data.read_corpus_jsonl(path)


def test_duplicate_ids_are_refused(tmp_path):
    rows = [json.dumps({"id": "train_0", "question": f"q{i}?", "golden_answers": ["a"]}) for i in range(2)]
    path = write_lines(tmp_path / "q.jsonl", rows)
    with pytest.raises(data.DataError, match=r"q.jsonl:2: id 'train_0' was already used on line 1"):
        data.read_questions_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.load_task(str(tmp_path / "absent.jsonl"))
    with pytest.raises(data.DataError, match="no questions"):
        data.read_questions_jsonl(write_lines(tmp_path / "empty.jsonl", [""]))


def test_a_file_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"question": "ok?", "golden_answers": ["a"]}).encode() + b"\n"
                     + '{"question": "café?", "golden_answers": ["a"]}'.encode("latin-1") + b"\n")
    with pytest.raises(data.DataError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9, the line's byte 18\)"):
        data.read_questions_jsonl(path)


def test_a_line_cut_short_points_at_its_end(tmp_path):
    line = json.dumps({"question": "q?", "golden_answers": ["a"]})[:-1]  # the closing brace lost
    path = write_lines(tmp_path / "q.jsonl", [json.dumps({"question": "ok?", "golden_answers": ["a"]}), line])
    with pytest.raises(data.DataError) as error:
        data.read_questions_jsonl(path)
    assert f":2: not valid JSON (Expecting ',' delimiter: column {len(line) + 1}; the line ends before the JSON " \
           f"does: is it cut short?)" in str(error.value)
    path = write_lines(tmp_path / "r.jsonl", ['{"question": "q?" "golden_answers": ["a"]}'])
    with pytest.raises(data.DataError, match=r"r.jsonl:1: not valid JSON \(Expecting ',' delimiter: column 19\)$"):
        data.read_questions_jsonl(path)


def test_a_byte_order_mark_and_windows_line_ends_are_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "q?", "golden_answers": ["a"]}).encode() + b"\r\n")
    assert data.read_questions_jsonl(path)[0].question == "q?"
