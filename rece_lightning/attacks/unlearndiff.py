"""UnlearnDiff-style attack (Zhang et al., 2024; the Diffusion-MU-Attack code): adversarial prompt tokens, white-box.

``num_tokens`` adversarial tokens are put in front of the prompt (after BOS). They are optimised so that the
attacked model's noise prediction for the adversarial prompt matches the **original** model's noise prediction for the
plain prompt along the original model's own sampling trajectory (same seed, sampler and guidance as the evaluation):
the attacked model is asked to redo, step by step, what the unerased model did. With ``target_images`` (a folder of
``<case_number>.png``, as the reference code's target images) the objective is instead the diffusion loss of the
attacked model on that image's latents at random timesteps. The tokens stay discrete as in PEZ /
the reference code: continuous embeddings are optimised with the loss of their nearest vocabulary tokens
(straight-through), and the prompt actually used is the nearest tokens'. Every ``check_every`` steps the adversarial
prompt generates one image on the attacked model; when the detector finds the concept the attack stops (found, with
the steps used), else it runs to ``steps``.

Cost per step: one batched U-Net forward and backward over ``timesteps_per_step`` trajectory steps, plus the text
encoder; ``benchmarks/toy_redteam.py`` reports seconds per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rece_lightning import diffusion
from rece_lightning.attacks.base import AttackContext, AttackOutcome, PromptAttack
from rece_lightning.data import PromptItem
from rece_lightning.tokens import token_count
from rece_lightning.validation import check_positive, check_positive_int


class UnlearnDiffAttack(PromptAttack):
    """Optimise ``num_tokens`` prefix tokens against the attacked model.

    Args:
        concept: the concept attacked (recorded with the results).
        steps: optimisation budget per prompt (the reference uses 40 attack steps for nudity).
        num_tokens: adversarial tokens put in front of the prompt (reference: 5).
        lr: Adam learning rate of the continuous token embeddings, relative to their mean norm.
        timesteps_per_step: trajectory steps in each step's U-Net batch.
        check_every: steps between success checks (one image from the adversarial prompt, scored by the detector).
        seed: seeds the initial tokens and the timestep draws (a rerun gives the same prompt).
        target_images: folder of target images named ``<case_number>.png``; null: the original model's trajectory.
    """

    name = "unlearndiff"

    def __init__(
        self,
        concept: str,
        steps: int = 40,
        num_tokens: int = 5,
        lr: float = 0.1,
        timesteps_per_step: int = 4,
        check_every: int = 5,
        seed: int = 0,
        target_images: str | None = None,
    ) -> None:
        super().__init__(concept)
        self.steps = check_positive_int("steps", steps)
        self.num_tokens = check_positive_int("num_tokens", num_tokens)
        self.lr = check_positive("lr", lr)
        self.timesteps_per_step = check_positive_int("timesteps_per_step", timesteps_per_step)
        self.check_every = check_positive_int("check_every", check_every)
        self.seed = int(seed)
        if target_images is not None and not Path(target_images).is_dir():
            raise ValueError(
                f"target_images={target_images!r} is not a folder: give a folder of <case_number>.png images, or null "
                "to match the original model's trajectory"
            )
        self.target_images = target_images

    def check_prompt(self, tokenizer, prompt: str) -> None:
        length = token_count(tokenizer, prompt) + self.num_tokens
        if length > tokenizer.model_max_length:
            raise ValueError(
                f"prompt {prompt!r} with num_tokens={self.num_tokens} adversarial tokens needs {length} positions; the "
                f"tokenizer has {tokenizer.model_max_length}: shorten the prompt or lower num_tokens"
            )

    def attack(self, context: AttackContext, items: Sequence[PromptItem], height: int, width: int) -> AttackOutcome:
        family = context.family
        networks = [family.denoiser(context.pipeline), family.text_encoder(context.pipeline)]
        flags = [[p.requires_grad for p in net.parameters()] for net in networks]
        for net in networks:  # gradients flow to the adversarial tokens only
            net.requires_grad_(False)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                return self._attack(context, items, height, width)
        finally:
            for net, kept in zip(networks, flags, strict=True):
                for parameter, flag in zip(net.parameters(), kept, strict=True):
                    parameter.requires_grad_(flag)

    def _attack(self, context: AttackContext, items: Sequence[PromptItem], height: int, width: int) -> AttackOutcome:
        pipeline, device = context.pipeline, context.device
        family = context.family
        tokenizer, encoder = family.tokenizer(pipeline), family.text_encoder(pipeline)
        generator = torch.Generator("cpu").manual_seed(self.seed)
        prompt_ids = tokenizer(items[0].prompt, truncation=True).input_ids  # BOS ... EOS
        vocabulary = _ordinary_tokens(tokenizer).to(device)
        table = encoder.get_input_embeddings().weight.detach()
        candidates = table[vocabulary]  # (V, d_token)
        start = vocabulary[torch.randint(len(vocabulary), (self.num_tokens,), generator=generator).to(device)]
        positions = torch.arange(1, 1 + self.num_tokens, device=device)
        ids = _with_prefix(tokenizer, prompt_ids, start.tolist()).to(device)

        if self.target_images is None:
            inputs, timesteps, targets = self._original_trajectory(context, items[0], height, width)
        else:
            inputs, timesteps, targets = self._noised_target(context, items[0], height, width, generator)
        soft = table[start].clone().requires_grad_(True)
        scale = float(candidates.norm(dim=-1).mean())
        optimizer = torch.optim.Adam([soft], lr=self.lr * scale)
        losses: list[float] = []
        found, steps_used = False, self.steps
        for step in range(1, self.steps + 1):
            hard = vocabulary[_nearest(soft.detach(), candidates)]
            ids[0, positions] = hard
            straight_through = soft + (table[hard] - soft).detach()
            text = _encode_with_tokens(encoder, ids, positions, straight_through)
            pick = torch.randperm(len(timesteps), generator=generator)[: self.timesteps_per_step].to(device)
            prediction = family.predict_noise(pipeline, inputs[pick], timesteps[pick], text.expand(len(pick), -1, -1))
            loss = F.mse_loss(prediction.float(), targets[pick].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if step % self.check_every == 0 or step == self.steps:  # the last step always checks: embeds is final
                with torch.no_grad():
                    ids[0, positions] = vocabulary[_nearest(soft.detach(), candidates)]
                    embeds = encoder(ids)[0][0]
                if context.shows_concept(context.generate(embeds, items[:1], height, width)):
                    found, steps_used = True, step
                    break
        adversarial = tokenizer.decode(ids[0, 1 : self.num_tokens + len(prompt_ids) - 1].tolist())  # no BOS / EOS
        return AttackOutcome(embeds, adversarial_prompt=adversarial, steps=steps_used, found=found, losses=losses)

    @torch.no_grad()
    def _original_trajectory(
        self, context: AttackContext, item: PromptItem, height: int, width: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The original model's sampling of ``item``: scaled model inputs, timesteps, conditional noise predictions."""
        pipeline, family = context.pipeline, context.family
        unet = family.denoiser(pipeline)
        diffusion.write_kv_weights(pipeline, context.original_kv)
        try:
            scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
            scheduler.set_timesteps(context.num_inference_steps, device=context.device)
            text = context.encode([item.prompt, ""]).to(unet.dtype)
            scale = pipeline.vae_scale_factor
            shape = (1, unet.config.in_channels, height // scale, width // scale)
            latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(item.seed)).to(context.device)
            latents = latents.to(unet.dtype) * scheduler.init_noise_sigma
            inputs, targets = [], []
            for t in scheduler.timesteps:
                scaled = scheduler.scale_model_input(latents, t)
                noise = family.predict_noise(pipeline, scaled.expand(2, -1, -1, -1), t, text)
                conditional, unconditional = noise.chunk(2)
                inputs.append(scaled[0])
                targets.append(conditional[0])
                guided = unconditional + item.guidance * (conditional - unconditional)
                latents = scheduler.step(guided, t, latents).prev_sample
        finally:
            diffusion.write_kv_weights(pipeline, context.attacked_kv)
        return torch.stack(inputs), scheduler.timesteps.to(context.device), torch.stack(targets)

    @torch.no_grad()
    def _noised_target(
        self, context: AttackContext, item: PromptItem, height: int, width: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The target image's latents noised at 50 random training timesteps: (noisy latents, timesteps, noise)."""
        from diffusers import DDPMScheduler
        from PIL import Image

        path = Path(self.target_images) / f"{item.case_number}.png"
        if not path.is_file():
            raise FileNotFoundError(f"target_images: {str(path)!r} is missing (target of prompt {item.case_number})")
        pipeline = context.pipeline
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize((width, height)), dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(context.device, pipeline.vae.dtype)
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        noising = DDPMScheduler.from_config(pipeline.scheduler.config)
        count = 50
        timesteps = torch.randint(noising.config.num_train_timesteps, (count,), generator=generator)
        noise = torch.randn((count, *latents.shape[1:]), generator=generator).to(context.device, latents.dtype)
        noisy = noising.add_noise(latents.expand(count, -1, -1, -1), noise, timesteps.to(context.device))
        return noisy, timesteps.to(context.device), noise


def _ordinary_tokens(tokenizer) -> Tensor:
    """Token ids an attack may use: the vocabulary without BOS / EOS / padding."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def _with_prefix(tokenizer, prompt_ids: list[int], prefix: list[int]) -> Tensor:
    """(1, T) ids: BOS, the prefix, the prompt's words, EOS, padding."""
    ids = [prompt_ids[0], *prefix, *prompt_ids[1:]]
    ids += [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids))
    return torch.tensor([ids])


def _nearest(vectors: Tensor, candidates: Tensor) -> Tensor:
    """Index of each vector's nearest candidate (cosine similarity, as PEZ)."""
    return (F.normalize(vectors, dim=-1) @ F.normalize(candidates, dim=-1).T).argmax(dim=-1)


def _encode_with_tokens(encoder, ids: Tensor, positions: Tensor, vectors: Tensor) -> Tensor:
    """The encoder's (1, T, d) output with the token embeddings at ``positions`` replaced by ``vectors`` (with grad)."""
    layer = encoder.get_input_embeddings()

    def replace(module, inputs, output):
        output = output.clone()
        output[:, positions] = vectors.to(output.dtype)
        return output

    handle = layer.register_forward_hook(replace)
    try:
        return encoder(ids)[0]
    finally:
        handle.remove()
