"""How long a whole RECE erasure takes next to one U-Net denoising step, on SD-1.4 shapes with random weights.

    python benchmarks/bench_erase.py --reps 3 --device cpu      # prints one JSON object

Times (min and median over repetitions):
  * ``erase``: the project's public path (``RECEModule.attach_pipeline`` + ``erase``): Gram matrix of the original
    K/V, text encoding, the preliminary UCE edit, 5 RECE epochs, weights written into the U-Net. Loading excluded.
  * ``unet_step``: one U-Net forward on 64x64 latents, batch 2 (one classifier-free-guidance step at 512 px).
  * ``straightforward``: the same algorithm written as the reference code does (``straightforward_rece.py``).
Then both implementations run once more in float64 and their final K/V weights are compared, and the extra memory of
the erasure beyond the loaded model is measured (CPU: peak resident set size; CUDA: peak allocated).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the yardstick lives beside this script

from straightforward_rece import straightforward_rece  # noqa: E402

from rece_lightning import RECEModule, diffusion  # noqa: E402

CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "clip-tokenizer"


def build_sd14_shaped_pipeline(device: str, dtype: torch.dtype, tokenizer: Path | None):
    """SD 1.4's U-Net (320/640/1280/1280, cross-attention 768) and a CLIP ViT-L/14-shaped text encoder, random."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    if tokenizer is None:
        folder = Path(tempfile.mkdtemp()) / "tokenizer-source"
        diffusion.train_small_bpe(folder)
        tokenizer = folder
    clip_tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32)  # never used by the erasure
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for component in (unet, text_encoder, vae):
        component.requires_grad_(False).eval()
    return pipeline.to(device=device, dtype=dtype)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int, reset=None) -> list[float]:
    times = []
    for _ in range(reps):
        if reset is not None:
            reset()
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"min_s": min(times), "median_s": statistics.median(times), "reps": len(times)}


class PeakResidentMemory:
    """Samples this process's resident set size every millisecond (CPU tensors are invisible to tracemalloc)."""

    def __init__(self) -> None:
        self.peak = self.baseline = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the fast erasure and the U-Net step")
    parser.add_argument("--slow-reps", type=int, default=1, help="repetitions of the straightforward yardstick")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tokenizer", type=Path, default=CLIP_TOKENIZER if CLIP_TOKENIZER.is_dir() else None)
    parser.add_argument("--skip-compare", action="store_true", help="skip the float64 agreement run")
    args = parser.parse_args()
    if args.reps < 1 or args.slow_reps < 1:
        parser.error(f"--reps={args.reps} / --slow-reps={args.slow_reps}: both must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")

    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    dtype_name = {torch.float16: "float16", torch.float32: "float32"}[dtype]
    pipeline = build_sd14_shaped_pipeline(device, dtype, args.tokenizer)
    projections = diffusion.cross_attention_kv(pipeline.unet)
    originals = {f"{n}.weight": p.weight.detach().clone() for n, p in projections.items()}

    def restore() -> None:
        diffusion.write_kv_weights(pipeline.unet, originals)

    def fast() -> RECEModule:
        module = RECEModule("random/sd-1.4-shaped", erase_concepts=["nudity"], dtype=dtype_name)
        module.attach_pipeline(pipeline)
        module.erase(args.epochs)
        return module

    # Memory first, on a fresh state, before any timing warms caches.
    restore()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fast()
        torch.cuda.synchronize()
        extra_memory = torch.cuda.max_memory_allocated() - before
    else:
        with PeakResidentMemory() as memory:
            fast()
        extra_memory = memory.peak - memory.baseline

    erase_times = timed(fast, device, args.reps, reset=restore)

    latents = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
    context = torch.randn(2, 77, 768, device=device, dtype=dtype)
    timestep = torch.tensor(500, device=device)
    with torch.no_grad():
        pipeline.unet(latents, timestep, encoder_hidden_states=context)  # warm-up
        unet_times = timed(lambda: pipeline.unet(latents, timestep, encoder_hidden_states=context), device, args.reps)

    linears = list(projections.values())
    original_list = list(originals.values())
    slow_times = timed(
        lambda: straightforward_rece(pipeline, linears, original_list, "nudity", " ", epochs=args.epochs, dtype=dtype),
        device,
        args.slow_reps,
        reset=restore,
    )

    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": dtype_name,
        "epochs": args.epochs,
        "kv_matrices": len(projections),
        "erase": summary(erase_times),
        "unet_step": summary(unet_times),
        "straightforward": summary(slow_times),
        "erase_over_unet_step": min(erase_times) / min(unet_times),
        "straightforward_over_fast": min(slow_times) / min(erase_times),
        "erase_extra_memory_mb": extra_memory / 2**20,
    }

    if not args.skip_compare:
        # Both implementations again in float64 on float64 copies of the K/V layers: only the algebra differs.
        restore()
        for linear in linears:
            linear.double()
        float64_originals = {name: w.double() for name, w in originals.items()}
        diffusion.write_kv_weights(pipeline.unet, float64_originals)
        module = RECEModule("random/sd-1.4-shaped", erase_concepts=["nudity"], dtype="float64")
        module.attach_pipeline(pipeline)
        module.erase(args.epochs)
        fast_weights = {name: w.clone() for name, w in module.kv_state().items()}
        diffusion.write_kv_weights(pipeline.unet, float64_originals)
        straightforward_rece(
            pipeline, linears, list(float64_originals.values()), "nudity", " ", epochs=args.epochs, dtype=torch.float64
        )
        slow_weights = diffusion.kv_weights(pipeline.unet)
        result["max_relative_weight_difference_float64"] = max(
            float((fast_weights[n] - slow_weights[n]).abs().max() / slow_weights[n].abs().max()) for n in fast_weights
        )

    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
