"""Content checks of paired segmentation files: every kept pair is read once before it is used.

A NaN/inf image, a label that is not integer-valued, a label with values outside the declared label set and an
unreadable or truncated file are errors: the pair is never used (:func:`check_pairs` raises one :class:`DataError`
listing all of them, or warns and drops them with ``strict=False``); an all-background mask is allowed but reported as
a warning. The declared label set comes, in order, from an explicit ``label_names``, from ``dataset.json``, from the
built-in table of the ten MSD tasks (whose ``dataset.json`` is not always shipped), or from the labels themselves.
Binary 2D masks stored as 0/255 are mapped to {0, 1} (255 -> 1, recorded as ``label_mapping``); for ISBI 2012 class 0
is the membrane (black) and class 1 the cell interior (white). Every class is kept (no merging of foreground classes).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace

import nibabel as nib
import numpy as np
from PIL import Image

from medboost.data.pairing import NIFTI_ERRORS, PIL_ERRORS, CasePair, PairingProblem, PairingReport, convert_2d_image
from medboost.errors import DataError

__all__ = ["check_contents", "check_pairs"]


def _read_arrays(pair: CasePair, layout: str) -> tuple[np.ndarray, np.ndarray]:
    if layout == "msd":
        return np.asanyarray(nib.load(str(pair.image)).dataobj), np.asanyarray(nib.load(str(pair.label)).dataobj)
    with Image.open(pair.image) as im, Image.open(pair.label) as mask:
        return np.asarray(convert_2d_image(im)), np.asarray(mask)


def _label_values(label: np.ndarray) -> np.ndarray | str:
    """The distinct label values as int64, or the reason they are not class indices."""
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            return "label contains NaN or infinite values"
        values = np.unique(label)
        if not np.array_equal(values, np.round(values)):
            return f"label values must be integers, found e.g. {values[values != np.round(values)][:3].tolist()}"
        return values.astype(np.int64)
    return np.unique(label).astype(np.int64)


def _content_problems(pair: CasePair, layout: str) -> tuple[np.ndarray | None, list[PairingProblem]]:
    """Read one pair: (label values, problems); values is None when the pair cannot be used."""
    try:
        image, label = _read_arrays(pair, layout)
    except (*NIFTI_ERRORS, *PIL_ERRORS) as exc:
        return None, [PairingProblem(f"{pair.image} / {pair.label}", f"unreadable or truncated file: {exc}")]
    problems = []
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        n_bad = int((~np.isfinite(image)).sum())
        problems.append(PairingProblem(str(pair.image), f"image contains {n_bad} NaN or infinite voxel(s)"))
    values = _label_values(label)
    if isinstance(values, str):
        problems.append(PairingProblem(str(pair.label), values))
    return (None if problems else values), problems


def _declared_labels(
    report: PairingReport, observed: set[int], label_names: Mapping[int, str] | None
) -> tuple[dict[int, str], str, dict[int, int]]:
    """Label names, their source and the value mapping (255 -> 1 for binary 0/255 masks)."""
    mapping: dict[int, int] = {}
    names = {int(k): str(v) for k, v in label_names.items()} if label_names else report.label_names
    source = "argument" if label_names else report.label_names_source
    if observed <= {0, 255} and 255 in observed and (names is None or 255 not in names):
        mapping = {255: 1}  # 8-bit binary masks store the foreground as 255
    if names is None:
        top = max({mapping.get(v, v) for v in observed} | {1})
        names = {0: "background", **{k: f"class_{k}" for k in range(1, top + 1)}}
        if mapping:
            names = {0: "background (mask value 0)", 1: "foreground (mask value 255)"}
        source = "inferred from the labels"
    return names, source or "inferred from the labels", mapping


def check_contents(report: PairingReport, label_names: Mapping[int, str] | None = None) -> PairingReport:
    """Read every kept pair once: NaN/inf images, non-integer labels, labels outside the declared set (errors, pair
    dropped), all-background masks (warning, pair kept). Unreadable or truncated files are errors too."""
    values_by_case: dict[str, np.ndarray] = {}
    problems = list(report.problems)
    for pair in report.pairs:
        values, found = _content_problems(pair, report.layout)
        problems += found
        if values is not None:
            values_by_case[pair.case_id] = values
    observed = {int(v) for vs in values_by_case.values() for v in vs}
    names, source, mapping = _declared_labels(report, observed, label_names)
    kept = []
    for pair in report.pairs:
        if pair.case_id not in values_by_case:
            continue
        mapped = {mapping.get(int(v), int(v)) for v in values_by_case[pair.case_id]}
        outside = sorted(mapped - set(names))
        if outside:
            declared = ", ".join(f"{k}={v}" for k, v in sorted(names.items()))
            problems.append(PairingProblem(str(pair.label), f"label values {outside} outside the label set {declared}"))
            continue
        if mapped <= {0}:
            problems.append(PairingProblem(str(pair.label), "empty mask: all background", "warning"))
        kept.append(pair)
    return replace(
        report, pairs=kept, problems=problems, label_names=names, label_names_source=source, label_mapping=mapping
    )


def check_pairs(
    report: PairingReport, strict: bool = True, contents: bool = True, label_names: Mapping[int, str] | None = None
) -> PairingReport:
    """Validate a discovery report; return it with only usable pairs.

    ``contents=True`` first reads every pair (:func:`check_contents`). With ``strict=True`` any error raises one
    :class:`DataError` that lists every problem file and its reason; with ``strict=False`` each is warned about and
    the file is dropped. Warnings (e.g. empty masks) are always issued with :func:`warnings.warn` and never raise.
    """
    if contents:
        report = check_contents(report, label_names)
    if strict and report.errors:
        listing = "\n".join(f"  {p}" for p in report.errors)
        raise DataError(
            f"{report.root}: {len(report.errors)} problem(s) with the data; these files were not used:\n{listing}\n"
            "Fix or remove them, or pass strict=False to drop them with a warning."
        )
    for problem in report.problems:
        note = "" if problem.severity == "warning" else " (dropped)"
        warnings.warn(f"{problem}{note}", stacklevel=2)
    if not report.pairs:
        raise DataError(f"{report.root}: no usable image/label pair")
    return report
