"""A yardstick, not project code: RECE written the way the authors' reference code does it.

Per K/V matrix: loop over all matrices to recompute the destination values, re-run the text encoder for the preserve
prompts inside the layer loop, build the two d x d factors and take an explicit ``torch.inverse``. The embedding
derivation (Eq. 8) also inverts explicitly. Only ``benchmarks/bench_erase.py`` uses it, to show what the project's
shared-transform algebra saves; its results agree with the project's to float64 rounding.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def _encode(pipeline, texts):
    tokens = pipeline.tokenizer(
        texts,
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    hidden = pipeline.text_encoder(tokens.input_ids.to(pipeline.text_encoder.device))[0]
    return hidden, tokens.attention_mask


@torch.no_grad()
def _edit(projections, pipeline, sources, targets, retain_texts, lamb, erase_scale, preserve_scale, dtype):
    """The reference ``edit_model``: one layer at a time, every layer's values recomputed inside the loop."""
    for layer_num in range(len(projections)):
        weight = projections[layer_num].weight
        mat1 = lamb * weight.to(dtype)
        mat2 = lamb * torch.eye(weight.shape[1], device=weight.device, dtype=dtype)
        for source, target in zip(sources, targets, strict=True):
            values = [layer(target.to(layer.weight.dtype)).to(dtype) for layer in projections]
            context = source.to(dtype)
            mat1 += erase_scale * (values[layer_num].unsqueeze(2) @ context.unsqueeze(1)).sum(dim=0)
            mat2 += erase_scale * (context.unsqueeze(2) @ context.unsqueeze(1)).sum(dim=0)
        for text in retain_texts:
            hidden, _ = _encode(pipeline, [text, text])
            kept, kept_target = hidden[0], hidden[1]
            values = [layer(kept_target.to(layer.weight.dtype)).to(dtype) for layer in projections]
            context = kept.to(dtype)
            mat1 += preserve_scale * (values[layer_num].unsqueeze(2) @ context.unsqueeze(1)).sum(dim=0)
            mat2 += preserve_scale * (context.unsqueeze(2) @ context.unsqueeze(1)).sum(dim=0)
        projections[layer_num].weight = torch.nn.Parameter((mat1 @ torch.inverse(mat2)).to(weight.dtype))


@torch.no_grad()
def straightforward_rece(
    pipeline,
    projections,
    originals,
    concepts: str | list[str],
    guide: str,
    *,
    epochs: int,
    lamb: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 0.1,
    reg: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> None:
    """UCE then ``epochs`` derive-erase rounds of all ``concepts`` (each to ``guide``), editing the ``projections``
    (nn.Linear list) in place; the guide is preserved once per concept, as in the reference code."""
    # The reference code's algebra runs in float32 for a half-precision model (torch.inverse has no half kernels).
    dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    retain = [guide] * len(concepts)
    sources, targets = [], []
    for concept in concepts:
        hidden, mask = _encode(pipeline, [concept, guide])
        start, start_guide = int(mask[0].sum()) - 2, int(mask[1].sum()) - 2
        farthest = max(start, start_guide)
        length = hidden.shape[1]
        sources.append(hidden[0][start : length - max(0, farthest - start)])
        targets.append(hidden[1][start_guide : length - max(0, farthest - start_guide)])
    _edit(projections, pipeline, sources, targets, retain, lamb, erase_scale, preserve_scale, dtype)
    for _ in range(epochs):
        guide_embedding, _ = _encode(pipeline, [guide])
        dim = projections[0].weight.shape[1]
        mat1 = torch.eye(dim, device=guide_embedding.device, dtype=dtype) * reg
        mat2 = torch.zeros(dim, dim, device=guide_embedding.device, dtype=dtype)
        for layer, original in zip(projections, originals, strict=True):
            new = layer.weight.to(dtype)
            mat1 = mat1 + new.T @ new
            mat2 = mat2 + new.T @ original.to(dtype)
        derived = []
        for concept in concepts:
            concept_embedding, _ = _encode(pipeline, [concept])
            derived.append(concept_embedding[0].to(dtype) @ (torch.inverse(mat1) @ mat2).T)
        targets = [guide_embedding[0]] * len(concepts)
        _edit(projections, pipeline, derived, targets, retain, lamb, erase_scale, preserve_scale, dtype)
