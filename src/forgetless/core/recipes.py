"""The recipes a comparison can run, in one table: what each masks, the loss it trains, the data it trains on.

A recipe is what ``forgetless run`` calls a *method* (``methods: [{method: stm}]``). It is plain data; the stages
read it: the mask stage gets its masking ``policy`` (one of :data:`forgetless.core.masking.POLICIES`, which also
holds policies no recipe uses, for ``forgetless mask``), the train stage its :attr:`Recipe.train` settings and its
label (``TrainConfig.method``), the generate stage its ``generator`` when its data is generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forgetless.core.masking import POLICIES

DATA_SOURCES = ("gold", "generated", "replay")
# The policies that read tau: the perplexity threshold (threshold), or the count of masked tokens to match (random,
# inverse; a `fraction` gives the count instead).
TAU_POLICIES = ("threshold", "random", "inverse")


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning recipe."""

    name: str
    description: str  # one line, shown by ``forgetless run --help``
    policy: str = "none"  # masking policy of its training tokens (forgetless.core.masking)
    loss: str = "nll"  # per-token loss: nll, or dft (TrainConfig.loss_type)
    kl: bool = False  # adds beta * KL(tuned || base) on trained tokens: needs train.kl_coef > 0
    data: str = "gold"  # gold (the target data), generated (by `generator` from it), or replay (a mix)
    generator: str | None = None  # GenerateConfig.method that makes its data from the target data
    trains_as: str | None = None  # TrainConfig.method when not its own name (it trains exactly as that one)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"{self.name}: unknown masking policy {self.policy!r}")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"{self.name}: data must be one of {', '.join(DATA_SOURCES)}, got {self.data!r}")
        if (self.data == "generated") != (self.generator is not None):
            raise ValueError(f"{self.name}: a generator goes with generated data, and only with it")

    @property
    def train(self) -> dict[str, Any]:
        """The TrainConfig settings the recipe implies (over the run's ``train``, under the method's own)."""
        return {**({"method": self.trains_as} if self.trains_as else {}),
                **({"loss_type": self.loss} if self.loss != "nll" else {})}

    @property
    def uses_tau(self) -> bool:
        """True when its mask reads tau (unless a ``fraction`` is given)."""
        return self.policy in TAU_POLICIES


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("sft", "train on every response token of the target data (ground-truth SFT)"),
    Recipe("stm", "Selective Token Masking: drop the response tokens whose base-model perplexity is above tau",
           policy="threshold"),
    Recipe("auto-tau", "STM at the tau whose masked share is closest to `fraction` without exceeding it",
           policy="auto-tau", trains_as="stm"),
    Recipe("random-mask", "drop as many tokens as STM at tau would (or `fraction`), at random (the paper's control)",
           policy="random"),
    Recipe("inverse-mask", "drop as many tokens as STM at tau would (or `fraction`): the lowest-perplexity ones",
           policy="inverse"),
    Recipe("soft", "weight each response token by its probability under the base model (a static DFT)",
           policy="inverse-ppl"),
    Recipe("dft", "weight each token's loss by its detached probability under the current model (TRL's DFT)",
           loss="dft"),
    Recipe("kl", "SFT plus beta * KL(tuned || base) on the trained tokens (set train.kl_coef > 0)", kl=True),
    Recipe("weight-decay", "SFT with AdamW weight decay (set train.weight_decay)", trains_as="sft"),
    Recipe("replay", "SFT on the target data mixed with the base's answers to unmeasured prompts (replay_fraction)",
           data="replay"),
    Recipe("self-output", "SFT on the base model's own passing answers to the target prompts (or your `data`)",
           data="generated", generator="self_output"),
    Recipe("rephrase", "SFT on the base model's rewrite of each reference answer (or your `data`)",
           data="generated", generator="rephrase"),
)}
# recipe -> the GenerateConfig.method that makes its training data
GENERATED = {r.name: r.generator for r in RECIPES.values() if r.generator}
# TrainConfig.method labels: every recipe that does not train as another one
TRAIN_METHODS = tuple(r.name for r in RECIPES.values() if r.trains_as is None)


def recipe_lines(indent: str = "  ") -> str:
    """One line per recipe, its name and description, for ``--help``."""
    width = max(map(len, RECIPES))
    return "\n".join(f"{indent}{r.name:<{width}}  {r.description}" for r in RECIPES.values())
