"""Per-image overhead of the Lightning evaluation loop over a plain diffusers loop doing the same work.

    python benchmarks/bench_eval.py --num-prompts 32 --batch-size 8 --size 64 --steps 10    # prints one JSON object

Both sides generate the same prompts with the same seeds in batches through the pipeline's batched call and write
each image as a PNG. The evaluator side is ``trainer.test(ErasureEvaluator(metrics=[]), PromptDataModule(...))``; its
loop is timed from the first to the last test batch (Trainer start-up, a one-off per run, is reported apart).
The pipeline is the tiny random SD-1.x-shaped one (``build_tiny_pipeline``), or ``--model`` for a real one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from PIL import Image

from rece_lightning import diffusion, testing
from rece_lightning.data import PromptDataModule
from rece_lightning.evaluation import ErasureEvaluator
from rece_lightning.evaluation.nudity import to_uint8

CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "clip-tokenizer"


class LoopTimer(pl.Callback):
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.started = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.finished = time.perf_counter()


def plain_loop(pipeline, frame, batch_size, steps, size, folder: Path) -> float:
    folder.mkdir(parents=True)
    started = time.perf_counter()
    rows = list(frame.itertuples())
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = pipeline(
            [row.prompt for row in chunk],
            num_inference_steps=steps,
            guidance_scale=7.5,
            height=size,
            width=size,
            generator=[torch.Generator("cpu").manual_seed(int(row.seed)) for row in chunk],
            output_type="np",
        ).images
        for row, image in zip(chunk, images, strict=True):
            Image.fromarray(to_uint8(image)).save(folder / f"{row.case_number}_0.png")
    return time.perf_counter() - started


def evaluator_loop(model_path, csv, batch_size, steps, size, device, folder: Path) -> tuple[float, float]:
    timer = LoopTimer()
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=folder,
    )
    evaluator = ErasureEvaluator(
        str(model_path),
        original_only=True,
        metrics=[],
        scheduler="model",  # the plain loop uses the pipeline's own scheduler too
        num_inference_steps=steps,
        height=size,
        width=size,
        dtype="float32",
        output_dir=str(folder),
    )
    started = time.perf_counter()
    data = PromptDataModule(str(csv), batch_size=batch_size, default_guidance=7.5)
    trainer.test(evaluator, datamodule=data, verbose=False)
    return timer.finished - timer.started, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", type=Path, default=None, help="a diffusers folder (default: tiny random pipeline)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model = args.model or testing.build_tiny_pipeline(
        work / "tiny-sd", tokenizer=CLIP_TOKENIZER if CLIP_TOKENIZER.is_dir() else None
    )
    csv = work / "prompts.csv"
    import pandas as pd

    frame = pd.DataFrame(
        {
            "case_number": range(args.num_prompts),
            "prompt": [f"a photo of a house number {i} by the sea" for i in range(args.num_prompts)],
            "evaluation_seed": [1000 + i for i in range(args.num_prompts)],
        }
    )
    frame.to_csv(csv, index=False)
    pipeline = diffusion.load_pipeline(str(model), dtype=torch.float32, device=args.device)
    frame = frame.rename(columns={"evaluation_seed": "seed"})

    plain, loop, total = [], [], []
    for rep in range(args.reps):
        plain.append(plain_loop(pipeline, frame, args.batch_size, args.steps, args.size, work / f"plain{rep}"))
        seconds, whole = evaluator_loop(
            model, csv, args.batch_size, args.steps, args.size, args.device, work / f"eval{rep}"
        )
        loop.append(seconds)
        total.append(whole)
    images = args.num_prompts
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name()
                if args.device == "cuda"
                else f"cpu ({torch.get_num_threads()} threads)",
                "images": images,
                "batch_size": args.batch_size,
                "size": args.size,
                "steps": args.steps,
                "plain_diffusers_s": min(plain),
                "evaluator_loop_s": min(loop),
                "evaluator_with_trainer_startup_s": min(total),
                "per_image_overhead_ms": 1000 * (min(loop) - min(plain)) / images,
                "loop_overhead_fraction": min(loop) / min(plain) - 1,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
