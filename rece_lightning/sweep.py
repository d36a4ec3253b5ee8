"""``python train.py sweep``: the Fig. 6 trade-off, one fit per setting of a grid, from one base-model cache.

    python train.py sweep --config configs/toy.yaml --sweep.reg "[1e-3,1e-2,0.1,1]" --sweep.max_epochs 10

Every ``--sweep.<key> <list>`` names a trainer option (``max_epochs``), a model option (``lora_rank``), an option of
the configured method (``reg``, ``lamb``) or of the selector (``stop_when_clean``), or a dotted config path
(``model.method.init_args.reg``); the grid is their product. Every other argument is the fit's own. The settings run
one after another in this process, so the base model's Gram matrix and prompt encodings are computed once (the
in-memory :class:`~rece_lightning.base_cache.BaseModelCache`) and every later fit reuses them. Each fit logs into its
own version folder (``sweep-<setting>``) with its export there (``{log_dir}/erased``), and the sweep writes
``<sweep_dir>/sweep.json``, ``sweep.md`` and ``sweep.png``: for every setting and state, the selector's concept rate
on the c' probes and on its validation prompts (with 95 % Wilson intervals), the K/V drift and the preservation
prompts' K/V change (``callbacks.ParameterDrift``), and the state the setting's selector picks, for any model and any
detector the config names.

Every key and every setting is checked (each setting's config parsed and its modules built, no model loaded) before
the first fit starts.
"""

from __future__ import annotations

import inspect
import itertools
import json
import re
import time
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

import yaml

from rece_lightning.files import write_text

__all__ = ["parse_sweep", "run_sweep"]

SWEEP_FLAG = re.compile(r"^--sweep\.([A-Za-z_][\w.]*)(?:=(.*))?$")


def _values(raw: str) -> list[Any]:
    """A sweep's values: a JSON / YAML list or one value (JSON first, where ``1e-3`` is a number; YAML reads it as
    text)."""
    try:
        values = json.loads(raw)
    except json.JSONDecodeError:
        values = yaml.safe_load(raw)
    return values if isinstance(values, list) else [values]


def _split(argv: Sequence[str]) -> tuple[list[str], dict[str, list[Any]], str | None]:
    """(the fit's own arguments, sweep key -> values, --sweep_dir)."""
    rest, grid, sweep_dir = [], {}, None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--sweep_dir"):
            sweep_dir, i = (arg.split("=", 1)[1], i + 1) if "=" in arg else (args[i + 1], i + 2)
            continue
        match = SWEEP_FLAG.match(arg)
        if match is None:
            rest.append(arg)
            i += 1
            continue
        key, raw = match[1], match[2]
        if raw is None:
            if i + 1 >= len(args):
                raise ValueError(f'--sweep.{key} has no values: give a list, e.g. --sweep.{key} "[0.01, 0.1]"')
            raw, i = args[i + 1], i + 2
        else:
            i += 1
        values = _values(raw)
        if not values:
            raise ValueError(f"--sweep.{key}={raw} is an empty list: give at least one value")
        grid[key] = values
    if not grid:
        raise ValueError('a sweep needs at least one --sweep.<key> <values>, e.g. --sweep.reg "[1e-3, 1e-2, 0.1, 1]"')
    return rest, grid, sweep_dir


