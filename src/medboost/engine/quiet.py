"""Keep library chatter off a user's terminal while a ``medboost`` command runs.

Lightning, torch and transformers print advertising tips, device summaries, notices about settings medboost chose on
purpose (the frozen block is in eval mode by design; short epochs log less often) and deprecation warnings about
their own internals. None of it concerns the user's data or config, and it buries the results. The command line
hides exactly these while it runs and restores every logger level and warning filter afterwards; warnings raised by
medboost itself, or any other warning, still show. ``--verbose`` shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

#: Loggers whose INFO messages are device summaries, tips and "Trainer(limit_train_batches=...) was configured".
CHATTY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")

#: Warning messages (regular expressions, matched at the start) that describe medboost's deliberate choices.
EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",  # the frozen LLM block is pinned to eval mode by design
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"Checkpoint directory .* exists and is not empty",  # resuming a run folder is what we do
    r"The '\w+_dataloader' does not have many workers",  # num_workers is the user's config, 0 is a fine default
    r"You are using `torch.load` with `weights_only=False`",
    r"Consider setting `persistent_workers=True`",  # persistent workers break exact resume (see data.base)
    r"It is recommended to use `self.log\(.*sync_dist=True`",  # metrics are gathered exactly by the task itself
    r"GPU available but not used",
)

#: Modules whose DeprecationWarnings and FutureWarnings concern their own internals.
LIBRARY_MODULES = (
    r"(lightning|pytorch_lightning|lightning_fabric|lightning_utilities|torch|torchmetrics|monai|transformers"
    r"|jsonargparse|tensorboard)(\.|$)"
)


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Within the block, hide the messages above (nothing when ``verbose``); restore everything on exit."""
    if verbose:
        yield
        return
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: import first, then lower them)

    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for pattern in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
