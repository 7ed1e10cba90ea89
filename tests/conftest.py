"""Shared test fixtures and helpers: tiny models and tokenizers built offline, in the test run.

Markers (declared in pyproject.toml): ``slow`` tests load the real embedded model and run by default
(deselect them with ``-m "not slow"``); ``gpu`` tests need CUDA and are skipped here without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no progress lines in captured output (tests/test_progress.py sets its own)
os.environ.setdefault("FORGETLESS_PROGRESS", "0")
SRC = str(Path(__file__).resolve().parents[1] / "src")

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: BOS inside the template, trimmed content, header tokens, <|eot_id|>.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma style: no system role, 'model' header, <end_of_turn>.
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<pad>"]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "Write a python function to add two numbers.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "assert add(1, 2) == 3\nassert add(0, 0) == 0",
    "You are a helpful assistant. user assistant system model",
    "```python\nprint('hello world')\n```",
]


def build_tokenizer(template: str = "chatml"):
    """A byte-level BPE tokenizer trained on a few lines, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    eos = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}[template]
    bos = {"chatml": None, "llama3": "<|begin_of_text|>", "gemma": "<bos>"}[template]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<pad>", bos_token=bos)
    fast.chat_template = TEMPLATES[template]
    return fast


def build_model(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer Llama with random weights (deterministic for a seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def save_tiny_model(path: Path, tokenizer=None, seed: int = 0, **overrides) -> Path:
    """Save a tiny model (``build_model``) and its tokenizer (chatml unless given) with save_pretrained."""
    tok = tokenizer if tokenizer is not None else build_tokenizer("chatml")
    build_model(len(tok), seed, **overrides).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def conversations(n: int):
    """``n`` one-turn conversations whose answers repeat one of four lines 1-3 times."""
    from forgetless.lm.data import Example

    answers = ["def add(a, b):\n    return a + b\n", "print('hello world')", "assert add(1, 2) == 3",
               "The quick brown fox jumps over the lazy dog."]
    return [Example(id=str(i), messages=[{"role": "user", "content": "Write a python function to add two numbers."},
                                         {"role": "assistant", "content": answers[i % 4] * (1 + i % 3)}])
            for i in range(n)]


def drop_every(rows: list[dict], k: int) -> list[dict]:
    """An STM-like table in place: every trained token at a position divisible by ``k`` leaves the loss."""
    for r in rows:
        for i, y in enumerate(r["labels"]):
            if y != -100 and i % k == 0:
                r["labels"][i], r["loss_weight"][i] = -100, 0.0
    return rows


def batch(tokenizer, n=4, mask_every=None):
    """The SFT table of ``conversations(n)`` (STM-like with ``mask_every``: see ``drop_every``) and its padded batch."""
    from forgetless.train.collate import MaskedBatchCollator, build_sft_table

    rows = build_sft_table(conversations(n), tokenizer)
    if mask_every:  # an STM-like table: some response tokens dropped from the loss
        drop_every(rows, mask_every)
    return rows, MaskedBatchCollator(tokenizer.pad_token_id)(rows)


class Crash(Exception):
    """Raised by ``crash_at`` to stand in for a crash in the middle of training."""


def crash_at(step: int):
    """A Trainer callback that raises ``Crash`` when ``step`` has finished."""
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crash()

    return CrashAt()


def cli(*args: str) -> list[str]:
    """The command line of ``forgetless <args>`` run as a subprocess of this Python."""
    return [sys.executable, "-m", "forgetless.cli", *args]


def cli_env() -> dict[str, str]:
    """The environment of a forgetless subprocess: this checkout's ``src`` first, the hub offline."""
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")


def run_to_end(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=timeout)


def kill_mid_run(cmd: list[str], out: Path, trigger: Path, too_late: list[Path], tries: int = 3,
                 timeout: float = 240) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``trigger`` exists; the kill must land mid-run: killed (not
    finished), ``trigger`` written and none of ``too_late`` (files the run writes later) there yet. A kill that
    came too late (a slow poll on a busy machine) is retried from an empty ``out``; ``tries`` misses fail."""
    for _ in range(tries):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
        deadline = time.time() + timeout
        while time.time() < deadline and not trigger.exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # does nothing if it has exited already
        if proc.wait() == -signal.SIGKILL and trigger.exists() and not any(p.exists() for p in too_late):
            return
    pytest.fail(f"no kill between {trigger.name} and {', '.join(p.name for p in too_late)} in {tries} tries")


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests are skipped where CUDA is not available; a test that loads the real embedded model must
    be marked ``slow``, so that ``-m "not slow"`` never loads it."""
    unmarked = [item.nodeid for item in items
                if "embedded" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"tests using the embedded model without @pytest.mark.slow: {', '.join(unmarked)}")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny chatml model and tokenizer saved with save_pretrained, shared by the whole session.

    Read it, never write into it (``tiny_model_copy`` gives a private copy); the teardown fails if a test did.
    Positions go to 2048 so the bundled MBPP prompts fit; the weights equal ``build_model(len(tokenizer))``'s.
    """
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", max_position_embeddings=2048)
    before = {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()}
    yield path
    after = {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()}
    assert after == before, "a test wrote into the shared tiny_model_dir; use tiny_model_copy"


@pytest.fixture
def tiny_model_copy(tiny_model_dir, tmp_path):
    """A private copy of ``tiny_model_dir`` (in ``tmp_path / "model"``) for a test that overwrites its files."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


class TrainWorld(NamedTuple):
    root: Path  # sft.parquet, stm.parquet; each run writes into its own folder here
    tokenizer: object
    model: Path


@pytest.fixture(scope="session")
def train_world(tiny_model_dir, tmp_path_factory) -> TrainWorld:
    """An SFT table of 8 conversations (``sft.parquet``) and a copy with every third trained token dropped
    (``stm.parquet``) for the shared tiny model; ``train_config`` makes runs on it."""
    from forgetless.train.collate import build_sft_table, write_table

    root = tmp_path_factory.mktemp("train")
    tok = build_tokenizer("chatml")
    rows = build_sft_table(conversations(8), tok)
    write_table(rows, root / "sft.parquet")
    write_table(drop_every(rows, 3), root / "stm.parquet")
    return TrainWorld(root, tok, tiny_model_dir)


def train_config(world: TrainWorld, name: str, table: str = "sft", **kw):
    """A TrainConfig on one of ``world``'s tables: 2 LoRA steps of batch 2, written to ``world.root / name``."""
    from forgetless.train.stage import TrainConfig

    base = dict(data=str(world.root / f"{table}.parquet"), output_dir=str(world.root / name), model=str(world.model),
                max_steps=2, batch_size=2, learning_rate=5e-2, lora_dropout=0.0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(params=["chatml", "llama3", "gemma"])
def any_tokenizer(request):
    return build_tokenizer(request.param)


@pytest.fixture
def tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture
def tiny_model(tokenizer):
    return build_model(len(tokenizer))


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct (converted and cached on first use)."""
    from forgetless.lm.modeling import load_model_and_tokenizer

    return load_model_and_tokenizer("embedded", device="cpu")


@pytest.fixture
def tiny_run_config(tmp_path, tiny_model_dir):
    """A `forgetless run` config on the tiny model: two recipes, one training step, small measures."""
    config = tmp_path / "run.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'out'}
model: {tiny_model_dir}
data: mbpp-train
limit: 4
max_length: 1024
methods:
  - {{method: sft}}
  - {{method: auto-tau, fraction: 0.3}}
train: {{max_steps: 1, batch_size: 2, device: cpu}}
eval: {{tasks: [gsm8k], limit: 2, max_new_tokens: 4, device: cpu, cache: false}}
retention: {{mc_tasks: [arc_easy], mc_limit: 3, drift_sources: [gsm8k], drift_limit: 2, max_new_tokens: 4,
             behaviour_limit: 2, heldout_limit: 2, device: cpu, cache_dir: {tmp_path / 'cache'}}}
target: gsm8k
other_target: true  # measured on GSM8K after training on MBPP, on purpose
""")
    return config, tmp_path / "out"
