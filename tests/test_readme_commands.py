"""Every ``medboost ...`` line of the README runs, so that a documented command can never silently break.

Each line is run through the real entry point from a folder laid out as a user's checkout (``configs/``,
``benchmarks/`` and ``../shared`` beside it), with the MedMNIST files found through ``$MEDBOOST_DATA`` as the README
says. ``medboost llm`` lines run as written; ``medboost train`` lines run with ``--dry-run`` (data, model, trainer
settings, one training and one validation batch); ``medboost predict`` runs on a model trained by the README's first
``train`` line in one-batch mode, on a real BreastMNIST test image.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from medboost.cli import main

REPO = Path(__file__).parents[1]
SHARED = REPO.parent / "shared"
ONE_BATCH = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
    "--trainer.progress=false",
]


def readme_commands() -> list[list[str]]:
    """The ``medboost`` lines of the README's bash blocks, split as a shell would (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("medboost ")]


COMMANDS = readme_commands()


def test_the_readme_documents_every_command():
    kinds = {argv[0] for argv in COMMANDS}
    assert {"llm", "train", "predict"} <= kinds, kinds
    assert any("--model.kwargs.booster" in argv for argv in COMMANDS), "the no-block baseline line is gone"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A user's checkout: the repository's recipes and splits, with ../shared beside it."""
    if not (SHARED / "data" / "medmnist" / "breastmnist.npz").is_file():
        pytest.skip("../shared/data is not beside the repository")
    root = tmp_path_factory.mktemp("user")
    (root / "shared").symlink_to(SHARED)
    repo = root / "medboost"
    repo.mkdir()
    for folder in ("configs", "benchmarks"):
        (repo / folder).symlink_to(REPO / folder)
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv)[:90])
def test_readme_command_runs(argv, checkout, monkeypatch, capsys):
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("MEDBOOST_DATA", str(SHARED / "data" / "medmnist"))
    if argv[0] == "train":
        argv = [*argv, "--dry-run"]
    elif argv[0] == "predict":
        _train_the_model_and_write_the_case(argv, capsys)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    if argv[0] == "predict":
        assert '"prediction"' in captured.out
        saliency = Path(argv[argv.index("--saliency") + 1])
        assert sorted(p.suffix for p in saliency.iterdir()) == [".npy", ".png"]


def _train_the_model_and_write_the_case(argv: list[str], capsys) -> None:
    """The model folder and image that a predict line names: the README's first train line, one batch, and a real
    BreastMNIST test image."""
    from PIL import Image

    first_train = next(a for a in COMMANDS if a[0] == "train")
    assert main([*first_train, *ONE_BATCH]) == 0, capsys.readouterr().err
    assert Path(argv[1]).is_dir(), f"{argv[1]}: the README's train line did not make this model folder"
    with np.load(SHARED / "data" / "medmnist" / "breastmnist.npz") as npz:
        image = npz["test_images"][0]
    Image.fromarray(image).save(argv[2])
