"""The llm_extract benchmark's measurements: every load runs in a fresh child process (``llm_extract.py --child``)
that reports its own time and peak memory; the parent repeats, summarises and compares the layers the children saved.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llm_extract_checkpoint import STORED_DTYPE

MiB = 1024**2
ENTRY = Path(__file__).resolve().with_name("llm_extract.py")  # the children run the benchmark's entry with --child
RESULT = "RESULT "  # how the one line a child prints its measurement on starts

# The whole-model loads compared with load_block. The stored dtype is transformers' fastest path (memory-mapped, see
# child_full); ".float()" then hands back the float32 layer load_block gives; float32 reads and converts everything.
FULL_VARIANTS = {
    STORED_DTYPE: {"dtype": STORED_DTYPE, "to_float32": False, "method": "from_pretrained(dtype=bfloat16).layers[-1]"},
    f"{STORED_DTYPE}+float": {
        "dtype": STORED_DTYPE,
        "to_float32": True,
        "method": "from_pretrained(dtype=bfloat16).layers[-1].float()",
    },
    "float32": {"dtype": "float32", "to_float32": False, "method": "from_pretrained(dtype=float32).layers[-1]"},
}
# Preset -> the transformers modeling module its layers come from (pre-imported in both children, see _preimport).
GGUF_PRESETS = {"smollm2-135m": "llama", "gemma3-270m": "gemma3"}
# The children must never wait on a network that is not there: every file they need is local.
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


# ---------------------------------------------------------------------------------------------------- child side
#
# Peak memory is read from VmHWM, the high-water RSS of this process's own address space, after resetting it to the
# current RSS once imports are done. ru_maxrss is NOT usable here: Linux carries it over fork + exec, so every child
# reported the parent's high-water mark (~1 GB after building the checkpoint) instead of its own.


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _memory_now() -> dict:
    return {f: _proc_status_bytes(f) for f in ("VmRSS", "RssAnon", "RssFile")}


def _reset_peak() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0), so the peak measured later belongs to the load alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False  # then VmHWM still starts at this process's exec: only import-time peaks leak in


def _preimport(arch: str) -> float:
    """Import everything either path needs, identically in both children, and return the seconds it took.

    transformers imports its modeling machinery lazily (modeling_utils, torch._dynamo...: ~4 s on 2 cores, ~150 MB),
    and both load_block and from_pretrained pull it in through the model's modeling module. Importing it up front
    keeps that fixed, shared cost out of both timings and both memory baselines; it is reported separately.
    """
    import importlib

    start = time.perf_counter()
    for module in (
        "torch",
        "transformers",
        "transformers.modeling_utils",
        "transformers.modeling_gguf_pytorch_utils",
        f"transformers.models.{arch}.modeling_{arch}",
        "medboost.llm",
        "medboost.llm.readers.gguf_reader",
        "medboost.llm.readers.safetensors_reader",
        "medboost.llm.readers.meta_reader",
    ):
        importlib.import_module(module)
    return time.perf_counter() - start


def _start(arch: str) -> dict:
    import gc

    imports = _preimport(arch)
    gc.collect()
    reset = _reset_peak()
    return {"import_s": imports, "peak_reset": reset, "baseline": _memory_now()}


def _finish(head: dict) -> dict:
    # Read the high-water mark first: anything done after this (saving the layer) must not count.
    return {**head, "peak_rss": _proc_status_bytes("VmHWM"), "after": _memory_now()}


def _save_layer(module, path: str) -> None:
    """Write a layer's tensors so the parent can compare the two load paths without holding both processes' memory."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, path)


def child_single(source: str, arch: str, save: str | None) -> dict:
    """``load_block(source, layer=-1)``, split into its three stages (same calls load_block makes, same total)."""
    from medboost.llm import load_block, open_reader
    from medboost.llm.presets import PRESETS

    head = _start(arch)
    start = time.perf_counter()
    # A preset name first resolves to a local file (gemma3-270m also re-checks its sha256 there).
    path = PRESETS[source].resolve() if source in PRESETS else source
    resolved = time.perf_counter()
    reader = open_reader(path)
    opened = time.perf_counter()
    block = load_block(reader, layer=-1)  # load_block accepts an open reader and closes it when done
    done = time.perf_counter()
    out = _finish(head)
    params = list(block.layer.parameters())
    out.update(
        resolve_s=resolved - start,
        open_s=opened - resolved,
        read_s=done - opened,
        total_s=done - start,
        layer_params=sum(p.numel() for p in params),
        layer_bytes=sum(p.numel() * p.element_size() for p in params),
        layer_dtype=str(block.dtype).removeprefix("torch."),
        layer_index=block.layer_index,
    )
    if save:
        _save_layer(block.layer, save)
    return out


