"""RECE's Fig. 6 trade-off on the toy world: a thin use of ``train.py sweep`` over ``configs/toy.yaml``.

    python benchmarks/toy_report.py            # 4 lambdas x 10 epochs, every state kept: about 6 minutes on 2 cores

For each λ of Eq. 7 (default 1e-3, 1e-2, 0.1, 1) and every state (0 = after UCE, k = after k RECE epochs), the sweep
reports red's rate on the c' probes and on red's prompts, the other colours kept (``callbacks.ConceptPreservation``),
the K/V drift and the preserved prompts' K/V change, and the state the selector picks; the run does not stop at the
first clean state, so that the cost of the epochs past it shows. Writes ``<out>/sweep.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a clone without installing

from rece_lightning.sweep import run_sweep  # noqa: E402
from train import cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "toy.yaml"))
    parser.add_argument("--reg", default="[1e-3, 1e-2, 0.1, 1]", help="the λ of Eq. 7 to sweep (a JSON list)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="docs/toy_report")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs={args.epochs} is not allowed: it must be >= 1")
    run_sweep(
        [
            "--config",
            args.config,
            "--trainer.enable_progress_bar=false",
            "--sweep.reg",
            args.reg,
            "--sweep.max_epochs",
            str(args.epochs),
            "--sweep.stop_when_clean",
            "false",
            "--sweep_dir",
            args.out,
        ],
        cli_main,
    )
    print((Path(args.out) / "sweep.md").read_text())


if __name__ == "__main__":
    main()
