"""Caches and resume keys follow the code that reads and scores answers, the forgetless version and the hub commit:
an unchanged rerun reuses, an edit to a task module recomputes (the edit simulated by changing one file's digest)."""

from __future__ import annotations

import json

import pytest

from forgetless.eval.stage import EvalConfig, evaluate_tasks
from forgetless.eval.tasks import get_task
from forgetless.lm import codehash, stamps


@pytest.fixture
def edited(monkeypatch):
    """``edited("gsm8k.py")``: from now on that file reads as changed (its digest differs), as after an edit."""
    real = codehash._file_digest

    def edit(filename: str) -> None:
        monkeypatch.setattr(codehash, "_file_digest",
                            lambda path, mtime: real(path, mtime) + ("-edited" if path.name == filename else ""))
    return edit


def test_a_task_is_keyed_on_its_module_and_the_helpers_it_imports_not_on_other_tasks():
    closure = codehash.code_closure(get_task("gsm8k").code_modules(), ("forgetless.eval",))
    assert sorted(closure) == ["forgetless.eval.tasks", "forgetless.eval.tasks.gsm8k"]
    # mbpp-test reads with the sandbox and the offline MBPP loader: both are keyed.
    closure = codehash.code_closure(get_task("mbpp-test").code_modules(), ("forgetless.eval",))
    assert {"forgetless.eval.sandbox", "forgetless.eval.tasks.mbpp_offline",
            "forgetless.eval.tasks.paper"} <= set(closure)


def test_an_edit_to_the_answer_reading_module_changes_the_task_hash(edited):
    before = {name: get_task(name).definition_hash() for name in ("gsm8k", "math", "ifeval")}
    assert before == {name: get_task(name).definition_hash() for name in before}  # unchanged code, same key
    edited("gsm8k.py")  # e.g. a fixed NUMBER regex: the lambdas' own lines are unchanged
    after = {name: get_task(name).definition_hash() for name in before}
    assert after["gsm8k"] != before["gsm8k"] and after["math"] == before["math"] and after["ifeval"] == before["ifeval"]
    edited("punkt_offline.py")  # a helper the IFEval task imports
    assert get_task("ifeval").definition_hash() != before["ifeval"]


def test_ifeval_hash_covers_the_verifier_version(monkeypatch):
    from importlib import metadata

    before = get_task("ifeval").definition_hash()
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda p: "9.9" if p == "if-verifiable" else real(p))
    assert get_task("ifeval").definition_hash() != before


def test_base_cache_reused_unchanged_and_recomputed_after_an_edit(tmp_path, edited):
    calls = []

    def fake_generate(prompts, decoding):
        calls.append(len(prompts))
        return ["#### 1"] * len(prompts)

    cfg = EvalConfig(output_dir=str(tmp_path), tasks=("gsm8k",), limit=3, cache_dir=str(tmp_path / "cache"),
                     progress=False)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        evaluate_tasks(["gsm8k"], cfg, fake_generate, tmp_path / run, fingerprint="model-x")
    assert calls == [3]  # the unchanged rerun came from the cache
    assert json.loads((tmp_path / "b" / "gsm8k.json").read_text())["settings"]["source"] == "cache"
    edited("gsm8k.py")
    (tmp_path / "c").mkdir()
    evaluate_tasks(["gsm8k"], cfg, fake_generate, tmp_path / "c", fingerprint="model-x")
    assert calls == [3, 3]  # the edited reader is not served the old scores
    assert json.loads((tmp_path / "c" / "gsm8k.json").read_text())["settings"]["source"] == "generated"


def test_retention_code_key_follows_the_measures_and_their_readers(edited):
    from forgetless.retention.measures import code_key

    before = code_key()
    assert code_key() == before
    edited("behaviour.py")
    after_behaviour = code_key()
    edited("gsm8k.py")  # behaviour reads GSM8K answers with the task's helpers
    assert len({before, after_behaviour, code_key()}) == 3


def test_measure_stages_are_stamped_with_their_code(tmp_path, edited):
    from forgetless.run import stage_code

    cfg = EvalConfig(output_dir=str(tmp_path), tasks=("gsm8k", "ifeval"))
    before = stage_code(cfg)
    assert set(before) == {"gsm8k", "ifeval"}
    edited("ifeval.py")
    after = stage_code(cfg)
    assert after["gsm8k"] == before["gsm8k"] and after["ifeval"] != before["ifeval"]


def test_stamps_hold_the_forgetless_version_and_a_new_version_reruns(tmp_path, monkeypatch):
    ran = []
    stamps.run_once(tmp_path, {"a": 1}, lambda: ran.append(1), "stage")
    stamp = json.loads((tmp_path / stamps.STAMP).read_text())
    from forgetless import __version__

    assert stamp == {"a": 1, "forgetless_version": __version__}
    stamps.run_once(tmp_path, {"a": 1}, lambda: ran.append(2), "stage")
    assert ran == [1]  # same settings, same version: skipped
    monkeypatch.setattr(stamps, "__version__", "99.0")
    stamps.run_once(tmp_path, {"a": 1}, lambda: ran.append(3), "stage")
    assert ran == [1, 3]


def test_hub_revision_resolves_to_a_commit(monkeypatch):
    import huggingface_hub

    from forgetless.lm import modeling

    commit = "0123456789abcdef0123456789abcdef01234567"
    modeling.hub_commit.cache_clear()
    assert modeling.model_fingerprint("org/model", commit) == f"org/model@{commit}"  # a commit is already one
    # Offline (the tests' HF_HUB_OFFLINE=1): the local snapshot's commit.
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda name, revision, local_files_only: f"/cache/models--org--model/snapshots/{'a' * 40}")
    assert modeling.model_fingerprint("org/model") == f"org/model@{'a' * 40}"

    # Reachable: the hub's answer for the moving ref.
    class Api:
        def model_info(self, name, revision, timeout):
            return type("Info", (), {"sha": "b" * 40})()

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    modeling.hub_commit.cache_clear()
    assert modeling.model_fingerprint("org/model", "main") == f"org/model@{'b' * 40}"

    # Neither: the revision, marked unresolved.
    def missing(*args, **kwargs):
        raise OSError("not cached")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    modeling.hub_commit.cache_clear()
    assert modeling.model_fingerprint("org/other", "v1") == "org/other@v1?"
    modeling.hub_commit.cache_clear()
