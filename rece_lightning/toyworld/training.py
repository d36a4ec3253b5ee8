"""Train the toy text-to-image model from scratch: ``python -m rece_lightning.toyworld.training --output DIR``.

Two real Lightning runs on procedurally rendered scenes (:mod:`rece_lightning.toyworld.world`):

1. ``VAETraining``: the ``AutoencoderKL`` learns to reconstruct 32 px scenes (MSE + a small KL term, as SD's VAE).
2. ``LatentDiffusionTraining``: the ``UNet2DConditionModel`` learns to predict the noise added to the scenes'
   latents (DDPM, Stable Diffusion's beta schedule), conditioned on the text encoder's output for each scene's
   caption (the encoder frozen at its random initialisation by default), with 10 % of captions dropped to "" so that
   classifier-free guidance works, and a share of the grey (unnamed-colour) scenes conditioned on the all-zero
   embedding, so that the model draws its default object there, as Eq. 7's regularisation of c' towards 0 assumes;
   an EMA of the weights is what gets saved.

The result is a standard ``StableDiffusionPipeline`` folder (``save_pretrained``, safetensors) plus ``toyworld.json``
(training settings, timings, and how well the model follows its prompts by the world's detectors). Everything is
seeded; the defaults take about 26 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from rece_lightning.toyworld import model as toy_model
from rece_lightning.toyworld import world


def render_dataset(count: int, seed: int) -> tuple[Tensor, list[str], Tensor]:
    """``count`` scenes of world ``seed``: images as float (N, 3, 32, 32) in [-1, 1], their captions, and whether
    each object is grey (the world's unnamed colour)."""
    samples = [world.sample(seed, index) for index in range(count)]
    images = np.stack([s.image for s in samples]).astype(np.float32) / 127.5 - 1.0
    neutral = torch.tensor([s.scene.colour == world.NEUTRAL for s in samples])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [s.prompt for s in samples], neutral


class VAETraining(pl.LightningModule):
    """Reconstruction training of an ``AutoencoderKL``: MSE plus ``kl_weight`` times the posterior's KL."""

    def __init__(self, vae: torch.nn.Module, lr: float = 1e-3, kl_weight: float = 1e-6) -> None:
        super().__init__()
        self.vae = vae
        self.lr = lr
        self.kl_weight = kl_weight

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (images,) = batch
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, images)
        loss = mse + self.kl_weight * posterior.kl().mean()
        self.log_dict({"vae/mse": mse, "vae/loss": loss}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)