def _configured(rest: Sequence[str]) -> dict:
    """The YAML of the ``--config`` files among the fit's arguments, merged in order (enough to name the method and
    selector classes whose options a bare sweep key may be)."""
    merged: dict = {}

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    for i, arg in enumerate(rest):
        path = None
        if arg == "--config" and i + 1 < len(rest):
            path = rest[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path:
            merged = merge(merged, yaml.safe_load(Path(path).read_text()) or {})
    return merged


def _parameters(class_path: str | None) -> set[str]:
    if not class_path:
        return set()
    module, _, name = class_path.rpartition(".")
    return set(inspect.signature(getattr(import_module(module), name).__init__).parameters) - {"self", "kwargs"}


def _option_flag(key: str, configured: dict) -> str:
    """The command-line flag of sweep key ``key``; refuses, naming them, a key no section has."""
    import lightning.pytorch as pl

    from rece_lightning.module import RECEModule

    if "." in key:
        if key.split(".")[0] not in ("trainer", "model", "selector", "data"):
            raise ValueError(f"--sweep.{key}: a dotted key starts with trainer., model. or selector.")
        return f"--{key}"
    model = configured.get("model") or {}
    method = ((model.get("init_args") or {}).get("method") or {}).get("class_path", "rece_lightning.methods.RECE")
    selector = (configured.get("selector") or {}).get("class_path")
    sections = (
        ("trainer", set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}, "--trainer."),
        ("model", set(inspect.signature(RECEModule.__init__).parameters) - {"self", "method"}, "--model."),
        ("method", _parameters(method), "--model.method."),
        ("selector", _parameters(selector), "--selector.init_args."),
    )
    for _, names, prefix in sections:
        if key in names:
            return prefix + key
    known = "; ".join(f"{section}: {sorted(names)}" for section, names, _ in sections[1:])
    raise ValueError(
        f"--sweep.{key} is not a model or trainer option (nor one of the method's or the selector's): {known}; "
        "trainer: any Trainer argument (max_epochs, ...)"
    )


def _label(setting: dict[str, Any]) -> str:
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in setting.items())


def parse_sweep(argv: Sequence[str]) -> tuple[list[str], list[dict[str, Any]], dict[str, str], str | None, bool]:
    """(the fit's arguments, the settings of the grid, key -> flag, sweep_dir, whether the config has a logger),
    every key resolved or refused."""
    rest, grid, sweep_dir = _split(argv)
    configured = _configured(rest)
    flags = {key: _option_flag(key, configured) for key in grid}
    settings = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    logger = (configured.get("trainer") or {}).get("logger")
    return rest, settings, flags, sweep_dir, isinstance(logger, dict) and "class_path" in logger


def _fit_args(rest: list[str], setting: dict[str, Any], flags: dict[str, str], logged: bool) -> list[str]:
    """The fit of one setting: its values, its own log folder (``sweep-<setting>``) and its export inside it."""
    version = "sweep-" + re.sub(r"[^\w.=,+-]", "_", _label(setting))
    return [
        "fit",
        *rest,
        *(f"{flags[key]}={json.dumps(value)}" for key, value in setting.items()),
        *([f"--trainer.logger.init_args.version={version}"] if logged else []),
        "--model.export_dir={log_dir}/erased",
    ]


