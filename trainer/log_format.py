"""The trainer's metric log lines and the regexes that parse them: the one place both live.

The construct reads `METRIC_DEFINITIONS` from this file when it builds the pipeline, so the SageMaker
metric definitions (and through them CloudWatch, under network isolation too) always match what the
trainer prints. Keep this module free of imports beyond the standard library.
"""

_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"


def train_line(*, step: int, loss: float, learning_rate: float, tokens_per_second: float) -> str:
    return (f"[train] step={step} loss={loss:.6f} lr={learning_rate:.6e} "
            f"tokens_per_s={tokens_per_second:.1f}")


def validation_line(*, step: int, loss: float) -> str:
    return f"[validation] step={step} loss={loss:.6f}"


def checkpoint_line(*, step: int, blocked_seconds: float) -> str:
    return f"[checkpoint] step={step} blocked_s={blocked_seconds:.3f}"


# SageMaker MetricDefinitions: the first capture group is the value (CreateTrainingJob API reference).
METRIC_DEFINITIONS = [
    {"Name": "train:step", "Regex": r"\[train\] step=(\d+) "},
    {"Name": "train:loss", "Regex": r"\[train\] step=\d+ loss=" + _NUMBER},
    {"Name": "train:learning_rate", "Regex": r"\[train\] step=\d+ loss=\S+ lr=" + _NUMBER},
    {"Name": "train:tokens_per_second", "Regex": r"\[train\] .* tokens_per_s=" + _NUMBER},
    {"Name": "validation:loss", "Regex": r"\[validation\] step=\d+ loss=" + _NUMBER},
    {"Name": "checkpoint:blocked_seconds", "Regex": r"\[checkpoint\] step=\d+ blocked_s=" + _NUMBER},
]
