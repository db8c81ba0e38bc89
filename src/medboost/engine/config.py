"""Run configuration: typed dataclass sections, parsed and validated by jsonargparse.

A run is a YAML recipe plus ``--section.key VALUE`` overrides. jsonargparse checks every value against the dataclass
types (lists and dicts included), lists every key with its type, default and doc in ``--help``, and prints the
resolved recipe with ``--print_config``. medboost adds two things on top: every error names where the bad value came
from (the recipe file or the command line), and an unknown key is answered with the closest valid one.

The data section's schema depends on the task, so each task has its own run class (:data:`RUN_CONFIGS`); the task is
read from the recipe and the command line before the parser for it is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from medboost.errors import ConfigError


@dataclass
class DataConfig:
    """MedMNIST data.

    Args:
        dataset: MedMNIST dataset name (e.g. breastmnist, adrenalmnist3d; see the medmnist INFO table).
        size: stored image size (28, 64, 128 or 224; 3D sets: 28 or 64).
        data_dir: folder holding the .npz; None searches $MEDBOOST_DATA, then ~/.medmnist.
        download: download the file from Zenodo (MD5 checked) when it is not found.
        verify_md5: check the file's MD5 against the official one (False only for files you made yourself).
        batch_size: samples per batch and process.
        num_workers: DataLoader worker processes (0: load in the main process).
        as_rgb: repeat grey images to 3 channels.
        augment: light augmentation of the training split (flips, small affine).
        resize: resize images to this size (e.g. 224 as R-LLM's 2D recipe does); None keeps the stored size.
    """

    dataset: str = "breastmnist"
    size: int = 28
    data_dir: str | None = None
    download: bool = False
    verify_md5: bool = True
    batch_size: int = 128
    num_workers: int = 0
    as_rgb: bool = False
    augment: bool = False
    resize: int | None = None


@dataclass
class SegmentationDataConfig:
    """Segmentation data: an MSD task folder (imagesTr/ + labelsTr/, dataset.json when present) or a paired 2D folder
    (images/ + masks/).

    Args:
        root: the task or paired folder.
        spatial_dims: 2 or 3; None infers it from the files.
        roi_size: training crop (and sliding-window) size, one value per spatial axis.
        split: a split JSON (case ids per split); None makes a seeded split from the case list.
        val_fraction: share of cases for validation (seeded split only).
        test_fraction: share of cases for test (seeded split only).
        train_fraction: nested, seeded subset of the training cases (0.1 / 0.3 / 1.0 as the paper studied).
        k_folds: k of a k-fold split of the non-test cases; None: a single split.
        fold: which fold validates (with k_folds).
        batch_size: ROI crops per batch and process.
        num_workers: DataLoader worker processes.
        augment: random flips, rotations and intensity changes of the training crops.
        normalize: intensity normalisation, zscore or percentile.
        spacing: resample to this voxel spacing in mm; None keeps the native grid.
        channels: channel selection for multi-modal images, by index or by dataset.json modality name; None keeps
            all.
        strict: refuse the run when any image/label pair is broken (else report and drop them).
        sw_overlap: sliding-window overlap at validation and test.
        write_predictions: write test predictions as NIfTI (3D) / PNG (2D) with overlays.
    """

    root: str = "../shared/data/msd/Task04_Hippocampus"
    spatial_dims: int | None = None
    roi_size: list[int] = field(default_factory=lambda: [32, 48, 32])
    split: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    train_fraction: float = 1.0
    k_folds: int | None = None
    fold: int = 0
    batch_size: int = 4
    num_workers: int = 0
    augment: bool = True
    normalize: Literal["zscore", "percentile"] = "zscore"
    spacing: list[float] | None = None
    channels: list[int | str] | None = None
    strict: bool = True
    sw_overlap: float = 0.5
    write_predictions: bool = True


@dataclass
class VisionLanguageDataConfig:
    """Vision-language data (MedBLIP): a manifest of 3D volumes with clinical fields, or the IXI folder.

    Args:
        dataset: the data's name in run folder names and reports.
        manifest: a manifest (.csv or .jsonl; see medboost.data.vl_manifest); None: ixi_root must be given.
        ixi_root: an IXI 2 mm folder (t1/, participants.csv, dlmuse_roi_volumes.csv) whose manifest is written
            into the run folder (manifest/ixi_vl.csv, with its exclusion report); None: manifest must be given.
        questions: the closed-question preset (ixi: sex, age group, reduced hippocampal volume).
        size: volumes are resized and padded to size^3 (MedBLIP: 224).
        split_file: a split JSON of scan ids (e.g. benchmarks/splits/ixi_vl.json); None: a seeded subject-level
            split with the fractions below.
        val_fraction: share of subjects for validation (seeded split only).
        test_fraction: share of subjects for test (seeded split only).
        batch_size: samples (volume + question) per batch and process.
        num_workers: DataLoader worker processes.
        cache_dir: keep preprocessed volumes here as .npy, reused across runs; None: in memory.
        max_new_tokens: length limit of the free-text answers generated at test.
        leak_answer: a CONTROL, never a real setting: append each sample's answer to its EHR text ("... The answer
            is Male."), so that a model reading the text must reach ~100% accuracy; proves the text path works.
    """

    dataset: str = "ixi"
    manifest: str | None = None
    ixi_root: str | None = None
    questions: str = "ixi"
    size: int = 224
    split_file: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    batch_size: int = 7
    num_workers: int = 0
    cache_dir: str | None = None
    max_new_tokens: int = 16
    leak_answer: bool = False


@dataclass
class ModelConfig:
    """The model.

    Args:
        name: a registered model (medboost.models.list_models(); e.g. vit_tiny, vit_tiny_llm, resnet18,
            medvisionllama, unetr). A plain ViT has no booster: drop a recipe's block with
            --model.kwargs.booster null.
        kwargs: the model's arguments (patch_size, dim, depth, booster: {residual, block: {source, layer}}, ...).
    """

    name: str = "vit_tiny"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Args:
        name: adam, adamw or sgd.
        lr: peak learning rate.
        weight_decay: decoupled (adamw) or L2 (adam, sgd) weight decay.
        momentum: SGD momentum.
        schedule: cosine, multistep or constant, after the warm-up.
        warmup_epochs: linear warm-up epochs.
        milestones: multistep decay points as fractions of max_epochs.
        gamma: multistep decay factor.
        min_lr: floor of the cosine schedule.
        grad_clip: clip the gradient norm to this value; None does not clip.
        lr_scale: learning-rate multipliers by parameter-name pattern (``fnmatch``; the first matching pattern wins),
            e.g. ``{"image_encoder.*": 10}`` for randomly initialised parts beside pre-trained ones. Every pattern must
            match a trainable parameter.
    """

    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: int = 0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    min_lr: float = 0.0
    grad_clip: float | None = None
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class LossConfig:
    """Classification loss and batch mixing.

    Args:
        label_smoothing: cross-entropy label smoothing.
        mixup: Beta(alpha, alpha) mixing of image pairs; 0 disables.
        cutmix: Beta(alpha, alpha) box mixing (2D and 3D); 0 disables.
        mix_prob: probability that a batch is mixed.
    """

    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0


#: TrainerConfig fields that are Lightning Trainer arguments of the same name and meaning.
LIGHTNING_TRAINER_KEYS = (
    "max_epochs",
    "precision",
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "limit_train_batches",
    "limit_val_batches",
    "log_every_n_steps",
    "deterministic",
)


@dataclass
class TrainerConfig:
    """Training loop (Lightning).

    Args:
        max_epochs: training epochs.
        precision: 32-true or bf16-mixed (or any Lightning precision).
        accelerator: auto, cpu, gpu, ...
        devices: number of devices, a list of device ids, or auto.
        strategy: auto, ddp (multi-GPU), ddp_spawn (CPU), fsdp.
        num_nodes: machines for multi-node training.
        patience: early stopping after this many epochs without a better validation metric; None: never.
        ema_decay: exponential moving average of the weights, evaluated with the EMA weights; None: off.
        limit_train_batches: batches per training epoch (an int) or a fraction of them (a float).
        limit_val_batches: batches per validation (an int) or a fraction of them (a float).
        log_every_n_steps: logging interval of step-level metrics.
        progress: show the progress bar.
        deterministic: use deterministic algorithms only.
        monitor: the logged validation metric that selects the checkpoint (and drives early stopping); None: the
            task's own (classification ``val_auc``, segmentation ``val_dice``, vision-language ``val_acc``). A name
            with ``loss`` in it is minimised, any other maximised.
    """

    max_epochs: int = 100
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: int | list[int] | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    patience: int | None = None
    ema_decay: float | None = None
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    log_every_n_steps: int = 10
    progress: bool = True
    deterministic: bool = False
    monitor: str | None = None

    def lightning_kwargs(self) -> dict[str, Any]:
        """The fields that are Lightning Trainer arguments, by name."""
        return {key: getattr(self, key) for key in LIGHTNING_TRAINER_KEYS}


@dataclass
class RunConfig:
    """A training run.

    Args:
        task: classification, segmentation or vision_language (decides the data section's keys).
        data: the data section (DataConfig for classification, SegmentationDataConfig for segmentation,
            VisionLanguageDataConfig for vision_language).
        model: the model section.
        optim: the optimiser section.
        loss: the loss section (classification).
        trainer: the training-loop section.
        seed: seeds model initialisation, data order, augmentation and splits.
        output_dir: folder under which run folders are made.
        name: run folder name under output_dir; None: <dataset>/<model>/seed<seed>.
        report_best_test_epoch: also evaluate test after every epoch and report the paper code's "best test epoch".
            For comparison only: selecting on test is optimistic; the reported result is always the
            validation-selected checkpoint.
    """

    task: str = "classification"
    data: DataConfig | SegmentationDataConfig | VisionLanguageDataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None
    report_best_test_epoch: bool = False

    def __post_init__(self):
        if self.task not in RUN_CONFIGS:
            raise ConfigError(f"task: unknown task {self.task!r}; known: {', '.join(RUN_CONFIGS)}")
        expected = DATA_CONFIGS[self.task]
        if not isinstance(self.data, expected):
            raise ConfigError(
                f"data: a {self.task} run needs a {expected.__name__} data section, got {type(self.data).__name__}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, stored: dict) -> list[str]:
        """Keys (``section.key``) whose value in a stored config dict differs from this config. Settings that do not
        change what is trained (progress bars, download permission) are ignored."""
        return [
            key
            for key, (a, b) in _flat_diff(self.to_dict(), stored).items()
            if key not in _COSMETIC and not (key in _ADDED_LATER and b is None and a == _ADDED_LATER[key])
        ]

    @property
    def dataset_name(self) -> str:
        return getattr(self.data, "dataset", None) or Path(self.data.root).name

    @property
    def run_dir(self) -> Path:
        name = self.name or f"{self.dataset_name}/{self.model.name}/seed{self.seed}"
        return Path(self.output_dir) / name


@dataclass
class ClassificationRunConfig(RunConfig):
    """A classification run (MedMNIST).

    Args:
        task: classification.
        data: the MedMNIST data section.
    """

    task: Literal["classification"] = "classification"
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class SegmentationRunConfig(RunConfig):
    """A segmentation run (MSD task or paired 2D folder).

    Args:
        task: segmentation.
        data: the segmentation data section.
    """

    task: Literal["segmentation"] = "segmentation"
    data: SegmentationDataConfig = field(default_factory=SegmentationDataConfig)


@dataclass
class VisionLanguageRunConfig(RunConfig):
    """A vision-language run (MedBLIP: 3D volume + clinical text -> answers).

    Args:
        task: vision_language.
        data: the vision-language data section.
    """

    task: Literal["vision_language"] = "vision_language"
    data: VisionLanguageDataConfig = field(default_factory=VisionLanguageDataConfig)


#: The run class (and so the data schema) of each task.
RUN_CONFIGS: dict[str, type[RunConfig]] = {
    "classification": ClassificationRunConfig,
    "segmentation": SegmentationRunConfig,
    "vision_language": VisionLanguageRunConfig,
}


def _data_section(cls: type[RunConfig]) -> type:
    return next(f.default_factory for f in fields(cls) if f.name == "data")


#: The data section class of each task.
DATA_CONFIGS: dict[str, type] = {task: _data_section(cls) for task, cls in RUN_CONFIGS.items()}

# Where a run lives is not what it trains: a run folder moved or copied elsewhere stays reusable.
_COSMETIC = {"trainer.progress", "data.download", "data.num_workers", "trainer.log_every_n_steps", "name", "output_dir"}
#: Settings added after runs were stored, with the value that reproduces what those runs did: a stored config without
#: the key matches a config holding that value (so finished benchmark runs stay reusable).
_ADDED_LATER: dict[str, Any] = {"optim.lr_scale": {}}


def _flat_diff(new: dict, old: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(new) | set(old)):
        a, b, name = new.get(key), old.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_flat_diff(a, b, name + "."))
        elif _normalise(a) != _normalise(b):
            out[name] = (a, b)
    return out


def _normalise(value: Any) -> Any:
    """Tuples and lists compare equal (a config read back from JSON has lists)."""
    return [_normalise(v) for v in value] if isinstance(value, (list, tuple)) else value


def section_kwargs(section: Any, target: Any, **extra: Any) -> dict[str, Any]:
    """The fields of a config ``section`` that ``target`` (a class or function) takes, by name, plus ``extra``: the
    one piece of wiring from a recipe section to the object it configures (a data module, the Trainer). A field the
    target does not take is the caller's to use (e.g. ``augment`` chooses the transforms)."""
    import inspect

    accepted = inspect.signature(target).parameters
    return {**{f.name: getattr(section, f.name) for f in fields(section) if f.name in accepted}, **extra}


# -- parsing ----------------------------------------------------------------------------------------------------------
def run_parser(task: str = "classification", prog: str = "medboost train"):
    """The jsonargparse parser of one task's run config: ``-c RECIPE``, ``--section.key VALUE``, ``--print_config``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    if task not in RUN_CONFIGS:
        raise ConfigError(f"task: unknown task {task!r}; known: {', '.join(RUN_CONFIGS)}")
    parser = ArgumentParser(
        prog=prog,
        description=f"Train a {task} model from a YAML recipe; any key can be overridden with --section.key VALUE. "
        "medboost train also takes --no-resume (start over, ignoring checkpoints/last.ckpt), --dry-run (check the "
        "data, model and settings on one training and one validation batch, writing no run folder) and --verbose (show "
        "every library message).",
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="a YAML recipe, e.g. configs/r-llm/breastmnist.yaml"
    )
    parser.add_class_arguments(RUN_CONFIGS[task], None, fail_untyped=True)
    return parser


def parse_run_args(argv: Sequence[str]) -> RunConfig:
    """A run config from command-line arguments (``-c recipe.yaml --optim.lr 1e-4 ...``).

    The recipe is validated on its own first, so that a bad value in it is reported with the file's name, then
    together with the overrides. ``--help`` and ``--print_config`` print and exit as usual.
    """
    argv = list(argv)
    recipe = _recipe_path(argv)
    task = _task(argv, recipe)
    parser = run_parser(task)
    if recipe is not None and not any(a in ("-h", "--help") for a in argv):
        _parse(parser, ["--config", str(recipe)], str(recipe), task)
    return _parse(parser, argv, "command line" if recipe is None else f"{recipe} + command line", task)


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A run config from a YAML recipe (or the defaults) and dotted overrides like ``{"optim.lr": 1e-4}``, checked
    by the same parser as the command line."""
    argv = [] if path is None else ["--config", str(path)]
    for key, value in (overrides or {}).items():
        # JSON is YAML: numbers, null, lists and dicts keep their type; strings go as they are (a quoted "5e-4"
        # would stay a string where a float is expected).
        argv.append(f"--{key}={value if isinstance(value, str) else json.dumps(value)}")
    return parse_run_args(argv)


def known_keys(cls: type = ClassificationRunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a run config class, e.g. ``["task", "data.dataset", ...]``."""
    keys: list[str] = []
    for f in fields(cls):
        section = f.default_factory
        if dataclasses.is_dataclass(section):
            keys += known_keys(section, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _recipe_path(argv: list[str]) -> Path | None:
    for i, token in enumerate(argv):
        if token in ("-c", "--config") and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith("--config="):
            value = token.split("=", 1)[1]
        else:
            continue
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe not found")
        return path
    return None


def _task(argv: list[str], recipe: Path | None) -> str:
    """The task a run is for: the last ``--task`` on the command line, else the recipe's, else classification."""
    task = "classification"
    if recipe is not None:
        try:
            values = yaml.safe_load(recipe.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{recipe}: invalid YAML: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{recipe}: a recipe is a mapping of sections, got {type(values).__name__}")
        task = values.get("task", task)
        # jsonargparse checks the keys inside sections; unknown top-level keys it would skip, so check them here.
        top = [f.name for f in fields(RUN_CONFIGS.get(task, RunConfig))]
        for key in values:
            if key not in top:
                raise ConfigError(f"{recipe}: {_unknown(str(key), top)}")
    for i, token in enumerate(argv):
        if token == "--task" and i + 1 < len(argv):
            task = argv[i + 1]
        elif token.startswith("--task="):
            task = token.split("=", 1)[1]
    return task


def _parse(parser, argv: list[str], where: str, namespace_task: str) -> RunConfig:
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(f"{where}: {_explain(str(err), namespace_task)}") from None
    namespace.pop("config", None)
    sections = parser.instantiate(namespace)
    cls = RUN_CONFIGS[namespace.task]
    return cls(**{f.name: sections[f.name] for f in fields(cls)})


_UNKNOWN = (
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"unrecognized arguments: --(?P<key>[\w.-]+)"),
    re.compile(r"Key '(?P<key>[\w.]+)' is not expected"),
)


def _explain(message: str, task: str) -> str:
    """jsonargparse's message on one line, with the closest valid key when a key is unknown."""
    message = re.sub(r"a <class '(\w+)'>", r"\1", " ".join(message.split()))
    for pattern in _UNKNOWN:
        match = pattern.search(message)
        if match:
            key = match.group("key").replace("-", "_")
            if match.groupdict().get("group"):
                key = f"{match.group('group')}.{key}"
            return _unknown(key, known_keys(RUN_CONFIGS[task]))
    return re.sub(r'^Parser key "([\w.]+)": ', r"\1: ", message)


def _unknown(key: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; medboost train --help lists every key"
    return f"unknown key {key}{hint}"
