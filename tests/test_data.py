"""Loading users' data in each accepted shape, and a clear error for each unusable one."""

import gzip
import json

import pytest

from forgetless.lm.data import DataError, bundled_names, fingerprint_examples, load_examples


def write(tmp_path, *records, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_three_shapes_give_the_same_messages(tmp_path):
    expected = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    for record in (
        {"messages": expected},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"prompt": "Q", "response": "A"},
        {"prompt": "Q", "completion": "A"},
    ):
        (ex,) = load_examples(write(tmp_path, record))
        assert ex.messages == expected and ex.prompt_messages == expected[:1] and ex.response == "A"


def test_bundled_splits_load():
    assert {"mbpp-train", "gsm8k", "math-test", "arc_challenge-test"} <= set(bundled_names())
    mbpp = load_examples("mbpp-train")
    assert len(mbpp) == 374 and mbpp[0].id == "601" and "test_list" in mbpp[0].meta
    assert mbpp[0].messages[0]["role"] == "user" and "```python" in mbpp[0].messages[0]["content"]


@pytest.mark.parametrize("record, message", [
    ('{"messages": [', "d.jsonl:2: malformed JSON"),
    ({"text": "hi"}, "no 'messages', 'conversations' or 'prompt'\\+'response'"),
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "unknown role 'narrator'"),
    ({"prompt": "Q", "response": "   \n"}, "response is empty"),
    ({"messages": [{"role": "user", "content": "Q"}]}, "does not end with an assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "content is int"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_records_name_file_and_example(tmp_path, record, message):
    with pytest.raises(DataError, match=message):
        load_examples(write(tmp_path, {"prompt": "fine", "response": "ok"}, record))


def test_error_names_example_index_and_id(tmp_path):
    with pytest.raises(DataError, match=r"example 1 \(id 42\)"):
        load_examples(write(tmp_path, {"prompt": "a", "response": "b"}, {"id": 42, "prompt": "a", "response": ""}))


def test_empty_missing_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_examples(write(tmp_path))
    with pytest.raises(DataError, match="not a bundled split"):
        load_examples(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(str(bad))


def test_gzip_and_fingerprint(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"prompt": "Q", "response": "A"}) + "\n")
    a = load_examples(str(path))
    b = load_examples(write(tmp_path, {"prompt": "Q", "response": "A"}))
    c = load_examples(write(tmp_path, {"prompt": "Q", "response": "B"}, name="c.jsonl"))
    assert fingerprint_examples(a) == fingerprint_examples(b) != fingerprint_examples(c)


def test_hub_source_without_a_split_takes_train_else_the_only_split(monkeypatch):
    import datasets

    from forgetless.lm.data import load_records

    hub = {"only-test": {"test": [{"x": 1}]}, "both": {"train": [{"x": 2}], "test": [{"x": 3}]},
           "neither": {"a": [{"x": 4}], "b": [{"x": 5}]}}
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split=None: hub[name] if split is None else hub[name][split])
    assert load_records("hf:only-test")[0] == [{"x": 1}]
    assert load_records("hf:both")[0] == [{"x": 2}]
    assert load_records("hf:both:test")[0] == [{"x": 3}]
    with pytest.raises(DataError, match="no 'train' split: name one, hf:neither:<a|b>"):
        load_records("hf:neither")
