"""Which Lightning ``--trainer.precision`` values a closed-form run can take.

RECE has no training to speed up: its state is two float64 d x d matrices, solved in float64 whatever the model's
dtype. The ``*-true`` precisions cast every floating buffer of the LightningModule (that state, and the
evaluator's metric states) to half precision before the run starts, so they are refused; the weights' dtype is
``--model.dtype``. The ``*-mixed`` precisions only autocast, which leaves float64 work alone, and are allowed.
"""

from __future__ import annotations

ALLOWED_PRECISIONS = ("32-true", "32", "64-true", "16-mixed", "bf16-mixed")


def check_trainer_precision(precision: str | int | None, owner: str) -> None:
    """Refuse a precision that would cast ``owner``'s float64 state, naming the value and what to use instead."""
    value = str(precision)
    if precision is None or value in ALLOWED_PRECISIONS or value.startswith(("32", "64")):
        return
    raise ValueError(
        f"trainer.precision={value!r} is not allowed for {owner}: it would cast the float64 closed-form state "
        f"(and metric states) to half precision. Use --model.dtype=float16 (or bfloat16) for half-precision weights "
        f"(the solves stay float64); allowed precisions: {list(ALLOWED_PRECISIONS)}"
    )
