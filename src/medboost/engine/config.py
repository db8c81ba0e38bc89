"""Run configuration: typed sections loaded from a YAML recipe, with ``--section.key value`` overrides.

Unknown keys are errors that name the key and the file (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from medboost.errors import ConfigError


@dataclass
class DataConfig:
    dataset: str = "breastmnist"
    size: int = 28
    data_dir: str | None = None
    download: bool = False
    verify_md5: bool = True  # False only for files you made yourself (official files always match their MD5)
    batch_size: int = 128
    num_workers: int = 0
    as_rgb: bool = False
    augment: bool = False
    resize: int | None = None  # e.g. 224 to upsample 28 px images as R-LLM's 2D recipe does


@dataclass
class SegmentationDataConfig:
    """Data for segmentation: an MSD task folder (``imagesTr/`` + ``labelsTr/``, ``dataset.json`` when present) or a
    paired 2D folder (``images/`` + ``masks/``)."""

    root: str = "../shared/data/msd/Task04_Hippocampus"
    spatial_dims: int | None = None  # inferred from the files when None
    roi_size: list[int] = field(default_factory=lambda: [32, 48, 32])
    split: str | None = None  # a split JSON (case ids per split); None: a seeded split made from the case list
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    train_fraction: float = 1.0  # 0.1 / 0.3 / 1.0 as the paper studied; nested subsets of the training cases
    k_folds: int | None = None
    fold: int = 0
    batch_size: int = 4
    num_workers: int = 0
    augment: bool = True
    normalize: str = "zscore"  # zscore | percentile
    spacing: list[float] | None = None  # resample to this spacing (mm); None keeps the native grid
    channels: list[int] | None = None  # channel selection for multi-modal images
    strict: bool = True  # refuse the run when any image/label pair is broken (else report and drop them)
    sw_overlap: float = 0.5  # sliding-window overlap at validation and test
    write_predictions: bool = True  # test predictions as NIfTI (3D) / PNG (2D) with overlays


@dataclass
class ModelConfig:
    name: str = "vit_tiny"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine | multistep | constant
    warmup_epochs: int = 0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of max_epochs (multistep)
    gamma: float = 0.1
    min_lr: float = 0.0
    grad_clip: float | None = None


@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of image pairs; 0 disables
    cutmix: float = 0.0  # Beta(alpha, alpha) box mixing; 0 disables (2D and 3D)
    mix_prob: float = 1.0


@dataclass
class TrainerConfig:
    max_epochs: int = 100
    precision: str = "32-true"  # or "bf16-mixed"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"  # "ddp" for multi-GPU, "ddp_spawn" on CPU
    num_nodes: int = 1
    patience: int | None = None  # early stopping on the validation metric
    ema_decay: float | None = None  # exponential moving average of the weights (evaluated with the EMA weights)
    limit_train_batches: float | int = 1.0
    limit_val_batches: float | int = 1.0
    log_every_n_steps: int = 10
    progress: bool = True
    deterministic: bool = False


@dataclass
class RunConfig:
    task: str = "classification"  # classification | segmentation
    data: DataConfig | SegmentationDataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None  # run folder name; default "<dataset>/<model>/seed<seed>"
    # Also evaluate test after every epoch and report the paper code's "best test epoch". FOR COMPARISON ONLY: selecting
    # on test is optimistic; the reported result is always the validation-selected checkpoint.
    report_best_test_epoch: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, stored: dict) -> list[str]:
        """Keys (``section.key``) whose value in a stored config dict differs from this config. Settings that do not
        change what is trained (progress bars, download permission) are ignored."""
        return [key for key, (a, b) in _flat_diff(self.to_dict(), stored).items() if key not in _COSMETIC]

    def __post_init__(self):
        if self.task in DATA_CONFIGS and not isinstance(self.data, DATA_CONFIGS[self.task]):
            self.data = DATA_CONFIGS[self.task]()  # defaults of the task's own data section

    @property
    def dataset_name(self) -> str:
        return getattr(self.data, "dataset", None) or Path(self.data.root).name

    @property
    def run_dir(self) -> Path:
        name = self.name or f"{self.dataset_name}/{self.model.name}/seed{self.seed}"
        return Path(self.output_dir) / name


DATA_CONFIGS = {"classification": DataConfig, "segmentation": SegmentationDataConfig}

_COSMETIC = {"trainer.progress", "data.download", "data.num_workers", "trainer.log_every_n_steps"}


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


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _build(cls, values: Any, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in values.items():
        tp = hints[key]
        if cls is RunConfig and key == "data":  # the data section's schema depends on the task
            tp = DATA_CONFIGS.get(values.get("task", "classification"))
            if tp is None:
                raise ConfigError(f"{where}.task: unknown task {values['task']!r}; known: {', '.join(DATA_CONFIGS)}")
        kwargs[key] = _build(tp, value, f"{where}.{key}") if _is_dataclass_type(tp) else _coerce(tp, value, where, key)
    return cls(**kwargs)


def _coerce(tp, value, where: str, key: str):
    """Light type checking of scalars: ints where floats are expected are fine; strings are not numbers."""
    origin = typing.get_origin(tp)
    allowed = typing.get_args(tp) if origin in (typing.Union, types.UnionType) else (tp,)
    if value is None:
        if type(None) in allowed or tp is Any:
            return None
        raise ConfigError(f"{where}.{key}: must not be null")
    for option in allowed:
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):
            try:  # YAML 1.1 reads "5e-4" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if option in (int, str, bool) and type(value) is option:
            return value
        if option is Any or typing.get_origin(option) in (list, dict) or option in (list, dict):
            return value
    names = ", ".join(getattr(a, "__name__", str(a)) for a in allowed)
    raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A :class:`RunConfig` from a YAML recipe (or the defaults), then dotted overrides like ``{"optim.lr": 1e-4}``."""
    values: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
    for dotted, value in (overrides or {}).items():
        node = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {part} is not a section")
        node[leaf] = value
    return _build(RunConfig, values, where)


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``["--optim.lr", "1e-4", "--trainer.devices=2"]`` -> ``{"optim.lr": 0.0001, "trainer.devices": 2}``
    (values parsed as YAML, so numbers, booleans, lists and null work)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --section.key VALUE or --key VALUE")
        if "=" in token:
            key, raw = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"override {token} has no value")
            key, raw = token[2:], tokens[i + 1]
            i += 2
        out[key.replace("-", "_")] = yaml.safe_load(raw)
    return out
