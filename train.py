"""Command-line entry point: ``python train.py fit --config configs/rece.yaml`` (and ``test`` for evaluation)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from argparse import ArgumentError
from pathlib import Path

from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from rece_lightning.console import rounds_progress_bar, silence_known_noise

# Hyper-parameters that define an edit: a checkpoint whose values differ belongs to another run.
EDIT_DEFINING = (
    "pretrained_model_name_or_path",
    "erase_concepts",
    "guide_concepts",
    "preserve_concepts",
    "method",
    "dtype",
)


class RECECLI(LightningCLI):
    """LightningCLI with the checks a RECE fit needs before anything loads.

    Adds ``--selector``: the checkpoint selector (``callbacks.ConceptCheckpointSelector`` or
    ``callbacks.NudityCheckpointSelector``) as a top-level key, so that its detector and options can be set from the
    command line (``--selector.init_args.scorer.init_args.classes=[blue]``); list entries of ``trainer.callbacks``
    cannot be.
    """

    def add_arguments_to_parser(self, parser) -> None:
        from callbacks import ConceptCheckpointSelector

        parser.add_lightning_class_args(ConceptCheckpointSelector, "selector", subclass_mode=True, required=False)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before anything loads: it must exist, be a readable checkpoint, and, for a RECE fit,
        come from a run of the same edit (Lightning would otherwise take the checkpoint's hyper-parameters over the
        config's, and the run would become the other run, exports included). A RECE fit keeps its config's values."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry"):
            return super()._parse_ckpt_path()
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist: give a checkpoint file to resume from")
        from rece_lightning.export import read_checkpoint

        checkpoint = read_checkpoint(ckpt_path)  # a corrupt file: one line naming it
        model = self.config[subcommand].get("model")
        class_path = getattr(model, "class_path", None)
        if subcommand != "fit" or class_path not in ("rece_lightning.RECEModule", "rece_lightning.module.RECEModule"):
            return super()._parse_ckpt_path()
        saved = checkpoint.get("hyper_parameters") or {}
        if "transform" not in checkpoint.get("state_dict", {}):
            raise ValueError(f"ckpt_path={ckpt_path!r} is not a RECEModule checkpoint: it holds no 'transform'")
        from rece_lightning.module import RECEModule

        configured = {**_init_defaults(RECEModule), **dict(vars(model.init_args))}
        configured["method"] = _method_spec(configured.get("method"))
        configured["pretrained_model_name_or_path"] = _model_path(configured.get("pretrained_model_name_or_path"))
        if "method" in saved:
            saved = {**saved, "method": _method_spec(saved["method"])}
        differing = [
            f"{key}={saved[key]!r} (config: {configured.get(key)!r})"
            for key in EDIT_DEFINING
            if key in saved and _normalised(saved[key]) != _normalised(configured.get(key))
        ]
        if differing:
            raise ValueError(
                f"ckpt_path={ckpt_path!r} belongs to another run: its " + "; ".join(differing) + ". Resume with the "
                "config that made it, or start afresh without --ckpt_path"
            )

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """A RECE fit on several devices or nodes runs on ``rece_ddp``: DDP without the model wrapper (a closed-form
        module has no parameters for DistributedDataParallel to wrap)."""
        from lightning.pytorch.callbacks import ProgressBar

        from rece_lightning.distributed import STRATEGY_NAME
        from rece_lightning.module import RECEModule

        callbacks = [callback for callback in callbacks if callback is not None]  # --selector=null
        given = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks.append(rounds_progress_bar())  # counts rounds 1-based
        fitting = self.subcommand in ("fit", None)  # None: built without running (run=False)
        if fitting and isinstance(self.model, RECEModule) and config.get("strategy") in ("auto", "ddp"):
            if _several(config.get("devices", "auto")) or int(config.get("num_nodes") or 1) > 1:
                config = {**config, "strategy": STRATEGY_NAME}
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        from rece_lightning.module import RECEModule

        silence_known_noise(resuming=self.config["fit"].get("ckpt_path") is not None)
        if isinstance(self.model, RECEModule):
            # Lightning turns an unset max_epochs into 1000 before any module hook runs: check the user's value here.
            RECEModule._check_rounds(self.trainer.max_epochs, self.trainer.max_steps, self.model.method)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run; if the run fails before its first epoch ends, remove the log folder it made for nothing."""
        logger = self.trainer.logger
        self._continue_resumed_logs(subcommand)
        folder = Path(logger.log_dir) if logger is not None and logger.log_dir else None
        existed = folder is not None and folder.exists()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            started = self.trainer.current_epoch > 0 or self.trainer.global_step > 0
            if (
                folder is not None
                and not existed
                and not started
                and self.trainer.is_global_zero
                and _only_start_up_files(folder)
            ):
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def _continue_resumed_logs(self, subcommand: str) -> None:
        """A fit resumed from a checkpoint inside ``<save_dir>/<name>/version_N/`` logs on into that folder (the
        selector's scores, the probes and the export then sit beside the earlier epochs), unless a version is set."""
        from lightning.pytorch.loggers import TensorBoardLogger

        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand == "fit" else None
        logger = self.trainer.logger
        if not ckpt_path or not os.path.isfile(ckpt_path) or not isinstance(logger, TensorBoardLogger):
            return
        if logger._version is not None:
            return
        runs = Path(logger.root_dir).resolve()
        for parent in Path(ckpt_path).resolve().parents:
            if parent.parent == runs and parent.name.startswith("version_") and parent.name[8:].isdigit():
                logger._version = int(parent.name[8:])
                rank_zero_info(f"Resuming from {ckpt_path}: logs continue in {parent}")
                return
        rank_zero_info(f"Resuming from {ckpt_path} (outside {runs}): logs go to a new folder, {logger.log_dir}")


