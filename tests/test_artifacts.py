"""The one artifact module: its file hash keeps the values that existing runs and caches were keyed with."""

from __future__ import annotations

from forgetless.lm import artifacts, codehash


def test_file_hash_values_are_pinned(tmp_path):
    # Digests computed outside forgetless (coreutils sha256sum); stamps and cache keys on disk hold these values.
    small = tmp_path / "small.txt"
    small.write_bytes(b"forgetless\n")
    full = "e7ba347112ac16b8024544d45f7e901626b402cea4908afc1f71647952fadeb5"
    assert artifacts.file_sha256(small) == full
    assert artifacts.file_sha256(small, 16) == full[:16] == artifacts.file_digest(small)
    assert codehash._file_digest(small, small.stat().st_mtime_ns) == full
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert artifacts.file_sha256(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    big = tmp_path / "big"  # more than one read chunk
    big.write_bytes(b"a" * 3_000_000)
    assert artifacts.file_sha256(big) == "2a152c894398719c0570f83fac34ac03a0f6e8e474b995c2403aa5434f7b9dd4"
    assert artifacts.file_digest(tmp_path / "absent") is None


def test_settings_digests_are_pinned():
    from forgetless.eval.stage import _cache_key

    # The eval cache's entry names (their values from before the key was built once, and sha256sum of the JSON).
    parts = {"model": "m:1", "task": "gsm8k", "task_definition": "3789a298bffec93f", "items": "91d5305004170465",
             "decoding": {"max_new_tokens": 7, "greedy": True, "temperature": 1.0, "top_p": 1.0, "seed": 0}}
    assert _cache_key(parts) == "f7412933ee993d8cd4ff4ae3"
    assert _cache_key({**parts, "backend": "vllm"}) == "9d8624bffc1dcb76c3a74580"
    assert artifacts.json_digest([{"b": "x", "a": 1}, None], 12, sort_keys=True) == "fc15114b10a6"


def test_one_manifest_writer_keeps_each_stage_shape(tmp_path):
    artifacts.write_manifest(tmp_path / "keyed", {"stage": "score"}, {"model": "m"}, tau=2.0)
    keyed = artifacts.read_json(tmp_path / "keyed" / artifacts.MANIFEST)
    assert list(keyed) == ["key", "config", "tau", "versions"] and "python" in keyed["versions"]
    artifacts.write_manifest(tmp_path / "retention", stage="retention", tasks=["mc:piqa"])
    assert list(artifacts.read_json(tmp_path / "retention" / artifacts.MANIFEST)) == ["stage", "tasks", "versions"]
    artifacts.write_manifest(tmp_path / "train", stage="train", versions={"torch": "x"}, created="now")
    assert artifacts.read_json(tmp_path / "train" / artifacts.MANIFEST) == {
        "stage": "train", "versions": {"torch": "x"}, "created": "now"}


def test_write_dir_renames_a_filled_folder_and_keeps_one_already_there(tmp_path):
    target = tmp_path / "cache" / "entry"
    assert artifacts.write_dir(target, lambda tmp: (tmp / "a.json").write_text("1"))
    assert (target / "a.json").read_text() == "1"
    assert not artifacts.write_dir(target, lambda tmp: (tmp / "a.json").write_text("2"))  # another process first
    assert (target / "a.json").read_text() == "1"

    def fail(tmp):
        (tmp / "half").write_text("")
        raise RuntimeError("killed while filling")

    try:
        artifacts.write_dir(tmp_path / "other", fail)
    except RuntimeError:
        pass
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["entry"]
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []


def test_verdict_items_keep_their_bytes(tmp_path):
    import hashlib

    from forgetless.report.verdicts import write_items

    # The bytes (gzip header included) that the writer gave before it went through artifacts.write_atomic.
    path = write_items(tmp_path / "items.jsonl.gz", [{"b": 1, "a": "é"}, {"x": [1, 2]}])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (
        "18f3bb5915c01bf2fa976be2b172e769bed2ed1afeef31788ab15c5e4f4b5eca")
    assert [p.name for p in tmp_path.iterdir()] == ["items.jsonl.gz"]
