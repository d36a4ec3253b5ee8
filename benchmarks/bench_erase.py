"""How long a whole RECE erasure takes next to one U-Net denoising step, on SD-1.4 or SDXL shapes with random weights.

    python benchmarks/bench_erase.py --reps 3 --device cpu                      # SD-1.4 shapes, 1 concept
    python benchmarks/bench_erase.py --concepts 100 --skip-compare             # 100 concepts at once
    python benchmarks/bench_erase.py --model sdxl --concepts 1 --skip-compare  # SDXL shapes (d = 2048, 140 K/V)

Prints one JSON object. Times (``min`` / ``median`` seconds over repetitions):
  * ``erase``: the project's public path (``RECEModule.attach_pipeline`` + ``erase``) from a cold start: hash of the
    base K/V, Gram matrix, text encoding of the N concepts and the guide, the preliminary UCE edit, ``--epochs`` RECE
    epochs, weights written into the U-Net. Loading excluded.
  * ``erase_warm``: the same when G and the encodings are cached (a λ sweep, the next concept, a restart:
    ``rece_lightning.base_cache``), in memory; ``erase_warm_disk``: from the on-disk cache alone (a new process).
  * ``unet_step``: one U-Net forward, batch 2 (one classifier-free-guidance step): 64x64 latents for SD 1.4 (512 px),
    128x128 for SDXL (1024 px).
  * ``straightforward``: the same algorithm written as the reference code does (``straightforward_rece.py``); left out
    by ``--skip-compare`` (it takes ~100 s for one concept on SD-1.4 shapes, and grows with N x layers^2).
Agreement in float64: with the per-matrix closed form (``erase_closed_form`` / ``derive_embedding`` on every K/V
matrix, no shared-transform algebra) at every N on SD-1.4 shapes, and with the straightforward run where it runs;
and how far the float32 model's erasure (G and the writes multiplied in float32 on CPUs) is from the float64 one.
Memory: the erasure's peak beyond the loaded model (CPU: resident set size; CUDA: allocated).
Where the time goes: ``phases_cold`` / ``phases_warm``, one more cold and warm erasure with each phase timed (the
hash of the base K/V, G, the text encoding, each Eq. 3 edit, each Eq. 8 derivation, the write into the U-Net, and
``other``: the rest, chiefly ``attach_pipeline``'s copy of the base K/V).
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

from rece_lightning import RECEModule, base_cache, closed_form, diffusion, families, testing  # noqa: E402
from rece_lightning.families import EncodedPrompt  # noqa: E402
from rece_lightning.tokens import select_tokens

CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "clip-tokenizer"


def _tokenizer(tokenizer: Path | None):
    from transformers import CLIPTokenizer

    if tokenizer is None:
        folder = Path(tempfile.mkdtemp()) / "tokenizer-source"
        testing.train_small_bpe(folder)
        tokenizer = folder
    return CLIPTokenizer.from_pretrained(str(tokenizer), model_max_length=77)


def _clip_text(tokenizer, width: int, layers: int, heads: int, projection: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build_shaped_pipeline(model: str, device: str, dtype: torch.dtype, tokenizer: Path | None):
    """SD 1.4's U-Net (320/640/1280/1280, cross-attention 768) with a CLIP ViT-L/14-shaped text encoder, or SDXL base's
    U-Net (cross-attention 2048, 70 transformer blocks) with CLIP ViT-L + OpenCLIP bigG-shaped encoders; random."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    clip_tokenizer = _tokenizer(tokenizer)
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32)  # never used by the erasure
    if model == "sd14":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text_encoder = _clip_text(clip_tokenizer, 768, 12, 12)
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
    else:
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        pipeline = StableDiffusionXLPipeline(
            unet=unet,
            vae=vae,
            text_encoder=_clip_text(clip_tokenizer, 768, 12, 12),
            text_encoder_2=_clip_text(clip_tokenizer, 1280, 32, 20, projection=1280, act="gelu"),
            tokenizer=clip_tokenizer,
            tokenizer_2=clip_tokenizer,
            scheduler=DDIMScheduler(),
            add_watermarker=False,
        )
    for component in families.family_of(pipeline).networks(pipeline):
        component.requires_grad_(False).eval()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device=device, dtype=dtype)


