"""Generate: Self-Output and Rephrase training data, verified, with provenance."""

from forgetless.generate.stage import GenerateConfig, run_generate

__all__ = ["GenerateConfig", "run_generate"]
