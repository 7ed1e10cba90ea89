"""Answer extraction on the shipped data's real formats, and each metric on hand-made cases."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from conftest import SRC
from forgetless.eval.tasks import Item, get_task, select_items
from forgetless.eval.tasks.arc import extract_letter, load_arc
from forgetless.eval.tasks.custom import load_task_file, score_metric
from forgetless.eval.tasks.gsm8k import extract_answer as gsm8k_extract
from forgetless.eval.tasks.gsm8k import gold_answer, load_gsm8k, numbers_equal
from forgetless.eval.tasks.math import answers_equivalent, last_boxed, load_math
from forgetless.eval.tasks.math import extract_answer as math_extract
from forgetless.eval.tasks.mbpp import extract_code, load_mbpp
from forgetless.eval.tasks.sql import execution_match, extract_sql, sql_task


def test_a_task_module_imports_without_torch():
    """Reading and scoring answers needs no model: the eval package loads its stage (and torch) only when asked."""
    code = "import sys, forgetless.eval.tasks.gsm8k; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": SRC}, check=True)


# --- MBPP -----------------------------------------------------------------------------------

def test_extract_code_formats():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef f():\n    return 2") == "def f():\n    return 2"  # cut off mid-block
    assert extract_code("def g(): return 3") == "def g(): return 3"


def test_mbpp_gold_responses_pass_and_wrong_code_fails():
    task = get_task("mbpp")
    items = task.load()[:4]
    golds = [it.record["conversations"][1]["value"] for it in items]  # the paper's ```python blocks
    wrong = "```python\ndef nothing():\n    pass\n```"
    scored = task.evaluate(golds + [wrong], items + items[:1])
    assert [s.score for s in scored] == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert scored[-1].detail == "failed"


def test_mbpp_items_have_stable_ids_and_paper_prompt():
    items = load_mbpp()
    assert len(items) == 90 and items[0].id == "mbpp-511"
    assert items[0].messages[0]["content"].startswith("Please refer the given test cases")


# --- GSM8K ----------------------------------------------------------------------------------

# Shipped problems solved by hand: (index, gold, a right answer written unlike the gold, a wrong one).
GSM8K_SOLVED = [
    (0, 5.0, "10 cans at $.50 each: he spends $5.00", "#### 5.5"),  # 80 / 8 = 10 cans, 10 x $0.5
    (18, -47.0, "N = -51, so the largest is -47.", "The largest is 47."),  # 3N + 6 = -147
    (65, 132000.0, "3*24000 + 4*8000 + 7*4000 = 132000 pounds", "#### 128,000"),  # red 3 x 8000 each
    (322, 86400.0, "32 m^3 x 2700 = 86400.0 kg", "#### 8640"),  # 2 x 2 x 8 = 32 cubic metres
]


def test_gsm8k_shipped_golds_and_answers_written_otherwise():
    items = load_gsm8k()
    assert len(items) == 747 and len({it.id for it in items}) == 747
    task = get_task("gsm8k")
    for index, gold, right, wrong in GSM8K_SOLVED:
        assert items[index].gold == gold, index
        scored = task.evaluate([right, wrong], [items[index]] * 2)
        assert [s.score for s in scored] == [1.0, 0.0], index


@pytest.mark.parametrize("output,expected", [
    ("so he pays 10 x .5\n#### 5", 5.0),
    ("#### 1,234", 1234.0),
    ("The total is $18.50.", 18.5),
    ("She lost 3 then -4", -4.0),
    ("#### $7", 7.0),
    ("no idea", None),
])
def test_gsm8k_extract_answer(output, expected):
    assert gsm8k_extract(output) == expected


def test_gsm8k_metric():
    assert numbers_equal(5.0, 5.0) == 1.0
    assert numbers_equal(5.0000000001, 5.0) == 1.0
    assert numbers_equal(5.1, 5.0) == 0.0
    assert numbers_equal(None, 5.0) == 0.0
    assert gold_answer("blah #### 1,000") == 1000.0


# --- MATH -----------------------------------------------------------------------------------

def test_last_boxed_balances_braces():
    assert last_boxed(r"so \boxed{\frac{1}{2}} and finally \boxed{\sqrt{3}}.") == r"\sqrt{3}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unclosed") is None


# Shipped golds (the solution's last box) with an equal answer written otherwise and a different one.
MATH_SOLVED = [
    (0, "3600", r"3.6 \times 10^3", "3601"),
    (1, r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{2}"),
    (2, r"\frac{\sqrt6}3", r"\sqrt{\frac{2}{3}}", r"\frac{\sqrt{6}}{2}"),
    (11, r"\frac{1}{256}", "0.00390625", "0.0039"),
    (19, r"\$76.80", "76.8", "76.08"),
    (26, "x = -1", "-1", "1"),
    (27, "21a^5 - 7a^4 - 16a^2 + 32a", "32a - 16a^2 - 7a^4 + 21a^5", "21a^5 - 7a^4 - 16a^2 + 31a"),
]


def test_math_shipped_golds_judged_by_math_verify():
    items, task = load_math(), get_task("math")
    for index, gold, right, wrong in MATH_SOLVED:
        assert items[index].gold == gold, index
        assert right.replace(" ", "") != gold.replace(" ", "")  # so the equal-strings shortcut cannot decide
        outputs = [f"The answer is $\\boxed{{{right}}}$.", f"So $\\boxed{{{wrong}}}$"]
        assert [s.score for s in task.evaluate(outputs, [items[index]] * 2)] == [1.0, 0.0], index


@pytest.mark.parametrize("output,gold,expected", [
    (r"The answer is $\boxed{\frac{1}{2}}$", "0.5", 1.0),
    ("3600$", "3600", 1.0),  # the prompt ends with 'Answer: $'
    (r"\boxed{14\pi}", r"14 \pi", 1.0),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (r"\boxed{3601}", "3600", 0.0),
    ("I do not know", "3600", 0.0),
])
def test_math_equivalence(output, gold, expected):
    assert answers_equivalent(math_extract(output), gold) == expected


# --- ARC ------------------------------------------------------------------------------------

@pytest.mark.parametrize("output,expected", [
    ("C", "C"),
    ("B. Planetary years will become longer", "B"),
    ("The answer is (D).", "D"),
    ("answer: a", "A"),
    ("(A) rocks", "A"),
    ("I think it is C because", "C"),
    ("none of these", None),
])
def test_extract_letter(output, expected):
    assert extract_letter(output, ["A", "B", "C", "D"]) == expected


def test_extract_letter_numeric_labels_and_prompt_lists_choices():
    assert extract_letter("The answer is 3", ["1", "2", "3", "4"]) == "3"
    items = load_arc()
    assert len(items) == 1172 and items[0].id == "Mercury_7175875" and items[0].gold == "C"
    assert "C. Planetary days will become shorter." in items[0].messages[0]["content"]


# --- SQL ------------------------------------------------------------------------------------

@pytest.fixture
def sql_fixture(tmp_path):
    db_dir = tmp_path / "dbs" / "shop"
    db_dir.mkdir(parents=True)
    db = db_dir / "shop.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL);"
                       "INSERT INTO items VALUES (1, 'pen', 1.5), (2, 'book', 12.0), (3, 'bag', 30.0);")
    conn.commit()
    conn.close()
    data = tmp_path / "dev.json"
    data.write_text(json.dumps([
        {"question_id": "q1", "db_id": "shop", "question": "Names of items over 10?", "evidence": "",
         "SQL": "SELECT name FROM items WHERE price > 10"},
        {"question_id": "q2", "db_id": "shop", "question": "How many items?", "SQL": "SELECT COUNT(*) FROM items"},
    ]))
    return tmp_path, data, db


def test_sql_execution_accuracy(sql_fixture):
    root, data, db = sql_fixture
    task = sql_task(str(data), str(root / "dbs"))
    items = task.load()
    assert [it.id for it in items] == ["q1", "q2"]
    assert "CREATE TABLE items" in items[0].messages[0]["content"]
    outputs = ["```sql\nSELECT name FROM items WHERE price >= 12 ORDER BY name DESC\n```",  # same rows, other order
               "SELECT COUNT(id) - 1 FROM items;"]
    scored = task.evaluate(outputs, items)
    assert [s.score for s in scored] == [1.0, 0.0]
    assert [s.detail for s in scored] == ["match", "different rows"]


def test_sql_cannot_write_or_hang(sql_fixture):
    root, data, db = sql_fixture
    item = sql_task(str(data), str(root / "dbs")).load()[1]
    for hostile in ["DROP TABLE items", "DELETE FROM items", f"ATTACH DATABASE '{root}/x.db' AS x",
                    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r"]:
        score, why = execution_match(hostile, item, timeout_s=0.5)
        assert score == 0.0 and why.startswith("error"), hostile
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM items").fetchone() == (3,)
    assert not (root / "x.db").exists()


def test_extract_sql():
    assert extract_sql("```sql\nSELECT 1\n```") == "SELECT 1"
    assert extract_sql("The query is: SELECT a FROM t; that's it") == "SELECT a FROM t"


# --- user-defined tasks ---------------------------------------------------------------------

def test_custom_yaml_task(tmp_path):
    (tmp_path / "caps.jsonl").write_text('{"id": "fr", "country": "France", "capital": "Paris"}\n'
                                         '{"id": "it", "country": "Italy", "capital": "Rome"}\n')
    (tmp_path / "caps.yaml").write_text('name: capitals\ndata: caps.jsonl\nprompt: "Capital of {country}?"\n'
                                        'gold: capital\nmetric: exact_match\nextract: '
                                        '"(?i)answer:\\\\s*(\\\\w+)"\nid: id\n')
    task = get_task(str(tmp_path / "caps.yaml"))
    items = task.load()
    assert [it.id for it in items] == ["fr", "it"] and items[0].messages[0]["content"] == "Capital of France?"
    scored = task.evaluate(["Answer: paris.", "Answer: Milan"], items)
    assert [s.score for s in scored] == [1.0, 0.0] and scored[0].extracted == "paris"


def test_custom_sql_definition_and_bad_definitions(tmp_path, sql_fixture):
    root, data, _ = sql_fixture
    (tmp_path / "bird.json").write_text(json.dumps({"name": "bird_mini", "data": str(data),
                                                    "db_root": str(root / "dbs"), "metric": "sql"}))
    task = load_task_file(tmp_path / "bird.json")
    assert task.name == "bird_mini" and task.metric == "execution_accuracy" and len(task.load()) == 2
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "data": "d", "metric": "bleu", "gold": "g"}))
    with pytest.raises(ValueError, match="metric"):
        load_task_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("sql")


@pytest.mark.parametrize("metric,pred,gold,expected", [
    ("exact_match", " Paris. ", "paris", 1.0), ("exact_match", "Paris, France", "paris", 0.0),
    ("contains", "It is Paris, France", "paris", 1.0), ("numeric", "about 1,000", "1000", 1.0),
    ("numeric", "12", 13, 0.0), ("choice", "b", "B", 1.0), ("math_verify", r"\frac{1}{4}", "0.25", 1.0),
    ("math_verify", r"\frac{1}{3}", "0.25", 0.0),
    ("exact_match", None, "x", 0.0),
])
def test_custom_metrics(metric, pred, gold, expected):
    assert score_metric(metric, pred, gold) == expected


def test_select_items_first_or_seeded():
    items = [Item(id=str(i), messages=[], gold=i) for i in range(10)]
    assert [it.id for it in select_items(items, 3, None)] == ["0", "1", "2"]
    a, b = select_items(items, 4, 7), select_items(items, 4, 7)
    assert [it.id for it in a] == [it.id for it in b] and len(a) == 4
    assert [int(it.id) for it in a] == sorted(int(it.id) for it in a)  # file order kept
    assert select_items(items, None, 0) == items


def test_definition_hash_changes_with_definition(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"q": "1+1", "a": "2"}\n')
    base = {"name": "t", "data": str(tmp_path / "d.jsonl"), "prompt": "{q}", "gold": "a", "metric": "numeric"}
    from forgetless.eval.tasks.custom import task_from_definition

    h1 = task_from_definition(base).definition_hash()
    assert h1 == task_from_definition(dict(base)).definition_hash()
    assert h1 != task_from_definition({**base, "prompt": "Compute {q}"}).definition_hash()