def unet_step(pipeline, device: str, dtype: torch.dtype):
    """One U-Net forward with batch 2 at the model's own resolution, as a closure."""
    side = pipeline.unet.config.sample_size
    width = pipeline.unet.config.cross_attention_dim
    latents = torch.randn(2, 4, side, side, device=device, dtype=dtype)
    context = torch.randn(2, 77, width, device=device, dtype=dtype)
    timestep = torch.tensor(500, device=device)
    extra = {}
    if families.family_of(pipeline).name == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=dtype),
        }
    return lambda: pipeline.unet(latents, timestep, encoder_hidden_states=context, **extra)


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


class PhaseClock:
    """Times the erasure's phases by wrapping the functions that do them, for one erasure at a time."""

    TARGETS = (
        ("hash", base_cache, "kv_fingerprint"),
        ("gram", closed_form, "gram_matrix"),
        ("encoding", families.ModelFamily, "encode"),
        ("edit", RECEModule, "edit"),
        ("derivation", closed_form, "derive_embedding_from_state"),
        ("write", RECEModule, "_write"),
    )

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []

    def __enter__(self):
        self._saved = [(owner, name, getattr(owner, name)) for _, owner, name in self.TARGETS]
        for phase, owner, name in self.TARGETS:
            setattr(owner, name, self._timed(phase, getattr(owner, name)))
        self._started = time.perf_counter()
        return self

    def _timed(self, phase: str, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.phases.append((phase, time.perf_counter() - started))

        return wrapper

    def __exit__(self, *exc) -> None:
        total = time.perf_counter() - self._started
        for owner, name, original in self._saved:
            setattr(owner, name, original)
        self.total = total

    def report(self) -> dict:
        totals: dict[str, float] = {}
        for phase, seconds in self.phases:
            totals[phase] = totals.get(phase, 0.0) + seconds
        totals["other"] = self.total - sum(totals.values())
        return {
            "total": round(self.total, 4),
            "by_phase": {k: round(v, 4) for k, v in totals.items()},
            "sequence": [[phase, round(seconds, 4)] for phase, seconds in self.phases],
        }


def summary(times: list[float]) -> dict[str, float]:
    return {"min": min(times), "median": statistics.median(times), "reps": len(times)}


class PeakResidentMemory:
    """This process's peak resident set size over a block (CPU tensors are invisible to tracemalloc).

    On Linux the kernel keeps the peak itself (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``), so nothing
    runs beside the measured code. Where that reset is not allowed, a thread samples the resident size every
    millisecond instead; it slows a 2-core machine's GEMMs by 6-8 %, so ``disturbs_timing`` is then true and the
    monitored run must not be timed.
    """

    def __init__(self) -> None:
        self.peak = self.baseline = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.disturbs_timing = not self._reset_kernel_peak()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    @staticmethod
    def _kernel_peak() -> int | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _reset_kernel_peak(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            return False
        peak = self._kernel_peak()
        # After a reset the peak is the current size (a page or two of slack), not an earlier, larger one.
        return peak is not None and peak <= self._rss() + 2**20

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        if self.disturbs_timing:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.disturbs_timing:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        else:
            self.peak = max(self._kernel_peak() or 0, self._rss())


def per_matrix_reference(
    module: RECEModule, concepts: list[str], epochs: int, jitter: float = 0.0
) -> dict[str, torch.Tensor]:
    """The same erasure with Eq. 3 applied to every matrix and Eq. 8 summed over every matrix (float64).

    ``jitter``: relative noise on the text encodings (a few float64 ulps at 1e-15), to measure how far the problem's own
    conditioning moves the result: two correct float64 algorithms cannot agree closer than that.
    """
    hp = module.method
    names = list(module.original_kv)
    originals = [module.original_kv[n].double() for n in names]
    encoded = dict(zip([*concepts, " "], module.encoded([*concepts, " "]), strict=True))
    if jitter:
        generator = torch.Generator().manual_seed(0)

        def shaken(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.double()
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.device)
            return tensor * (1 + jitter * noise)

        encoded = {k: EncodedPrompt(shaken(e.embedding), e.length) for k, e in encoded.items()}
    guide = encoded[" "]
    pairs = [
        select_tokens(encoded[c].embedding, encoded[c].length, guide.embedding, guide.length, hp.uce_tokens)
        for c in concepts
    ]
    preserve = [guide.embedding] * len(concepts)
    options = {"lamb": hp.lamb, "erase_scale": hp.erase_scale, "preserve_scale": hp.preserve_scale}
    current = closed_form.erase_closed_form(
        originals, [a for a, _ in pairs], [b for _, b in pairs], preserve, **options
    )
    stacked = torch.stack([encoded[c].embedding for c in concepts]).double()
    for _ in range(epochs):
        derived = closed_form.derive_embedding(current, originals, stacked, reg=hp.reg)
        targets = [guide.embedding] * len(concepts)
        current = closed_form.erase_closed_form(current, list(derived.unbind(0)), targets, preserve, **options)
    return dict(zip(names, current, strict=True))


def relative_difference(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(
        float(
            (ours[n].detach().double() - reference[n].detach().double()).abs().max() / reference[n].double().abs().max()
        )
        for n in reference
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd14", "sdxl"], default="sd14", help="shapes of the random model")
    parser.add_argument("--concepts", type=int, default=1, help="N concepts erased at once (each to the guide ' ')")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the warm erasure and the U-Net step")
    parser.add_argument("--cold-reps", type=int, default=1, help="repetitions of the cold erasure")
    parser.add_argument("--unet-reps", type=int, default=3, help="U-Net steps timed (1: no warm-up step either)")
    parser.add_argument("--slow-reps", type=int, default=1, help="repetitions of the straightforward yardstick")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tokenizer", type=Path, default=CLIP_TOKENIZER if CLIP_TOKENIZER.is_dir() else None)
    parser.add_argument("--skip-compare", action="store_true", help="leave out the straightforward run (slow)")
    args = parser.parse_args()
    for name in ("concepts", "reps", "cold_reps", "slow_reps", "unet_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: it must be >= 1")
    if args.epochs < 0:
        parser.error(f"--epochs={args.epochs}: it must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")

    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    dtype_name = {torch.float16: "float16", torch.float32: "float32"}[dtype]
    pipeline = build_shaped_pipeline(args.model, device, dtype, args.tokenizer)
    projections = diffusion.cross_attention_kv(pipeline.unet)
    # The base K/V themselves, not a copy: no erasure writes into the storage it started from (its first write gives
    # the parameters storage of their own), and a 1.4 GB copy (SDXL) would put this process under memory pressure that
    # a user's would not have (page faults of the fresh parameter storage then cost seconds).
    originals = {f"{n}.weight": p.weight.detach() for n, p in projections.items()}
    concepts = ["nudity"] if args.concepts == 1 else [f"concept number {i}" for i in range(args.concepts)]
    cache_root = Path(tempfile.mkdtemp(prefix="rece-bench-cache-"))

    def restore() -> None:
        """The base values in the parameters' current storage (as a sweep's next erasure finds them)."""
        diffusion.write_kv_weights(pipeline.unet, originals)

    def restore_base() -> None:
        """The parameters back in the base's own storage (as a new process finds them): an erasure that starts there
        gives them fresh storage, and the storage of the previous run's weights is freed, so the process holds two
        copies of the K/V, as a user's does, not three (SDXL: 1.4 GB each)."""
        for name, projection in projections.items():
            projection.weight.data = originals[f"{name}.weight"]

    def erase(cache_dir: Path, kind: str = dtype_name) -> RECEModule:
        module = RECEModule(
            f"random/{args.model}-shaped", erase_concepts=concepts, dtype=kind, cache_dir=str(cache_dir)
        )
        module.attach_pipeline(pipeline)
        module.erase(args.epochs)
        return module

    cold_dirs = iter(range(10**6))

    def cold() -> None:
        base_cache.clear_memory()
        erase(cache_root / f"cold-{next(cold_dirs)}")

    # Memory first, on a fresh state, before any timing warms caches.
    restore_base()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        cold()
        torch.cuda.synchronize()
        extra_memory = torch.cuda.max_memory_allocated() - before
        memory_method = "torch.cuda.max_memory_allocated"
    else:
        with PeakResidentMemory() as memory:
            started = time.perf_counter()
            cold()
            first_cold = time.perf_counter() - started
        extra_memory = memory.peak - memory.baseline
        memory_method = "sampling thread (run not timed)" if memory.disturbs_timing else "kernel peak (VmHWM)"

    # The monitored run is the first cold repetition on CPU (N = 1000 encodes for minutes: not twice), unless a
    # sampling thread had to watch it.
    cold_times = [first_cold] if device == "cpu" and not memory.disturbs_timing else []
    cold_times += timed(cold, device, args.cold_reps - len(cold_times), reset=restore_base)
    warm_dir = cache_root / "warm"
    restore()
    erase(warm_dir)  # fills the memory and disk caches
    warm_times = timed(lambda: erase(warm_dir), device, args.reps, reset=restore)

    def disk_only() -> None:
        base_cache.clear_memory()
        erase(warm_dir)

    disk_times = timed(disk_only, device, 1, reset=restore_base)

    phases = {}
    for kind, run, reset in (("phases_cold", cold, restore_base), ("phases_warm", lambda: erase(warm_dir), restore)):
        reset()
        synchronize(device)
        with PhaseClock() as clock:
            run()
            synchronize(device)
        phases[kind] = clock.report()
    # The model-dtype erasure just made (float32 products for G and the writes on CPUs), to set against float64's.
    model_dtype_weights = {name: w.detach().clone() for name, w in diffusion.kv_weights(pipeline.unet).items()}

    step = unet_step(pipeline, device, dtype)
    with torch.no_grad():
        if args.unet_reps > 1 or device == "cuda":
            step()  # warm-up
        unet_times = timed(step, device, args.unet_reps)

    result = {
        "model": f"{args.model}-shaped",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": dtype_name,
        "concepts": args.concepts,
        "epochs": args.epochs,
        "kv_matrices": len(projections),
        "text_width": next(iter(originals.values())).shape[1],
        "erase": summary(cold_times),
        "erase_warm": summary(warm_times),
        "erase_warm_disk": summary(disk_times),
        "unet_step": summary(unet_times),
        "erase_over_unet_step": min(cold_times) / min(unet_times),
        "erase_warm_over_unet_step": min(warm_times) / min(unet_times),
        "erase_extra_memory_mb": extra_memory / 2**20,
        "memory_measured_by": memory_method,
        **phases,
    }

    linears = list(projections.values())
    original_list = list(originals.values())
    if not args.skip_compare:
        restore()
        slow_times = timed(
            lambda: straightforward_rece(
                pipeline, linears, original_list, concepts, " ", epochs=args.epochs, dtype=dtype
            ),
            device,
            args.slow_reps,
            reset=restore,
        )
        result["straightforward"] = summary(slow_times)
        result["straightforward_over_fast"] = min(slow_times) / min(cold_times)
        result["straightforward_over_fast_warm"] = min(slow_times) / min(warm_times)

    if args.model == "sd14" or not args.skip_compare:
        # Float64 copies of the K/V layers: only the algebra differs between the implementations.
        restore()
        for linear in linears:
            linear.double()
        float64_originals = {name: w.double() for name, w in originals.items()}
        diffusion.write_kv_weights(pipeline.unet, float64_originals)
        module = erase(cache_root / "float64", kind="float64")
        fast_weights = {name: w.clone() for name, w in module.kv_state().items()}
        reference = per_matrix_reference(module, concepts, args.epochs)
        result[f"max_relative_difference_{dtype_name}_model_vs_float64"] = relative_difference(
            model_dtype_weights, fast_weights
        )
        result["max_relative_difference_per_matrix_float64"] = relative_difference(fast_weights, reference)
        # The same reference with the encodings moved by ~1e-15 (relative): the floor of any float64 agreement.
        result["reference_sensitivity_float64"] = relative_difference(
            per_matrix_reference(module, concepts, args.epochs, jitter=1e-15), reference
        )
        if not args.skip_compare:
            diffusion.write_kv_weights(pipeline.unet, float64_originals)
            straightforward_rece(
                pipeline,
                linears,
                list(float64_originals.values()),
                concepts,
                " ",
                epochs=args.epochs,
                dtype=torch.float64,
            )
            result["max_relative_difference_straightforward_float64"] = relative_difference(
                fast_weights, diffusion.kv_weights(pipeline.unet)
            )

    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
