"""The generation stage's settings (:func:`forgetless.generate.stage.run_generate` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from forgetless.core.recipes import GENERATED
from forgetless.generate.assemble import ON_FAILURE
from forgetless.generate.paper import CHOICES
from forgetless.generate.verify import TASKS
from forgetless.lm.model_args import EngineArgs
from forgetless.lm.vllm_backend import check_backend_settings

# The generators of the recipes whose data is generated (forgetless.core.recipes), then the authors' published
# generations of each (paper_<generator>: loaded, not generated).
METHODS = (*GENERATED.values(), *(f"paper_{g}" for g in GENERATED.values()))
DATA_FILE = "data.jsonl"
# The authors' rephrase prompt (PROMPT_TEMPLATE of generate_self-output_training_data.py in
# appier-research/robust-llm-finetunes), word for word; their {original_response} is {reference} here.
DEFAULT_REPHRASE_TEMPLATE = (
    "Below are an instruction that describes a task along with a reference answer. Using the reference answer "
    "as a guide, write your own response.\n### Instruction:\n{instruction}\n### Reference Answer:\n{reference}\n"
    "### Response:"
)
# The authors' samples per prompt: 32 for Self-Output, one rewrite for Rephrase.
DEFAULT_SAMPLES = {"self_output": 32, "rephrase": 1}


@dataclass(frozen=True)
class GenerateConfig(EngineArgs):
    """Settings of the generation stage; the model and engine are :class:`EngineArgs`."""

    method: str = field(default="self_output", metadata={"help": f"one of {', '.join(METHODS)}"})
    data: str = field(default="mbpp-train",
                      metadata={"help": "ground-truth training set (paper_* methods: mbpp-train or mbpp-validation)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    task: str = field(default="auto", metadata={"help": f"verifier: {', '.join(TASKS)} (auto: from the data set)"})
    samples: int | None = field(default=None, metadata={"help": "answers sampled per prompt (default: the authors' 32 "
                                                                "for self_output, 1 for rephrase)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (the authors': 0.7)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass (the authors': 0.95)"})
    max_new_tokens: int = field(default=512, metadata={"help": "tokens per sampled answer (the authors': 512); longer "
                                                               "ones are cut (and usually fail)"})
    choose: str = field(default="lowest-ppl", metadata={"help": f"which correct answer to keep: {', '.join(CHOICES)}"})
    on_failure: str = field(default="drop", metadata={"help": "a prompt without a passing answer: drop (the authors') "
                                                              "or ground_truth (keep its reference)"})
    rephrase_template: str = field(default=DEFAULT_REPHRASE_TEMPLATE,
                                   metadata={"help": "rephrase prompt; {instruction} and {reference} are filled in"})
    batch_size: int = field(default=4,
                            metadata={"help": "prompts per generation batch (each gives 'samples' sequences)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling (per batch) and of choose=random"})
    sandbox_timeout_s: float = field(default=10.0, metadata={"help": "seconds per MBPP test run"})
    max_length: int = field(default=2048, metadata={"help": "tokens per example when scoring answers"})
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per scoring batch"})
    compare: tuple[str, ...] = field(default=(), metadata={"help": "other generate output dirs whose answers "
                                                                   "join the ppl comparison"})
    out_dir: str = field(default="runs/default/generate", metadata={"help": "output directory"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.samples is None:
            object.__setattr__(self, "samples", DEFAULT_SAMPLES.get(self.method, 1))
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {self.on_failure!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.choose not in CHOICES:
            raise ValueError(f"choose must be one of {', '.join(CHOICES)}, got {self.choose!r}")
        if self.samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("samples, batch_size and max_new_tokens must be positive")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive, got {self.limit}")
        if self.method == "rephrase" and "{reference}" not in self.rephrase_template:
            raise ValueError("rephrase_template must contain {reference} (and usually {instruction})")
        if self.method.startswith("paper_") and self.data not in ("mbpp-train", "mbpp-validation"):
            raise ValueError(f"the paper's generations cover mbpp-train and mbpp-validation, not {self.data!r}")
        check_backend_settings(self.backend, self.tensor_parallel_size, self.gpu_memory_utilization, self.max_model_len)
