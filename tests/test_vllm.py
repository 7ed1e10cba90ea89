"""The vLLM backend without vLLM: a fake ``vllm`` package in ``sys.modules`` whose ``LLM`` records what it is given
and answers with canned completions and prompt logprobs laid out as vLLM lays them out (``prompt_logprobs[0]`` is
None, entry ``i`` maps token ids to ``log p(token | tokens < i)``, the prompt's own token among them).

The last test, marked ``gpu``, runs the real vLLM against the HF path; it is skipped without CUDA and vllm.
"""

from __future__ import annotations

import json
import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import forgetless.lm.vllm_backend as vb
from conftest import build_model, build_tokenizer, conversations
from forgetless.lm.continuous import SlotDecoder
from forgetless.lm.decode import DecodingSettings, generate, stop_token_ids
from forgetless.lm.templates import encode_conversation, encode_prompt, render
from forgetless.lm.vllm_backend import BackendError, VllmEngine, prompt_nll, resolve_backend

QUESTION = [{"role": "user", "content": "Write a python function to add two numbers."}]
WITH_SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hello"}]


class FakeLLM:
    """Stands in for ``vllm.LLM``. ``reply(ids, j)`` gives sample j's token ids; ``logprob_fn(ids)`` the logprob
    of ``ids[i]`` given ``ids[:i]`` for i = 1..len-1. A decoy token sits beside each prompt token's entry."""

    made: list["FakeLLM"] = []
    reply = staticmethod(lambda ids, j: [7, 8])
    finish_reason = staticmethod(lambda ids, j: "stop")
    logprob_fn = staticmethod(lambda ids: [-1.0] * (len(ids) - 1))

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeLLM.made.append(self)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        self.calls.append({"prompts": prompts, "params": per_prompt, "lora_request": lora_request})
        return [self._output(p["prompt_token_ids"], sp) for p, sp in zip(prompts, per_prompt)]

    def _output(self, ids, sp):
        completions = [SimpleNamespace(token_ids=tuple(self.reply(ids, j)), finish_reason=self.finish_reason(ids, j))
                       for j in range(sp.n)]
        logprobs = None
        if sp.prompt_logprobs is not None:
            values = self.logprob_fn(ids)
            logprobs = [None] + [{ids[i]: SimpleNamespace(logprob=values[i - 1]),
                                  ids[i] + 1: SimpleNamespace(logprob=-0.01)}
                                 for i in range(1, len(ids))]
        return SimpleNamespace(prompt_token_ids=list(ids), outputs=completions, prompt_logprobs=logprobs)


