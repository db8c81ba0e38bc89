"""The ``medboost`` command. Bad input prints one message naming the file and the problem, and exits with status 2."""

from __future__ import annotations

import argparse
import json
import sys

from medboost.errors import MedboostError


def _cmd_llm_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from medboost.llm import PRESETS, supported_model_types
    from medboost.llm.causal_lm import WHOLE_MODEL_ONLY

    table = Table(title="LLM presets (medboost llm inspect NAME)")
    for column in ("name", "default layer", "weights", "description"):
        table.add_column(column)
    for preset in PRESETS.values():
        try:
            local = preset.local_path()
        except MedboostError as err:
            local = None
            print(f"warning: {err}", file=sys.stderr)
        install = f"  ({preset.pip_install})" if preset.pip_install else ""
        where = str(local) if local else f"hub: {preset.hub_id}{install}"
        table.add_row(preset.name, str(preset.default_layer), where, preset.description)
    console = Console(width=200)
    console.print(table)
    console.print("architectures (single layers and whole models): " + ", ".join(supported_model_types()))
    console.print("whole causal LMs only (MedBLIP's frozen LLM): " + ", ".join(sorted(WHOLE_MODEL_ONLY)))
    console.print("sources: a preset, a .gguf file, a Hugging Face folder or hub id (org/name), a Meta checkpoint")
    return 0


def _cmd_llm_inspect(args) -> int:
    from medboost.llm import PRESETS, inspect_source

    layer = args.layer
    if layer is None and args.source in PRESETS:
        layer = PRESETS[args.source].default_layer
    facts = inspect_source(args.source, layer)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    width = max(map(len, facts))
    for key, value in facts.items():
        if key == "layer_parameters":
            value = f"{value:,} ({value / 1e6:.2f} M)"
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_train(args, extra: list[str]) -> int:
    from medboost.engine.config import parse_run_args

    cfg = parse_run_args(extra)  # --help and --print_config print and exit here
    if cfg.task == "segmentation":
        from medboost.pipelines import segmentation as pipeline

        train, selected_by = pipeline.train_segmenter, "validation Dice"
    elif cfg.task == "vision_language":
        from medboost.pipelines import vision_language as pipeline

        train, selected_by = pipeline.train_vision_language, "validation accuracy"
    else:
        from medboost.pipelines import classification as pipeline

        train, selected_by = pipeline.train_classifier, "validation AUC"
    if args.dry_run:
        return _dry_run(cfg, pipeline)
    print(f"run folder: {cfg.run_dir}")
    result = train(cfg, resume=not args.no_resume)
    if cfg.task == "vision_language":
        _print_questions(cfg, result)
    else:
        _print_result(cfg, result, selected_by)
    return 0


def _dry_run(cfg, pipeline) -> int:
    from medboost.engine.records import count_parameters
    from medboost.engine.trainer import dry_run, start_run

    start_run(cfg)
    dm, model, task = pipeline.prepare(cfg)
    dry_run(cfg, task, dm)
    sizes = count_parameters(model)
    print(
        f"dry run passed: {cfg.task} of {cfg.dataset_name} with {cfg.model.name} "
        f"({sizes['parameters'] / 1e6:.2f} M parameters, {sizes['trainable_parameters'] / 1e6:.2f} M trainable); "
        "one training and one validation batch ran; no run folder was written "
        f"(the run would go to {cfg.run_dir}; data caches may have been filled)"
    )
    return 0


def _print_result(cfg, result: dict, selected_by: str) -> None:
    """The test metrics at the checkpoint selected on validation, as one table."""
    from rich.console import Console
    from rich.table import Table

    test = {k.removeprefix("test_"): v for k, v in result.get("test", {}).items() if k != "test_loss"}
    table = Table(title=f"{cfg.dataset_name} / {cfg.model.name}, seed {cfg.seed}: test at the best {selected_by}")
    for column in ("best epoch", f"best {selected_by}", *test):
        table.add_column(column, justify="right")
    best_val = result.get("best_val")
    table.add_row(
        str(result.get("best_epoch")),
        "-" if best_val is None else f"{best_val:.4f}",
        *(f"{v:.4f}" for v in test.values()),
    )
    console = Console()
    console.print(table)
    console.print(f"report: {cfg.run_dir / 'result.json'}")


_QUESTION_COLUMNS = ("acc", "balanced_acc", "macro_f1", "auc", "gen_acc")


def _print_questions(cfg, result: dict) -> None:
    """Vision-language test metrics, one row per question (each question has its own candidates)."""
    from rich.console import Console
    from rich.table import Table

    best_val = result.get("best_val")
    title = f"{cfg.dataset_name} / {cfg.model.name}, seed {cfg.seed}: test at the best validation accuracy"
    table = Table(title=f"{title} ({'-' if best_val is None else f'{best_val:.4f}'}, epoch {result.get('best_epoch')})")
    for column in ("question", *_QUESTION_COLUMNS):
        table.add_column(column, justify="right")
    for key, metrics in result.get("test_report", {}).items():
        table.add_row(key, *(f"{metrics[c]:.4f}" for c in _QUESTION_COLUMNS))
    console = Console()
    console.print(table)
    console.print(f"report: {cfg.run_dir / 'result.json'}")


