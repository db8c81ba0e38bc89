"""Segmentation end to end through the real CLI: synthetic 3D MSD and 2D folders, predictions, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from cli_args import cli_args
from PIL import Image
from synthetic_data import make_2d, write_case, write_nifti

from medboost.cli import main
from medboost.data.segmentation import SegmentationDataModule
from medboost.engine.config import OptimConfig
from medboost.models import create_model, load_pretrained
from medboost.tasks.segmentation import SegmentationTask

TRAPS = Path(__file__).parents[1].parent / "shared" / "data" / "msd" / "Task04_Hippocampus_traps"
TINY_SEG = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "feature_size": 4}


def make_task(root: Path, n: int = 8) -> Path:
    for i in range(n):
        write_case(root, f"case_{i:03d}", (16, 18, 16), seed=i)
    # one case with a non-identity affine: predictions must come back in its grid
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [10, -5, 3]
    img = nib.load(root / "imagesTr" / "case_000.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), root / "imagesTr" / "case_000.nii.gz")
    lab = nib.load(root / "labelsTr" / "case_000.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), affine), root / "labelsTr" / "case_000.nii.gz")
    return root


def _values(root, out, model="medvisionllama", roi=(16, 16, 16), **extra):
    values = {
        "task": "segmentation",
        "data.root": str(root),
        "data.roi_size": list(roi),
        "data.batch_size": 2,
        "data.val_fraction": 0.25,
        "data.test_fraction": 0.25,
        "model.name": model,
        "model.kwargs": dict(TINY_SEG),
        "trainer.max_epochs": 1,
        "trainer.progress": False,
        "output_dir": str(out),
        "optim.warmup_epochs": 0,
    }
    values.update(extra)
    return values


def _assert_reported_dice_is_that_of_the_written_predictions(metrics: dict, pairs: dict) -> None:
    """The per-volume test Dice in result.json equals the Dice of each written prediction file against its label
    file, class by class (the files are in the source grid, which here equals the grid the metrics saw)."""
    reported: dict[int, list[float]] = {}
    for row in metrics["per_volume"]:
        reported.setdefault(row["class_index"], []).append(row["dice"])
    assert len(pairs) == metrics["n_volumes"] and reported
    for c, values in reported.items():
        expected = []
        for pred, label in pairs.values():
            p, t = np.asarray(pred).astype(int) == c, np.asarray(label).astype(int) == c
            expected.append(2 * (p & t).sum() / (p.sum() + t.sum()))
        assert sorted(values) == pytest.approx(sorted(expected), abs=1e-6), c


def test_cli_segmentation_3d_writes_predictions_in_the_source_grid(tmp_path, tiny_llm, capsys):
    root = make_task(tmp_path / "Task99_Synthetic")
    # A random M2: the branch changes the tokens from the start, so predictions with and without it can differ.
    booster = {"block": {"source": tiny_llm}, "position": "embed", "zero_init": False}
    kwargs = dict(TINY_SEG, booster=booster)
    assert main(["train", *cli_args(_values(root, tmp_path / "runs", **{"model.kwargs": kwargs}))]) == 0
    run = tmp_path / "runs" / "Task99_Synthetic" / "medvisionllama" / "seed0"
    result = json.loads((run / "result.json").read_text())
    metrics = result["test_metrics"]
    # The booster's contribution: the run's own test (the written predictions below are its), and the same test
    # without the branch, which did not overwrite them.
    contribution = result["booster_contribution"]
    assert contribution["test_dice"] == metrics["mean_foreground"]["dice"]["mean"]
    assert contribution["delta_dice"] == contribution["test_dice"] - contribution["test_dice_without_branch"]
    assert set(contribution["per_class_dice"]) == set(metrics["per_class"]) - {"background"}
    assert contribution["relative_output_norm"] > 0
    assert metrics["n_volumes"] == 2 and len(metrics["per_class"]) == 2  # both foreground classes, kept apart
    predictions = sorted((run / "predictions").glob("*.nii.gz"))
    _assert_reported_dice_is_that_of_the_written_predictions(
        metrics,
        {
            p.name: (np.asarray(nib.load(p).dataobj), np.asarray(nib.load(root / "labelsTr" / p.name).dataobj))
            for p in predictions
        },
    )
    assert len(predictions) == 2
    for path in predictions:
        source = nib.load(root / "imagesTr" / path.name)
        written = nib.load(path)
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
        assert (run / "predictions" / path.name.replace(".nii.gz", "_overlay.png")).stat().st_size > 1000
    printed = " ".join(capsys.readouterr().out.split())  # the table may wrap
    assert "test at the best validation Dice" in printed and "dice" in printed
    model = load_pretrained(run / "model")
    assert model(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


@pytest.mark.parametrize("model", ["vit_seg", "unet"])
def test_cli_segmentation_2d(tmp_path, model):
    root = make_2d(tmp_path / "em", n=8)
    values = _values(root, tmp_path / "runs", model=model, roi=(32, 32))
    if model == "unet":
        values["model.kwargs"] = {"channels": [4, 8, 16], "strides": [2, 2]}
    assert main(["train", *cli_args(values)]) == 0
    run = tmp_path / "runs" / "em" / model / "seed0"
    result = json.loads((run / "result.json").read_text())
    masks = sorted(p for p in (run / "predictions").glob("*.png") if not p.stem.endswith("_overlay"))
    pairs = {
        p.name: (np.asarray(Image.open(p)) > 0, np.asarray(Image.open(root / "masks" / p.name)) > 0) for p in masks
    }
    _assert_reported_dice_is_that_of_the_written_predictions(result["test_metrics"], pairs)
    assert "booster_contribution" not in result  # no booster, nothing to remove
    assert len(list((run / "predictions").glob("*_overlay.png"))) == 2
    assert all(p.stat().st_size > 100 for p in (run / "predictions").glob("[0-9].png"))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["vit_seg", "medvisionllama", "unetr", "unet"])
def test_segmentation_models_keep_every_class_and_train(name, dims, tiny_llm):
    kwargs = {"spatial_dims": dims, "in_channels": 1, "num_classes": 3, "img_size": [16] * dims}
    if name in ("vit_seg", "medvisionllama"):
        kwargs.update(TINY_SEG)
    if name == "medvisionllama":
        kwargs["booster"] = {"block": {"source": tiny_llm}, "lora_rank": 2}
    if name == "unetr":
        kwargs.update(dim=32, heads=2, feature_size=4)
    model = create_model(name, **kwargs)
    out = model(torch.randn(2, 1, *[16] * dims))
    assert out.shape == (2, 3, *[16] * dims) and torch.isfinite(out).all()
    out.mean().backward()
    if name == "medvisionllama":
        booster = model.booster
        assert all(not p.requires_grad for p in booster.block.parameters())
        assert not booster.m1.base.weight.requires_grad and booster.m1.b.weight.grad is not None  # LoRA adapters


def test_trap_files_stop_the_run_with_their_names(tmp_path, capsys):
    if not TRAPS.is_dir():
        pytest.skip(f"{TRAPS} is absent (shared data folder not mounted)")
    root = make_task(tmp_path / "Task98_Traps", n=4)
    shutil.copy(TRAPS / "image_hippocampus_118.nii.gz", root / "imagesTr" / "hippocampus_118.nii.gz")
    shutil.copy(TRAPS / "label_hippocampus_010.nii.gz", root / "labelsTr" / "hippocampus_010.nii.gz")
    shutil.copy(TRAPS / "label_hippocampus_281_512x512x94.nii.gz", root / "labelsTr" / "case_001.nii.gz")
    assert main(["train", *cli_args(_values(root, tmp_path / "runs"))]) == 2
    err = capsys.readouterr().err
    assert "hippocampus_118.nii.gz: image without label" in err
    assert "hippocampus_010.nii.gz: label without image" in err
    assert "case_001" in err and "512x512x94" in err


class ImageIsPrediction(torch.nn.Module):
    """One-hot logits of the image's rounded values: the image decides the prediction, voxel by voxel."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0].round().long(), self.num_classes).movedim(-1, 1).float()