class FakeSamplingParams:
    def __init__(self, n=1, prompt_logprobs=None, **kwargs):
        self.n, self.prompt_logprobs = n, prompt_logprobs
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    """A ``vllm`` package that imports (LLM, SamplingParams, inputs.TokensPrompt, lora.request.LoRARequest)."""
    root, inputs, lora, request = (types.ModuleType(n)
                                   for n in ("vllm", "vllm.inputs", "vllm.lora", "vllm.lora.request"))
    root.LLM, root.SamplingParams = FakeLLM, FakeSamplingParams
    inputs.TokensPrompt = lambda **kw: dict(kw)
    request.LoRARequest = lambda name, int_id, path: SimpleNamespace(name=name, int_id=int_id, path=path)
    for name, module in (("vllm", root), ("vllm.inputs", inputs), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(FakeLLM, "made", [])
    monkeypatch.setattr(FakeLLM, "reply", staticmethod(lambda ids, j: [7, 8]))
    monkeypatch.setattr(FakeLLM, "finish_reason", staticmethod(lambda ids, j: "stop"))
    return FakeLLM


@pytest.fixture
def gpu_here(fake_vllm, monkeypatch):
    """As on a CUDA machine with vLLM installed (only the backend check is told so)."""
    monkeypatch.setattr(vb, "_missing_for_vllm", lambda: None)
    return fake_vllm


def llama3_with_bos_post_processor():
    """The Llama-3-like test tokenizer, made to add BOS to any text tokenised with special tokens,
    as the real one does."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tokenizer("llama3")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", tok.bos_token_id)])
    return tok


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_generation_prompts_are_the_hf_paths_token_ids(fake_vllm, monkeypatch, template):
    tok = llama3_with_bos_post_processor() if template == "llama3" else build_tokenizer(template)
    prompts = [QUESTION, WITH_SYSTEM]
    answer = tok.encode("def add(a, b):", add_special_tokens=False)
    stop = stop_token_ids(tok)[0]
    fake_vllm.reply = staticmethod(lambda ids, j: answer + [stop] + answer)  # what follows the stop is cut
    texts = VllmEngine("model", tok).generate(prompts, DecodingSettings(max_new_tokens=16))

    (call,) = fake_vllm.made[0].calls
    sent = [p["prompt_token_ids"] for p in call["prompts"]]
    # What the HF path decodes (the slot decoder's prompts).
    model, seen = build_model(len(tok)), []
    real = SlotDecoder.run
    monkeypatch.setattr(SlotDecoder, "run", lambda self, ids, *rest: (seen.extend(ids), real(self, ids, *rest))[1])
    generate(model, tok, prompts, DecodingSettings(max_new_tokens=2), show_progress=False)
    assert sorted(sent) == sorted(seen) and sent == [encode_prompt(tok, m) for m in prompts]
    for ids, messages in zip(sent, prompts):  # the prompt part of the encoding that is scored and trained on
        full = encode_conversation(tok, [*messages, {"role": "assistant", "content": "def add(a, b):"}]).input_ids
        assert full[: len(ids)] == ids
    if template == "llama3":
        bos = tok.bos_token_id
        assert all(ids[0] == bos and ids.count(bos) == 1 for ids in sent)
        # Text prompts would be tokenised again with the tokenizer's BOS in front of the template's own.
        assert tok(render(tok, QUESTION, add_generation_prompt=True))["input_ids"][:2] == [bos, bos]
    assert texts == [tok.decode(answer, skip_special_tokens=True)] * 2
    params = call["params"][0]  # one SamplingParams for the whole call
    assert (params.n, params.temperature, params.seed, params.max_tokens) == (1, 0.0, None, 16)
    assert params.stop_token_ids == stop_token_ids(tok)


def test_answers_finish_at_a_stop_token_and_not_at_the_budget(fake_vllm):
    tok = build_tokenizer()
    answer, stop = tok.encode("def add", add_special_tokens=False), stop_token_ids(tok)[0]
    # a stop token in the ids; vLLM's "stop" with the stop token left out of the ids; cut at the budget ("length")
    replies, reasons = iter([answer + [stop], answer, answer]), iter(["stop", "stop", "length"])
    fake_vllm.reply = staticmethod(lambda ids, j: next(replies))
    fake_vllm.finish_reason = staticmethod(lambda ids, j: next(reasons))
    answers = VllmEngine("model", tok).generate_answers([QUESTION] * 3, DecodingSettings(max_new_tokens=len(answer)))
    assert [(a.text, a.finished, a.new_tokens) for a in answers] == \
        [(tok.decode(answer, skip_special_tokens=True), finished, len(answer)) for finished in (True, True, False)]


def test_prompt_nll_by_hand():
    # prompt 5 6 7 9; tokens 6 and 7 are response tokens; each entry also holds a decoy token.
    logprobs = [None, {6: -0.5, 1: -0.1}, {7: -2.0, 6: -0.3}, {9: -4.0}]
    nll = prompt_nll([5, 6, 7, 9], logprobs, [1, 1, 1, 0])
    assert nll.dtype == np.float32
    np.testing.assert_array_equal(nll, [np.nan, 0.5, 2.0, np.nan])  # position 0 has no context
    with pytest.raises(ValueError, match="3 prompt logprobs for a 4-token prompt"):
        prompt_nll([5, 6, 7, 9], logprobs[:3], [0, 1, 1, 0])


def test_score_maps_prompt_logprobs_to_token_positions(fake_vllm):
    tok = build_tokenizer("chatml")
    enc = encode_conversation(tok, conversations(1)[0].messages)
    fake_vllm.logprob_fn = staticmethod(lambda ids: [-i / 100 for i in range(1, len(ids))])  # token i: logprob -i/100
    (nll,) = VllmEngine("model", tok).score([enc])
    expected = [i / 100 if i and enc.response_mask[i] else np.nan for i in range(len(enc))]
    np.testing.assert_allclose(nll, expected, rtol=1e-6)
    (call,) = fake_vllm.made[0].calls
    assert call["prompts"] == [{"prompt_token_ids": enc.input_ids}]
    assert (call["params"][0].prompt_logprobs, call["params"][0].max_tokens) == (1, 1)


def teacher_forced_logprobs(model):
    """vLLM's prompt logprobs computed with a HF model: log softmax of row i-1 at token i (full vocabulary)."""
    @torch.no_grad()
    def logprobs(ids):
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # (T, V)
        return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    return logprobs


def test_score_stage_on_vllm_equals_hf(gpu_here, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from forgetless.score.stage import ScoreConfig, run_score

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": ex.id, "messages": ex.messages}) + "\n" for ex in conversations(5)))
    settings = dict(model=str(tiny_model_dir), data=str(data), device="cpu", dtype="float32", batch_tokens=256)
    hf = pq.read_table(run_score(ScoreConfig(**settings, backend="hf", out_dir=str(tmp_path / "hf")))
                       / "scores.parquet")
    gpu_here.logprob_fn = staticmethod(
        teacher_forced_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()))
    monkeypatch.setattr("forgetless.lm.modeling.load_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("loaded the HF model"))
    out = run_score(ScoreConfig(**settings, backend="vllm", out_dir=str(tmp_path / "vllm"), part_size=2))
    vllm = pq.read_table(out / "scores.parquet")
    assert vllm.column("input_ids").to_pylist() == hf.column("input_ids").to_pylist()
    for a, b in zip(vllm.column("nll").to_pylist(), hf.column("nll").to_pylist()):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), atol=1e-5)  # NaN where NaN
    calls = gpu_here.made[0].calls  # one request per length bucket of the HF path, each example scored once
    assert len(calls) > 1 and sum(len(c["prompts"]) for c in calls) == 5
    assert json.loads((out / "manifest.json").read_text())["key"]["backend"] == "vllm"