def _cmd_demo(args) -> int:
    from medboost.pipelines.demo import DEMO_EPOCHS, run_demo

    run_demo(
        dataset=args.dataset,
        epochs=args.epochs or DEMO_EPOCHS,
        output_dir=args.output_dir,
        data_dir=args.data_dir,
        seed=args.seed,
        block=args.block,
        download=not args.no_download,
    )
    return 0


def _cmd_predict(args) -> int:
    from medboost.pipelines.predict import predict_files

    rows = predict_files(args.model, args.files, saliency_dir=args.saliency, saliency_method=args.saliency_method)
    for row in rows:
        print(json.dumps(row))
    return 0


def _cmd_evaluate(args) -> int:
    from medboost.pipelines.vision_language import evaluate_saved

    result = evaluate_saved(args.run, manifest=args.manifest, split=args.split, out_dir=args.output_dir)
    print(json.dumps(result["test"], indent=2))
    return 0


def _cmd_ask(args) -> int:
    from medboost.pipelines.vision_language import ask

    out = ask(args.model, args.image, args.ehr, args.question, args.candidates or ())
    if "answer" in out:
        print(f"answer: {out['answer']}")
        for candidate, score in out["scores"].items():
            print(f"  {score:9.4f}  {candidate}")
    print(f"generated: {out['generated']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medboost", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    llm = sub.add_parser("llm", help="frozen language-model blocks").add_subparsers(dest="llm_command", required=True)
    llm.add_parser("list", help="presets and where their weights are")
    inspect = llm.add_parser("inspect", help="architecture, sizes and load time of one layer of a checkpoint")
    inspect.add_argument("source", help="preset, .gguf file, HF folder or hub id, or Meta checkpoint")
    inspect.add_argument("--layer", type=int, default=None, help="layer index (negative from the end)")
    inspect.add_argument("--json", action="store_true")

    # The run config's own arguments (-c RECIPE, --section.key VALUE, --help, --print_config) go to its jsonargparse
    # parser (engine.config.parse_run_args); only these two are the command's.
    train = sub.add_parser(
        "train", add_help=False, help="train from a YAML recipe; any key: --section.key VALUE (--help lists them)"
    )
    train.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoints/last.ckpt")
    train.add_argument(
        "--dry-run", action="store_true", help="check data, model and settings on one batch; no run folder"
    )
    demo = sub.add_parser("demo", help="train the ViT with and without a frozen LLM block and compare on test")
    for command in (train, demo):
        command.add_argument("--verbose", action="store_true", help="show every library message and warning")
    demo.add_argument("--dataset", default="breastmnist")
    demo.add_argument(
        "--epochs", type=int, default=None, help="epochs of every arm (default: the tuned CPU recipe's schedule)"
    )
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--data-dir", default=None, help="folder holding the MedMNIST .npz (default: search path)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--block", default="smollm2-135m", help="LLM source for the boosted model")
    demo.add_argument("--no-download", action="store_true", help="never try to download the dataset")

    predict = sub.add_parser("predict", help="classify image files (PNG/JPG/NIfTI/npy) with a saved model")
    predict.add_argument("model", help="a saved model folder (run folder's model/)")
    predict.add_argument("files", nargs="+")
    predict.add_argument("--saliency", default=None, help="write saliency overlays (PNG) and raw maps (.npy) here")
    predict.add_argument(
        "--saliency-method",
        default="gradcam",
        choices=("gradcam", "rollout"),
        help="Grad-CAM or attention rollout (ViT)",
    )

    evaluate = sub.add_parser(
        "evaluate", help="evaluate a saved vision-language (MedBLIP) model as its run's test does"
    )
    evaluate.add_argument("run", help="a run folder or its model/ folder")
    evaluate.add_argument("--manifest", default=None, help="evaluate every row of this manifest instead of a split")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"), help="the run's split to use")
    evaluate.add_argument("--output-dir", default=None, help="write predictions.csv and confusion matrices here")

    ask = sub.add_parser("ask", help="ask a saved MedBLIP model one question about one volume")
    ask.add_argument("model", help="a run folder or its model/ folder")
    ask.add_argument("--image", required=True, help="a NIfTI volume or DICOM series folder")
    ask.add_argument("--ehr", default="", help="the clinical text shown with the question")
    ask.add_argument("--question", required=True)
    ask.add_argument("--candidates", nargs="+", default=None, help="candidate answers to score")
    for command in (evaluate, ask):
        command.add_argument("--verbose", action="store_true", help="show every library message and warning")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        if args.command == "llm":
            return _cmd_llm_list(args) if args.llm_command == "list" else _cmd_llm_inspect(args)
        if args.command in ("train", "demo", "evaluate", "ask"):
            from medboost.engine.quiet import quiet_libraries

            commands = {"train": lambda: _cmd_train(args, extra), "demo": lambda: _cmd_demo(args)}
            commands.update(evaluate=lambda: _cmd_evaluate(args), ask=lambda: _cmd_ask(args))
            with quiet_libraries(args.verbose):
                return commands[args.command]()
        if args.command == "predict":
            return _cmd_predict(args)
    except MedboostError as err:
        print(f"medboost: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "medboost: interrupted (a resumable checkpoint is in the run folder's checkpoints/last.ckpt)",
            file=sys.stderr,
        )
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