def write_shifted_cube(root: Path, case: str, affine: np.ndarray, axis: int, shift: int) -> None:
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:8, 4:8, 4:8] = 1
    prediction = np.roll(label, shift, axis=axis).astype(np.float32)  # the image the oracle model "predicts"
    write_nifti(root / "imagesTr" / f"{case}.nii.gz", prediction, affine)
    write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine)


def test_hd95_is_in_mm_of_each_test_cases_own_grid(tmp_path):
    # Case a is stored with permuted axes (file axes 0, 1, 2 = world y, z, x at 1, 2, 3 mm): RAS reorientation moves
    # its spacings to other axes. Case b has other spacings. A cube shifted 2 voxels along file axis k is 2 * spacing_k
    # mm off, in any orientation: 2 * 2.0 for a (axis 1), 2 * 2.5 for b (axis 0).
    root = tmp_path / "Task97_Spacing"
    permuted = np.array([[0, 0, 3.0, 0], [1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    write_shifted_cube(root, "a", permuted, axis=1, shift=2)
    write_shifted_cube(root, "b", np.diag([2.5, 1.0, 1.5, 1.0]), axis=0, shift=2)
    dm = SegmentationDataModule(root, roi_size=8, split={"train": [], "val": [], "test": ["a", "b"]}, normalize=None)
    dm.setup()
    task = SegmentationTask(ImageIsPrediction(2), 2, dm.roi_size, OptimConfig(), spacings=dm.grid_spacings("test"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(task, datamodule=dm, verbose=False)
    hd95 = {dm.case_info("test", int(r["volume"])).case_id: r["hd95"] for r in task.test_metrics["per_volume"]}
    assert hd95 == pytest.approx({"a": 4.0, "b": 5.0}, rel=1e-6)
    assert task.test_metrics["settings"]["distance_unit"] == "mm"
