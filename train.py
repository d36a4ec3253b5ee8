"""Command-line entry point: ``python train.py fit --config configs/rece.yaml`` (and ``test`` for evaluation)."""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI


def cli_main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the LightningCLI; tests call it in-process with ``args``."""
    return LightningCLI(
        model_class=None,  # any LightningModule named by class_path: RECEModule to fit, the evaluator to test
        datamodule_class=None,  # optional: RECEModule brings its own concept data
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    cli_main()
