"""What depends only on the base model, computed once: the Gram matrix G = sum W^T W of Eq. 8 and prompt encodings.

λ sweeps, several concepts erased in turn and restarts all start from the same base model; recomputing G (0.27 s of a
0.9 s erasure on SD-1.4 shapes, several seconds on SDXL's) and re-running the text encoder is wasted work. Entries
are keyed by a sha256 of the base model's cross-attention K/V weights (names, dtypes, shapes, bytes: 0.03 s for SD
1.4's 77 MB on 2 cores), kept in memory for the life of the process and, given a ``cache_dir``, on disk across runs
(``<cache_dir>/<key[:24]>/gram.safetensors`` and ``encodings/<sha256(prompt)>.safetensors``).

Once a module has given the U-Net's K/V storage of their own (its first write), the memory entry also keeps the base
K/V it holds, so that the next module on the same base writes the parameters in place
(:meth:`BaseModelCache.base_weights`); :func:`clear_memory` lets all of it go.

Encodings assume the base model's own text encoder(s): the key covers the K/V weights, the text encoder's class,
config and dtype, not its weights (hashing CLIP ViT-L would cost twice what encoding a prompt does).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from rece_lightning.export import kv_digest
from rece_lightning.families import EncodedPrompt, family_of
from rece_lightning.files import atomic_write

__all__ = ["BaseModelCache", "clear_memory", "kv_fingerprint"]

# key -> {"gram": Tensor, "encodings": {prompt: EncodedPrompt}, "weights": {name: Tensor} | None}
_MEMORY: OrderedDict[str, dict] = OrderedDict()
# Base models kept in memory at once: an entry holds G, the encodings (SDXL with 1000 of them: ~1.3 GB) and, once a
# module has written its K/V, a copy of the base K/V (SD 1.4 in float32: 77 MB; SDXL in float16: 0.7 GB).
MEMORY_MODELS = 2


def clear_memory() -> None:
    """Forget every base model kept in memory (G, encodings, base K/V); the disk cache stays."""
    _MEMORY.clear()


def kv_fingerprint(weights: Mapping[str, Tensor]) -> str:
    """sha256 over the K/V weights' names, dtypes, shapes and the sha256 of each one's bytes, in name order.

    The per-matrix digests run on ``torch.get_num_threads()`` threads (hashlib releases the GIL): SDXL's 1.4 GB of
    K/V in about half the time of one sequential sha256 on 2 cores. Keys this cache and names the evaluation's image
    sets (the identity an export records is :func:`~rece_lightning.export.kv_identity`, unchanged).
    """
    names = sorted(weights)
    tensors = [weights[name].detach().to("cpu").contiguous() for name in names]

    def digest(tensor: Tensor) -> str:
        data = memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else b""
        return hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(max_workers=max(1, min(torch.get_num_threads(), len(tensors)))) as pool:
        digests = list(pool.map(digest, tensors))
    lines = [f"{n}|{t.dtype}|{tuple(t.shape)}|{d}" for n, t, d in zip(names, tensors, digests, strict=True)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _encoder_signature(pipeline) -> str:
    """The encoding networks' classes, configs and dtypes (a network without a config, PixArt's caption projection,
    by its weights: it is small)."""
    parts = []
    for name, module in family_of(pipeline).encoding_modules(pipeline).items():
        config = getattr(module, "config", None)
        if config is not None:
            settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
            described = json.dumps(settings, sort_keys=True, default=str)
        else:
            described = kv_digest(dict(module.state_dict()))
        dtype = next(module.parameters()).dtype
        parts.append(f"{name}|{type(module).__name__}|{dtype}|{described}")
    return hashlib.sha256("||".join(parts).encode()).hexdigest()


class BaseModelCache:
    """G and prompt encodings of one base model (its K/V weights as given), from memory, disk, or computed once."""

    def __init__(self, kv_weights: Mapping[str, Tensor], cache_dir: str | os.PathLike | None = None) -> None:
        self.key = kv_fingerprint(kv_weights)
        self.folder = Path(cache_dir).expanduser() / self.key[:24] if cache_dir is not None else None
        self._entry = _MEMORY.setdefault(self.key, {"gram": None, "encodings": {}, "weights": None})
        _MEMORY.move_to_end(self.key)
        while len(_MEMORY) > MEMORY_MODELS:
            _MEMORY.popitem(last=False)
        self.hits = {"gram": "computed", "encodings": 0}

    def gram(self, compute: Callable[[], Tensor]) -> Tensor:
        """G from memory, else from disk, else ``compute()`` (then stored in both)."""
        path = self.folder / "gram.safetensors" if self.folder is not None else None
        if self._entry["gram"] is not None:
            self.hits["gram"] = "memory"
            if path is not None and not path.is_file():  # found in memory under another cache_dir: keep it here too
                self._write_gram(path, self._entry["gram"])
            return self._entry["gram"]
        if path is not None and path.is_file():
            with safe_open(str(path), framework="pt") as handle:
                if handle.metadata().get("kv_hash") == self.key:
                    self._entry["gram"] = handle.get_tensor("gram")
                    self.hits["gram"] = "disk"
                    return self._entry["gram"]
        gram = compute()
        self._entry["gram"] = gram
        if path is not None:
            self._write_gram(path, gram)
        return gram

    def base_weights(self, live: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """A copy of the base K/V that an earlier module on this base model kept (:meth:`keep_base_weights`), if it can
        stand in for ``live`` (the weights this cache was keyed by): same names, shapes, dtypes and devices, and no
        tensor sharing storage with ``live``'s, so that ``live`` may be written in place while it keeps the base.

        A fit on the same base again (a λ sweep, the next concept, a benchmark's repetition) then writes its K/V into
        the parameters' own storage instead of giving them fresh storage: on 2 CPU cores, the page faults of SD 1.4's
        77 MB of fresh storage cost about as much as the write's arithmetic.
        """
        kept = self._entry.get("weights")
        if kept is None or kept.keys() != live.keys():
            return None
        for name, weight in live.items():
            base = kept[name]
            if (base.shape, base.dtype, base.device) != (weight.shape, weight.dtype, weight.device):
                return None
            if base.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
                return None
        return dict(kept)

    def keep_base_weights(self, weights: Mapping[str, Tensor]) -> None:
        """Keep ``weights`` (this base model's K/V, in storage no module ever writes) for :meth:`base_weights`."""
        self._entry["weights"] = dict(weights)

    def _write_gram(self, path: Path, gram: Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu = gram.detach().to("cpu").contiguous()
        atomic_write(path, lambda tmp: save_file({"gram": cpu}, tmp, metadata={"kv_hash": self.key}))

    def encodings(
        self, pipeline, prompts: Sequence[str], encode: Callable[[list[str]], list[EncodedPrompt]]
    ) -> list[EncodedPrompt]:
        """``prompts``' encodings, encoding (in one batched ``encode`` call) only those found nowhere."""
        namespace = _encoder_signature(pipeline)
        known: dict[str, EncodedPrompt] = self._entry["encodings"].setdefault(namespace, {})
        folder = self.folder / "encodings" / namespace[:16] if self.folder is not None else None
        missing = []
        for prompt in dict.fromkeys(prompts):
            if prompt in known:
                if folder is not None and not self._file(folder, prompt).is_file():
                    self._write(folder, prompt, known[prompt])
                continue
            loaded = self._read(folder, prompt) if folder is not None else None
            if loaded is None:
                missing.append(prompt)
            else:
                known[prompt] = loaded
        self.hits["encodings"] += len(set(prompts)) - len(missing)
        if missing:
            for prompt, encoded in zip(missing, encode(missing), strict=True):
                known[prompt] = encoded
                if folder is not None:
                    self._write(folder, prompt, encoded)
        return [known[prompt] for prompt in prompts]

    @staticmethod
    def _file(folder: Path, prompt: str) -> Path:
        return folder / f"{hashlib.sha256(prompt.encode()).hexdigest()[:32]}.safetensors"

    def _read(self, folder: Path, prompt: str) -> EncodedPrompt | None:
        path = self._file(folder, prompt)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            if metadata.get("prompt") != prompt:
                return None
            pooled = handle.get_tensor("pooled") if "pooled" in handle.keys() else None  # noqa: SIM118
            return EncodedPrompt(handle.get_tensor("embedding"), int(metadata["length"]), pooled)

    @staticmethod
    def _write(folder: Path, prompt: str, encoded: EncodedPrompt) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"embedding": encoded.embedding.detach().to("cpu").contiguous()}
        if encoded.pooled is not None:
            tensors["pooled"] = encoded.pooled.detach().to("cpu").contiguous()
        metadata = {"prompt": prompt, "length": str(encoded.length)}
        atomic_write(BaseModelCache._file(folder, prompt), lambda tmp: save_file(tensors, tmp, metadata=metadata))
