"""Command-line entry point: ``python train.py fit --config configs/rece.yaml`` (and ``test`` for evaluation)."""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI


class RECECLI(LightningCLI):
    """LightningCLI with the checks a RECE fit needs before anything loads."""

    def before_fit(self) -> None:
        from rece_lightning.module import RECEModule

        if isinstance(self.model, RECEModule):
            # Lightning turns an unset max_epochs into 1000 before any module hook runs: check the user's value here.
            RECEModule._check_rounds(self.trainer.max_epochs, self.trainer.max_steps)


def cli_main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the LightningCLI; tests call it in-process with ``args``."""
    return RECECLI(
        model_class=None,  # any LightningModule named by class_path: RECEModule to fit, the evaluator to test
        datamodule_class=None,  # optional: RECEModule brings its own concept data
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    cli_main()