def _init_defaults(cls) -> dict:
    import inspect

    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _method_spec(value) -> dict:
    """A method as given in a config (None: the default RECE) or recorded in a checkpoint, as its full spec."""
    from rece_lightning.methods import RECE, from_spec

    if value is None:
        return RECE().spec()
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    return from_spec(value).spec()


def _model_path(value):
    """Where a configured model is (a model source, ``class_path`` / ``init_args``, says without making it)."""
    if not hasattr(value, "class_path"):
        return value
    import importlib

    from rece_lightning.diffusion import describe_model

    module_name, _, class_name = value.class_path.rpartition(".")
    source = getattr(importlib.import_module(module_name), class_name)(**vars(value.init_args or {}))
    return describe_model(source)


def _normalised(value):
    """Lists and tuples, and one-string lists and strings, compare equal (as the module reads them)."""
    if isinstance(value, (list, tuple)):
        value = [_normalised(v) for v in value]
        return value[0] if len(value) == 1 else tuple(value)
    return value


def _several(devices) -> bool:
    """Whether ``--trainer.devices`` may mean more than one device ("auto" and -1 mean all there are)."""
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return True
    if "," in text:
        return len([d for d in text.split(",") if d.strip()]) > 1
    return text.isdigit() and int(text) > 1


START_UP_FILES = ("config.yaml", "hparams.yaml")


def _only_start_up_files(folder: Path) -> bool:
    """Whether ``folder`` holds only what a run writes as it starts (its config, hyper-parameters and an events file
    without a single scalar or image): nothing a user could want back."""
    if not folder.is_dir():
        return False
    for path in folder.rglob("*"):
        if path.is_dir():
            continue
        if path.name in START_UP_FILES:
            continue
        if path.name.startswith("events.out.tfevents") and path.stat().st_size < 1024:
            continue
        return False
    return True


def cli_main(args: ArgsType = None, run: bool = True, exit_on_error: bool = True) -> LightningCLI:
    """Build (and by default run) the LightningCLI; tests call it in-process with ``args``.

    ``exit_on_error=False`` raises configuration errors instead of printing jsonargparse's usage and exiting (the
    command line then prints one short message, see :func:`main`).
    """
    silence_known_noise()
    return RECECLI(
        model_class=None,  # any LightningModule named by class_path: RECEModule to fit, the evaluator to test
        datamodule_class=None,  # optional: RECEModule brings its own concept data
        save_config_kwargs={"overwrite": True},
        # a closed-form module has no parameters to summarise; the bar counts rounds 1-based
        trainer_defaults={"enable_model_summary": False},
        parser_kwargs={"exit_on_error": exit_on_error},
        args=args,
        run=run,
    )


_KEY = re.compile(r'Parser key "([^"]+)"')
_VALUE = re.compile(r"Got value: (\S+)")
_NON_FINITE = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}


def short_error(error: BaseException) -> str:
    """One line for a configuration error: the innermost message of the chain, with the option it is about."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    keys = [key for e in chain for key in _KEY.findall(str(e))]
    innermost = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(chain[-1]).__name__
    value = next((v for e in chain for v in _VALUE.findall(str(e))), None)
    if value is not None and value.lower().strip("'\"") in _NON_FINITE:
        innermost = f"{value} is not allowed: non-finite values (nan, inf) are refused; give a finite number"
    option = ".".join(dict.fromkeys(k for k in keys if k not in ("model", "data", "trainer") or len(keys) == 1))
    section = next((k for k in keys if k in ("model", "data", "trainer")), None)
    where = f"--{section}.{option}" if section and option and option != section else (f"--{option}" if option else "")
    return f"error: {where + ': ' if where else ''}{innermost}"


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, ArgumentError)


def main(argv: list[str] | None = None) -> None:
    """``python train.py ...``: a configuration error prints one line naming the value, and exits with status 2
    (``RECE_TRACEBACK=1`` shows the whole traceback instead)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["sweep"]:
            from rece_lightning.sweep import run_sweep

            sys.argv = sys.argv[:1]  # the fits get their arguments from the sweep, not from the command line
            run_sweep(argv[1:], cli_main)
        else:
            cli_main(argv, exit_on_error=False)
    except SIGTERMException:
        print(
            "stopped on SIGTERM: the images and attack outcomes done so far are kept; the same command goes on from "
            "there",
            file=sys.stderr,
        )
        raise SystemExit(143) from None
    except USER_ERRORS as error:
        if os.environ.get("RECE_TRACEBACK"):
            raise
        print(short_error(error) + "  (RECE_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