@pytest.mark.parametrize("method", ["self_output", "rephrase"])
def test_generate_stage_samples_k_in_one_request_per_prompt(gpu_here, tiny_model_dir, tmp_path, monkeypatch, method):
    import forgetless.generate.stage as gen
    from forgetless.lm.data import load_examples
    from forgetless.lm.modeling import load_tokenizer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"Write a python function number {i}.",
                                        "response": "def add(a, b):\n    return a + b\n"}) + "\n" for i in range(3)))
    tok = load_tokenizer(str(tiny_model_dir))
    answer = tok.encode("def add(a, b):", add_special_tokens=False)
    gpu_here.reply = staticmethod(lambda ids, j: answer[: 1 + j] + stop_token_ids(tok)[:1])
    gpu_here.logprob_fn = staticmethod(lambda ids: [-0.5] * (len(ids) - 1))
    monkeypatch.setattr("forgetless.lm.modeling.load_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("loaded the HF model"))
    cfg = gen.GenerateConfig(method=method, model=str(tiny_model_dir), data=str(data), task="none", samples=4,
                             batch_size=2, backend="vllm", out_dir=str(tmp_path / "out"))
    out = gen.run_generate(cfg)

    calls = gpu_here.made[0].calls
    sampling = [c for c in calls if c["params"][0].prompt_logprobs is None]
    examples = load_examples(str(data))
    assert [len(c["prompts"]) for c in sampling] == [2, 1]  # batch_size prompts per call, one request each
    assert [p["prompt_token_ids"] for c in sampling for p in c["prompts"]] == \
        [encode_prompt(tok, gen.generation_prompt(cfg, ex)) for ex in examples]
    params = [p for c in sampling for p in c["params"]]
    assert all(p.n == 4 and p.temperature == 0.7 and p.max_tokens == cfg.max_new_tokens for p in params)
    assert len({p.seed for p in params}) == 3  # a seed per request; vLLM gives its k samples seed, seed + 1, ...
    records = [json.loads(line) for line in (out / gen.SAMPLES_FILE).read_text().splitlines()]
    assert [[s["text"] for s in r["samples"]] for r in records] == [[tok.decode(answer[: 1 + j]) for j in range(4)]] * 3
    assert all(s["finished"] and s["mean_nll"] == pytest.approx(0.5) for r in records for s in r["samples"])
    assert all(c["params"][0].prompt_logprobs == 1 for c in calls if c not in sampling)  # scoring went through vLLM too


def test_eval_with_a_lora_adapter_on_vllm(gpu_here, tiny_model_dir, tmp_path):
    from forgetless.eval.stage import EvalConfig, run_eval
    from forgetless.eval.tasks import get_task, select_items
    from forgetless.lm.modeling import load_tokenizer

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 12, "use_dora": False}))
    tok = load_tokenizer(str(tiny_model_dir))
    gpu_here.reply = staticmethod(lambda ids, j: tok.encode("The answer is 42", add_special_tokens=False))
    out = run_eval(EvalConfig(model=str(tiny_model_dir), adapter=str(adapter), tasks=("gsm8k",), limit=2,
                              backend="vllm", max_model_len=1024, gpu_memory_utilization=0.5, progress=False,
                              output_dir=str(tmp_path / "eval")))
    (llm,) = gpu_here.made
    assert llm.kwargs["enable_lora"] and llm.kwargs["max_lora_rank"] == 16  # rank 12 rounded up to vLLM's next slot
    assert (llm.kwargs["max_model_len"], llm.kwargs["gpu_memory_utilization"],
            llm.kwargs["tensor_parallel_size"]) == (1024, 0.5, 1)
    (call,) = llm.calls
    assert call["lora_request"].path == str(adapter.resolve())
    items = select_items(get_task("gsm8k").load(), 2, 0)
    assert [p["prompt_token_ids"] for p in call["prompts"]] == [encode_prompt(tok, it.messages) for it in items]
    summary = json.loads((out / "gsm8k.json").read_text())
    assert summary["settings"]["backend"] == "vllm" and summary["n"] == 2
    assert summary["finish_rate"] == 1.0 and summary["n_finished"] == 2  # the fake's finish_reason is "stop"
    assert all(json.loads(line)["output"] == "The answer is 42"
               for line in (out / "gsm8k.items.jsonl").read_text().splitlines())