def child_full(source: str, arch: str, dtype: str, gguf_file: str | None, to_float32: bool, save: str | None) -> dict:
    """Whole-model load with transformers, then take the last decoder layer (what one would do without medboost).

    ``to_float32`` then converts that layer to float32, i.e. hands back what load_block does. It matters for a
    bfloat16 load: transformers memory-maps safetensors stored in the requested dtype without reading them, so the
    bare load touches almost nothing, and the conversion is where that layer's bytes are first read.
    """
    import torch
    from transformers import AutoModelForCausalLM

    head = _start(arch)
    start = time.perf_counter()
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **extra)
    layer = model.model.layers[-1]
    if to_float32:
        layer = layer.float()
    done = time.perf_counter()
    out = _finish(head)
    out.update(
        total_s=done - start,
        model_params=sum(p.numel() for p in model.parameters()),
        model_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        layer_dtype=str(next(layer.parameters()).dtype).removeprefix("torch."),
    )
    if save:
        _save_layer(layer, save)
    return out


def run_child_mode(args) -> None:
    """One measurement in this (fresh) process, printed as one ``RESULT {json}`` line for :func:`run_child`."""
    if args.child == "single":
        result = child_single(args.source, args.arch, args.save)
    else:
        result = child_full(args.source, args.arch, args.dtype, args.gguf_file, args.to_float32, args.save)
    print(RESULT + json.dumps(result))


def warm_page_cache(files: list[Path]) -> float:
    """Read every file once so that all runs (single layer and full model alike) find it in the page cache."""
    start = time.perf_counter()
    for file in files:
        with file.open("rb") as fh:
            while fh.read(16 * MiB):
                pass
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- parent side


def run_child(child_args: list[str]) -> dict:
    cmd = [sys.executable, str(ENTRY), "--child", *child_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line.removeprefix(RESULT))
    sys.exit(f"child failed ({shlex.join(cmd)}), exit {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def measure(label: str, child_args: list[str], repeats: int, save: Path) -> dict:
    """``repeats`` fresh processes; the first one also saves the layer for the equality check."""
    runs = []
    for i in range(repeats):
        extra = ["--save", str(save)] if i == 0 else []
        run = run_child([*child_args, *extra])
        run["extra_peak"] = run["peak_rss"] - run["baseline"]["VmRSS"]
        runs.append(run)
        print(f"  {label} run {i + 1}/{repeats}: {run['total_s']:.2f} s, extra peak {run['extra_peak'] / MiB:.0f} MiB")
    return {"label": label, "args": child_args, "runs": runs, "summary": summarise(runs)}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("import_s", "resolve_s", "open_s", "read_s", "total_s", "extra_peak"):
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["baseline_rss"] = statistics.median(r["baseline"]["VmRSS"] for r in runs)
    out["peak_rss"] = statistics.median(r["peak_rss"] for r in runs)
    # What the process still holds after the load, split into anonymous memory and mapped file pages.
    out["retained_anon"] = statistics.median(r["after"]["RssAnon"] - r["baseline"]["RssAnon"] for r in runs)
    out["retained_file"] = statistics.median(r["after"]["RssFile"] - r["baseline"]["RssFile"] for r in runs)
    return out


def compare_layers(single: Path, full: Path) -> dict:
    """torch.equal on every tensor after casting both sides to float32."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(single)), load_file(str(full))
    shared = sorted(set(a) & set(b))
    unequal = [k for k in shared if not torch.equal(a[k].float(), b[k].float())]
    max_diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in shared), default=0.0)
    return {
        "equal": not unequal and set(a) == set(b) and bool(shared),
        "tensors": len(shared),
        "only_single": sorted(set(a) - set(b)),
        "only_full": sorted(set(b) - set(a)),
        "unequal": unequal,
        "max_abs_diff": max_diff,
    }


def safetensors_part(folder: Path, repeats: int, tmp: Path) -> dict:
    single_file = tmp / "st_single.safetensors"
    single = measure("load_block", ["single", "--source", str(folder)], repeats, single_file)
    fulls, equal = {}, {}
    for key, variant in FULL_VARIANTS.items():
        args = ["full", "--source", str(folder), "--dtype", variant["dtype"]]
        args += ["--to-float32"] if variant["to_float32"] else []
        save = tmp / f"st_full_{len(fulls)}.safetensors"
        fulls[key] = {**measure(variant["method"], args, repeats, save), "method": variant["method"]}
        equal[key] = compare_layers(single_file, save)
    return {"single": single, "full": fulls, "equal": equal}


def gguf_part(repeats: int, tmp: Path) -> dict:
    from medboost.llm.presets import PRESETS

    out = {}
    for name, arch in GGUF_PRESETS.items():
        path = PRESETS[name].local_path()
        if path is None:
            print(f"  {name}: weights not installed ({PRESETS[name].pip_install}); skipped")
            continue
        warm_page_cache([path])
        args = ["single", "--source", name, "--arch", arch]
        single = measure(f"{name} load_block", args, repeats, tmp / f"{name}_single.st")
        args = ["full", "--source", str(path.parent), "--arch", arch, "--dtype", "float32", "--gguf-file", path.name]
        full = measure(f"{name} from_pretrained gguf", args, repeats, tmp / f"{name}_full.st")
        out[name] = {
            "file": str(path),
            "file_bytes": path.stat().st_size,
            "single": single,
            "full": full,
            "equal": compare_layers(tmp / f"{name}_single.st", tmp / f"{name}_full.st"),
        }
    return out