def _record(cli, setting: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What one fit says about the trade-off, from its selector and drift callback."""
    from callbacks import ConceptCheckpointSelector, ConceptPreservation, ParameterDrift

    selector = next((c for c in cli.trainer.callbacks if isinstance(c, ConceptCheckpointSelector)), None)
    drift = next((c for c in cli.trainer.callbacks if isinstance(c, ParameterDrift)), None)
    drifts = {entry["state"]: entry for entry in (drift.history if drift is not None else [])}
    kept = next((c for c in cli.trainer.callbacks if isinstance(c, ConceptPreservation)), None)
    kept_by_state = {entry["state"]: entry for entry in (kept.history if kept is not None else [])}
    states = []
    for score in sorted(selector.scores if selector is not None else [], key=lambda s: s["state"]):
        state = score["state"]
        states.append(
            {
                "state": state,
                "probe_rate": score["probe"]["rate"],
                "probe_rate_ci95": score["probe"].get("rate_ci95"),
                "prompt_rate": score["validation"]["rate"] if "validation" in score else None,
                "prompt_rate_ci95": score["validation"].get("rate_ci95") if "validation" in score else None,
                "drift": drifts.get(state, {}).get("drift"),
                "preservation_change": drifts.get(state, {}).get("preservation"),
                "kept_rate": kept_by_state.get(state, {}).get("kept_rate"),
                "kept_rate_ci95": kept_by_state.get(state, {}).get("kept_rate_ci95"),
            }
        )
    return {
        "setting": setting,
        "log_dir": cli.trainer.log_dir,
        "seconds": round(seconds, 2),
        "selected_state": None if selector is None else selector.selected,
        "selection": None if cli.model.recommended is None else cli.model.recommended.reason,
        "states": states,
    }


def _cell(rate: float | None, ci95: Sequence[float] | None) -> str:
    if rate is None:
        return "-"
    return f"{100 * rate:.0f} %" + (f" [{100 * ci95[0]:.0f}, {100 * ci95[1]:.0f}]" if ci95 else "")


def _markdown(records: list[dict]) -> str:
    header = [
        "setting",
        "state",
        "probes show concept",
        "prompts show concept",
        "other concepts kept",
        "K/V drift",
        "preserved K/V change",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        for entry in record["states"]:
            chosen = " **(selected)**" if entry["state"] == record["selected_state"] else ""
            drift, kept = entry["drift"], entry["preservation_change"]
            lines.append(
                f"| {_label(record['setting'])} | {entry['state']}{chosen} | "
                f"{_cell(entry['probe_rate'], entry['probe_rate_ci95'])} | "
                f"{_cell(entry['prompt_rate'], entry['prompt_rate_ci95'])} | "
                f"{_cell(entry['kept_rate'], entry['kept_rate_ci95'])} | "
                f"{'-' if drift is None else f'{drift:.4f}'} | {'-' if kept is None else f'{kept:.4f}'} |"
            )
    return "\n".join(lines) + "\n"


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for record in records:
        states = [e["state"] for e in record["states"]]
        label = _label(record["setting"])
        axes[0].plot(states, [e["probe_rate"] for e in record["states"]], marker="o", label=label)
        prompts = [e["prompt_rate"] for e in record["states"]]
        if any(p is not None for p in prompts):
            axes[1].plot(states, [float("nan") if p is None else p for p in prompts], marker="o", label=label)
        kept = [e["kept_rate"] for e in record["states"]]
        if any(k is not None for k in kept):
            axes[2].plot(states, [float("nan") if k is None else k for k in kept], marker="o", label=label)
        else:
            axes[2].plot(states, [e["preservation_change"] for e in record["states"]], marker="o", label=label)
        chosen = [e for e in record["states"] if e["state"] == record["selected_state"]]
        if chosen:
            axes[0].plot([chosen[0]["state"]], [chosen[0]["probe_rate"]], "k*", markersize=12)
    axes[0].set(xlabel="state (RECE epochs)", ylabel="concept rate, c' probes", title="probes (★: selected)")
    axes[1].set(xlabel="state (RECE epochs)", ylabel="concept rate, prompts", title="validation prompts")
    axes[2].set(
        xlabel="state (RECE epochs)",
        ylabel="other concepts kept (else: preserved K/V change)",
        title="what is spared",
    )
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_sweep(argv: Sequence[str], cli_main: Callable[..., Any]) -> list[dict]:
    """Check every setting, run their fits one after another, write the report; returns each setting's record."""
    rest, settings, flags, sweep_dir, logged = parse_sweep(argv)
    for setting in settings:  # parsed and instantiated (no model loads) before the first fit
        cli_main(_fit_args(rest, setting, flags, logged)[1:], run=False, exit_on_error=False)
    records = []
    for setting in settings:
        started = time.perf_counter()
        cli = cli_main(_fit_args(rest, setting, flags, logged), exit_on_error=False)
        records.append(_record(cli, setting, time.perf_counter() - started))
    folder = Path(sweep_dir or Path(records[0]["log_dir"]).parent / "sweep")
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "sweep.json", json.dumps({"settings": records}, indent=2, default=str))
    write_text(folder / "sweep.md", _markdown(records))
    try:
        _plot(records, folder / "sweep.png")
    except ImportError:  # matplotlib is a dev extra: the table and JSON are the report
        pass
    print(f"sweep: {len(records)} settings in {sum(r['seconds'] for r in records):.0f} s; report in {folder}")
    return records