def test_dora_adapter_is_refused_before_vllm_starts(gpu_here, tiny_model_dir, tmp_path):
    from forgetless.eval.stage import EvalConfig, run_eval

    adapter = tmp_path / "dora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "use_dora": True}))
    with pytest.raises(BackendError, match="DoRA adapter .*vLLM cannot load"):
        run_eval(EvalConfig(model=str(tiny_model_dir), adapter=str(adapter), tasks=("gsm8k",), limit=1, backend="vllm",
                            output_dir=str(tmp_path / "eval")))
    with pytest.raises(BackendError, match="DoRA"):
        VllmEngine("model", build_tokenizer(), adapter=str(adapter))
    assert gpu_here.made == []


def test_auto_picks_hf_without_cuda_and_vllm_without_it_fails_in_one_line(fake_vllm, monkeypatch, tiny_model_dir,
                                                                          tmp_path, capsys):
    from forgetless.cli import main

    assert not torch.cuda.is_available()
    assert resolve_backend("auto") == "hf" and resolve_backend("hf") == "hf"  # vllm "installed" (the fake), no GPU
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        resolve_backend("vllm")
    monkeypatch.delitem(sys.modules, "vllm")
    with pytest.raises(BackendError, match="needs the vllm package, which is not installed"):
        resolve_backend("vllm")
    code = main(["eval", f"model={tiny_model_dir}", "backend=vllm", "tasks=[gsm8k]", "limit=1",
                 f"output_dir={tmp_path / 'e'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("forgetless eval: error: backend=vllm needs the vllm package")
    monkeypatch.setattr(vb, "_missing_for_vllm", lambda: None)
    assert resolve_backend("auto") == "vllm"


def test_backend_settings_are_checked():
    from forgetless.eval.stage import EvalConfig
    from forgetless.generate.stage import GenerateConfig
    from forgetless.score.stage import ScoreConfig

    for cls in (EvalConfig, GenerateConfig, ScoreConfig):
        assert cls().backend == "auto"
        for bad, match in ((dict(backend="tgi"), "backend"), (dict(tensor_parallel_size=0), "tensor_parallel_size"),
                           (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
                           (dict(max_model_len=1), "max_model_len")):
            with pytest.raises(ValueError, match=match):
                cls(**bad)
    with pytest.raises(ValueError, match="max_model_len .* must exceed max_length"):
        ScoreConfig(max_length=1024, max_model_len=1024)


@pytest.mark.gpu
def test_vllm_scores_agree_with_hf_on_cuda(tmp_path):
    """The real vLLM (bf16) against the HF path (bf16) on a tiny saved model: the same response tokens scored,
    per-token NLL within bf16's precision (see test_gpu.py for the bound's reasoning)."""
    pytest.importorskip("vllm", reason="needs vllm installed")
    from forgetless.lm.modeling import load_model
    from forgetless.lm.scoring import score_encoded

    tok = build_tokenizer("chatml")
    # head_dim 64: vLLM's attention kernels take the usual head sizes only.
    build_model(len(tok), hidden_size=128, num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2,
                max_position_embeddings=1024).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    encoded = [encode_conversation(tok, ex.messages) for ex in conversations(8)]
    hf = score_encoded(load_model(str(tmp_path / "m"), dtype="bfloat16", device="cuda"), encoded, tok.pad_token_id)
    engine = VllmEngine(str(tmp_path / "m"), tok, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=1024)
    try:
        ours = engine.score(encoded)
    finally:
        engine.close()
    for a, b in zip(ours, hf):
        assert np.array_equal(np.isnan(a), np.isnan(b))
        assert np.nanmax(np.abs(a - b)) < 0.2
    assert math.isclose(np.nanmean(np.concatenate(ours)), np.nanmean(np.concatenate(hf)), rel_tol=0.01)