class LatentDiffusionTraining(pl.LightningModule):
    """Noise-prediction training of a ``UNet2DConditionModel`` under a ``CLIPTextModel``, on fixed latents.

    Args:
        unet: the U-Net to train.
        text_encoder: the text encoder. Frozen at its random initialisation when ``text_lr`` is 0 (the default), as
            Stable Diffusion trains its U-Net under a frozen CLIP: then the words of one colour ("red", "crimson",
            "the colour of blood") keep embeddings of their own, which the U-Net learns to read alike, and erasing
            one of them leaves the others something to find. Trained with the U-Net, the encoder maps them onto one
            direction (an earlier toy model: cosine 0.94 between "a red circle" and "a crimson circle"), so that an
            edit of "red" erases every synonym and no attack finds anything.
        caption_ids: (P, T) token ids, one row per distinct caption; ``empty_index`` is the row of "".
        scaling_factor: the VAE latent scaling (1 / std of the latents), as ``vae.config.scaling_factor``.
        lr: AdamW learning rate of the U-Net (linear warm-up over ``warmup_steps``); ``text_lr`` the encoder's.
        cfg_dropout: share of captions replaced by "" (classifier-free guidance).
        null_share: share of the grey scenes conditioned on the all-zero embedding instead of their caption (Eq. 7
            regularises c' towards 0; in Stable Diffusion an embedding near 0 draws nothing harmful, and a model
            that never saw 0 may draw anything there: an earlier toy model drew red there 96 % of the time).
        snr_gamma: Min-SNR-γ loss weighting (Hang et al. 2023, diffusers' ``--snr_gamma``): steps with a
            signal-to-noise ratio above γ count γ / SNR, so training spends itself on the noisy steps where colour and
            shape are decided; None for the plain noise-prediction MSE.
        ema_decay: decay of the exponential moving average of the weights (what gets saved).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        caption_ids: Tensor,
        empty_index: int,
        scaling_factor: float,
        lr: float = 1e-3,
        text_lr: float = 0.0,
        warmup_steps: int = 100,
        cfg_dropout: float = 0.1,
        null_share: float = 0.2,
        snr_gamma: float | None = 5.0,
        ema_decay: float = 0.998,
    ) -> None:
        super().__init__()
        if text_lr == 0:
            text_encoder.eval().requires_grad_(False)
        else:
            text_encoder.train()
        self.networks = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
        # A list keeps the EMA copy out of the optimiser and the checkpoint.
        self.ema = [copy.deepcopy(self.networks).requires_grad_(False)]
        self.register_buffer("caption_ids", caption_ids)
        self.empty_index = empty_index
        self.scaling_factor = scaling_factor
        self.noise_scheduler = toy_model.training_scheduler()
        self.lr, self.text_lr, self.warmup_steps = lr, text_lr, warmup_steps
        self.cfg_dropout, self.null_share, self.ema_decay = cfg_dropout, null_share, ema_decay
        self.snr_gamma = snr_gamma

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        mean, std, prompt_index, neutral = batch
        latents = (mean + std * torch.randn_like(std)) * self.scaling_factor
        noise = torch.randn_like(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        dropped = torch.rand(prompt_index.shape, device=prompt_index.device) < self.cfg_dropout
        prompt_index = torch.where(dropped, torch.full_like(prompt_index, self.empty_index), prompt_index)
        text = self.networks["text_encoder"](self.caption_ids[prompt_index])[0]
        null = neutral & ~dropped & (torch.rand(neutral.shape, device=neutral.device) < self.null_share)
        text = torch.where(null[:, None, None], torch.zeros_like(text), text)
        prediction = self.networks["unet"](noisy, timesteps, encoder_hidden_states=text).sample
        per_image = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma is None:
            loss = per_image.mean()
        else:
            snr = compute_snr(self.noise_scheduler, timesteps)
            loss = (per_image * torch.clamp(snr, max=self.snr_gamma) / snr).mean()
        self.log("unet/loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        ema = list(self.ema[0].parameters())
        torch._foreach_lerp_(ema, list(self.networks.parameters()), 1.0 - self.ema_decay)

    def on_fit_start(self) -> None:
        self.ema[0].to(self.device)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            [
                {"params": self.networks["unet"].parameters(), "lr": self.lr},
                *([{"params": self.networks["text_encoder"].parameters(), "lr": self.text_lr}] if self.text_lr else []),
            ],
            weight_decay=0.0,
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def _trainer(max_steps: int, log_dir: Path, name: str) -> pl.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return pl.Trainer(
        max_steps=max_steps,
        accelerator="auto",
        devices=1,
        logger=TensorBoardLogger(log_dir, name=name),
        enable_checkpointing=False,
        log_every_n_steps=25,
        enable_model_summary=False,
    )


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """The VAE posterior's mean and standard deviation of every image."""
    vae.eval()
    means, stds = [], []
    for start in range(0, images.shape[0], batch_size):
        posterior = vae.encode(images[start : start + batch_size].to(vae.device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def tokenize_captions(tokenizer, captions: list[str]) -> Tensor:
    """(P, T) token ids, padded to the tokenizer's length as the pipeline pads them."""
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    return tokens.input_ids


def train_toy_model(
    output: str | Path,
    *,
    seed: int = 0,
    num_scenes: int = 40_000,
    vae_steps: int = 500,
    unet_steps: int = 6_000,
    batch_size: int = 64,
    log_dir: str | Path = "runs/toyworld",
    measure_images: int = 4,
    text_lr: float = 0.0,
    text_width: int = toy_model.TEXT_WIDTH,
) -> dict:
    """Train the whole toy model, save it to ``output`` and return what ``toyworld.json`` records."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    pl.seed_everything(seed, workers=True)
    components = toy_model.build_components(seed, text_width=text_width)
    images, captions, neutral = render_dataset(num_scenes, seed)
    timings["render_s"] = time.perf_counter() - started

    mark = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    vae_data = DataLoader(TensorDataset(images), batch_size=batch_size, shuffle=True, generator=generator)
    _trainer(vae_steps, Path(log_dir), "vae").fit(VAETraining(components.vae), vae_data)
    vae = components.vae.cpu().eval().requires_grad_(False)
    mean, std = encode_latents(vae, images)
    scaling_factor = float(1.0 / (mean + std * torch.randn_like(std)).std())
    vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():
        reconstruction = vae.decode(mean[:512]).sample
    vae_mse = float(F.mse_loss(reconstruction, images[:512]))
    timings["vae_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    distinct = sorted(set(captions))
    caption_ids = tokenize_captions(components.tokenizer, [*distinct, ""])
    index = {caption: i for i, caption in enumerate(distinct)}
    prompt_index = torch.tensor([index[c] for c in captions])
    training = LatentDiffusionTraining(
        components.unet, components.text_encoder, caption_ids, len(distinct), scaling_factor, text_lr=text_lr
    )
    unet_data = DataLoader(
        TensorDataset(mean, std, prompt_index, neutral), batch_size=batch_size, shuffle=True, generator=generator
    )
    _trainer(unet_steps, Path(log_dir), "unet").fit(training, unet_data)
    trained = training.ema[0].cpu().eval()
    components.unet, components.text_encoder = trained["unet"], trained["text_encoder"]
    timings["unet_s"] = time.perf_counter() - mark

    folder = toy_model.save_pipeline(components, output)
    timings["total_training_s"] = time.perf_counter() - started
    card = {
        "what": "toy text-to-image model of the Stable Diffusion architecture, trained on rece_lightning.toyworld",
        "command": f"python -m rece_lightning.toyworld.training --output {output}",
        "seed": seed,
        "num_scenes": num_scenes,
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "batch_size": batch_size,
        "grey_share": world.NEUTRAL_SHARE,
        "null_embedding_share_of_grey": training.null_share,
        "text_encoder": "frozen at its random initialisation" if text_lr == 0 else f"trained, lr {text_lr:g}",
        "text_width": text_width,
        "min_snr_gamma": training.snr_gamma,
        "vae_scaling_factor": scaling_factor,
        "vae_reconstruction_mse": vae_mse,
        "parameters": {
            name: sum(p.numel() for p in part.parameters())
            for name, part in (("unet", components.unet), ("vae", vae), ("text_encoder", components.text_encoder))
        },
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "sampling": {
            "scheduler": "DDIMScheduler",
            "num_inference_steps": toy_model.NUM_INFERENCE_STEPS,
            "guidance_scale": toy_model.GUIDANCE_SCALE,
            "resolution": toy_model.RESOLUTION,
        },
    }
    if measure_images:
        from rece_lightning.diffusion import load_pipeline
        from rece_lightning.toyworld.measure import prompt_following

        card["prompt_following"] = prompt_following(load_pipeline(str(folder)), images_per_combination=measure_images)
    (folder / "toyworld.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write the pipeline to (save_pretrained)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-scenes", type=int, default=40_000)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--unet-steps", type=int, default=6_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--text-lr", type=float, default=0.0, help="text encoder learning rate (0: frozen)")
    parser.add_argument("--log-dir", default="runs/toyworld", help="TensorBoard logs of both training runs")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--text-width",
        type=int,
        default=toy_model.TEXT_WIDTH,
        help="the text encoder's width d (a multiple of its 4 heads; the shipped model: 128)",
    )
    args = parser.parse_args(argv)
    if args.text_width < 4 or args.text_width % 4:
        parser.error(f"--text-width={args.text_width} is not allowed: it must be a multiple of 4 (the encoder's heads)")
    for name in ("num_scenes", "vae_steps", "unet_steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        parser.error(f"--output={args.output!r} is a file: give a folder")
    torch.set_num_threads(args.threads)
    card = train_toy_model(
        output,
        seed=args.seed,
        num_scenes=args.num_scenes,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        batch_size=args.batch_size,
        log_dir=args.log_dir,
        text_lr=args.text_lr,
        text_width=args.text_width,
    )
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
