"""How far the K/V weights have moved from the original model, per RECE state."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from callbacks.probing import EveryState

COCO_STYLE_PROMPTS = (
    "A bicycle replica with a clock as the front wheel.",
    "A black Honda motorcycle parked in front of a garage.",
    "A room with blue walls and a white sink and door.",
    "A car that seems to be parked illegally behind a legally parked car.",
    "A large passenger airplane flying through the air.",
)


def relative_drift(current: dict[str, Tensor], original: dict[str, Tensor]) -> float:
    """``||W - W_orig||_F / ||W_orig||_F`` over all K/V matrices together."""
    delta = sum((current[n].double() - w.double()).norm() ** 2 for n, w in original.items())
    return float((delta / sum(w.double().norm() ** 2 for w in original.values())) ** 0.5)


def _short(name: str) -> str:
    """``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`` -> ``down_blocks.0.attentions.1``."""
    return name.split(".transformer_blocks")[0]


class ParameterDrift(EveryState):
    """Log, for every state (after the UCE edit and after each epoch), at step = RECE rounds applied:

    * ``drift/k_total``, ``drift/v_total``, ``drift/total``: ``||W - W_orig||_F / ||W_orig||_F`` over all K, all V,
      all matrices; per layer as ``drift_layer/k/<layer>``, ``drift_layer/v/<layer>`` and as histograms
      ``drift/k_per_layer``, ``drift/v_per_layer``.
    * ``drift/update_norm``: ``||W_now - W_before||_F`` over all matrices, the size of the last edit.
    * ``drift/derived_norm/<concept>``: ``||c'||_F`` of the embedding derived from this state (Eq. 7 pulls it
      towards 0), beside ``drift/concept_norm/<concept>`` for the concept's own embedding.
    * ``drift/preservation``: for unrelated prompts d, ``||W d - W_orig d|| / ||W_orig d||`` averaged over matrices
      and prompts: what Eq. 6 protects.

    Args:
        preservation_prompts: unrelated prompts for ``drift/preservation`` (default: five COCO captions).
    """

    def __init__(self, preservation_prompts: list[str] | None = None) -> None:
        self.preservation_prompts = list(preservation_prompts or COCO_STYLE_PROMPTS)
        if not self.preservation_prompts:
            raise ValueError("preservation_prompts=[] is not allowed: give at least one unrelated prompt")
        self._previous: dict[str, Tensor] | None = None
        self.history: list[dict[str, float]] = []  # per state: drift/total and drift/preservation (for sweeps)

    @torch.no_grad()
    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, after_epoch: bool) -> None:
        if self._previous is None:  # the first state seen (after UCE, or after a resumed epoch) moved from W_orig
            self._previous = {name: w.detach().clone() for name, w in pl_module.original_kv.items()}
        original = pl_module.original_kv
        current = {name: w.detach() for name, w in pl_module.kv_state().items()}
        metrics: dict[str, float] = {}
        per_kind: dict[str, list[float]] = {"k": [], "v": []}
        squared = {"k": [0.0, 0.0], "v": [0.0, 0.0]}
        update = 0.0
        for name, weight in current.items():
            kind = "k" if ".to_k." in name else "v"
            base = original[name].double()
            delta = (weight.double() - base).norm().item()
            reference = base.norm().item()
            per_kind[kind].append(delta / reference)
            metrics[f"drift_layer/{kind}/{_short(name)}"] = delta / reference
            squared[kind][0] += delta**2
            squared[kind][1] += reference**2
            update += (weight.double() - self._previous[name].double()).norm().item() ** 2
        for kind in ("k", "v"):
            metrics[f"drift/{kind}_total"] = (squared[kind][0] / squared[kind][1]) ** 0.5
        metrics["drift/total"] = ((squared["k"][0] + squared["v"][0]) / (squared["k"][1] + squared["v"][1])) ** 0.5
        metrics["drift/update_norm"] = update**0.5
        for concept, derived in pl_module.derived_embeddings().items():
            metrics[f"drift/derived_norm/{concept}"] = derived.double().norm().item()
            metrics[f"drift/concept_norm/{concept}"] = pl_module.encoded([concept])[0].embedding.double().norm().item()
        metrics["drift/preservation"] = self._preservation(pl_module, original, current)

        step = pl_module.rece_epochs_done
        self.history = [h for h in self.history if h["state"] != step]
        self.history.append(
            {"state": step, "drift": metrics["drift/total"], "preservation": metrics["drift/preservation"]}
        )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            add_histogram = getattr(logger.experiment, "add_histogram", None)
            if add_histogram is not None:
                for kind, values in per_kind.items():
                    add_histogram(f"drift/{kind}_per_layer", torch.tensor(values), global_step=step)
        self._previous = {name: w.clone() for name, w in current.items()}

    def _preservation(self, pl_module, original: dict[str, Tensor], current: dict[str, Tensor]) -> float:
        rows = torch.stack([e.embedding for e in pl_module.encoded(self.preservation_prompts)]).double()
        ratios = []
        for name, weight in current.items():
            before = rows @ original[name].double().T
            after = rows @ weight.double().T
            ratios.append(((after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1)).mean())
        return torch.stack(ratios).mean().item()
