"""The ``cdfast`` command: ``train`` runs a group, ``experiment`` a comparison grid, ``report`` writes
a grid's report, ``models`` lists the model names."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

from cdfast import presets
from cdfast.train.config import RESUME_FREE, TrainConfig

EPILOG = f"""Settings come from the defaults, then --config FILE (YAML with the same keys, '-' or '_'),
then the flags given here. --resume DIR continues a run from its last checkpoint (or from step 0
if it stopped before its first one) with the settings stored in it; flags may then change only
how it executes, evaluates and reports ({", ".join(k.replace("_", "-") for k in RESUME_FREE if k != "out")}).
Any other change is refused, listing the differences, unless --resume-with-changes is given: then
it applies from the next step on and is recorded in the run's changes.jsonl. A resumed run stays
in its own folder (--out cannot move it)."""


def _base_type(tp):
    """(element type, is_list) of a dataclass field annotation such as ``int | None`` or ``list[str]``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _base_type(args[0])
    if typing.get_origin(tp) is list:
        return args[0], True
    return tp, False


def _parser_for(kind, is_list: bool, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        if is_list:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        return kind(text)
    parse.__name__ = kind.__name__ + ("-list" if is_list else "")
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind, is_list = _base_type(hints[f.name])
        optional = type(None) in typing.get_args(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if is_list else default
        help_text = f"{f.metadata['help']} (default: {shown})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=_parser_for(kind, is_list, optional), default=argparse.SUPPRESS,
                                choices=f.metadata.get("choices"), metavar=f.name.upper(), help=help_text)


def flag_overrides(args: argparse.Namespace) -> dict:
    """The config fields given as flags."""
    field_names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in field_names}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The settings of a new run: defaults, then --config, then flags."""
    base = TrainConfig.from_yaml(presets.resolve(args.config, "train")) if args.config else TrainConfig()
    return dataclasses.replace(base, **flag_overrides(args))


def cmd_train(args: argparse.Namespace) -> int:
    from cdfast.distributed import init_from_environment

    joined = init_from_environment()  # under torchrun: one rank of a data-parallel job
    try:
        if joined and torch_distributed_rank() > 0:  # rank 0 speaks for the job
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                return _train(args)
        return _train(args)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def torch_distributed_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _train(args: argparse.Namespace) -> int:
    from cdfast.train import Trainer

    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its own settings; drop --config (flags may still "
                             "change how it executes; see --help)")
        trainer = Trainer(resume=args.resume, overrides=flag_overrides(args), allow_changes=args.resume_with_changes)
    else:
        if args.resume_with_changes:
            raise ValueError("--resume-with-changes needs --resume RUN_DIR")
        trainer = Trainer(config_from_args(args))
    cfg = trainer.cfg
    g = trainer.group
    print(f"cdfast: {cfg.mode} training ({'teachers=' + cfg.teachers + ', ' if cfg.mode == 'competitive' else ''}"
          f"features {'on' if g.feature_loss else 'off'}, perturbation {'on: ' + ','.join(g.pool.names) if g.perturb else 'off'}) "
          f"of {len(cfg.models)} networks [{', '.join(cfg.models)}] on {cfg.data} "
          f"({trainer.data.train_size} train / {trainer.data.test_size} test images, {trainer.data.num_classes} classes) "
          f"for {cfg.epochs} epochs on {trainer.device}"
          + (f" x {trainer.world} processes (data parallel, global batch {cfg.batch_size})" if trainer.world > 1 else "")
          + f", engine {engine_label(g)}; outputs in {trainer.out}")
    if trainer.step:
        from cdfast.train.trainer import position

        print(f"cdfast: resumed from {position(*trainer.saved_at, trainer.steps_per_epoch)}")
    summary = trainer.fit()
    if summary.get("epochs", 0) >= cfg.epochs:
        print(trainer.summary_table(summary))
        print(f"cdfast: done. In {trainer.out}: config.yaml, epochs.jsonl (per epoch), steps.csv (per step: "
              f"teacher, losses), checkpoint.pt, summary.txt"
              + (", accuracy.png, teacher_timeline.png" if cfg.plots else "")
              + (", tensorboard/" if cfg.tensorboard else ""))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from cdfast.experiment import Grid, run_grid
    from cdfast.report import write_report

    grid = Grid.from_yaml(presets.resolve(args.config, "experiment"))
    out = Path(args.out or f"runs/experiment-{Path(args.config).stem}")
    overrides = {"progress": args.progress, **({"device": args.device} if args.device else {})}
    print(f"cdfast experiment: {len(grid.runs())} runs ({len(grid.groups)} groups, {len(grid.methods)} methods, "
          f"{len(grid.seeds)} seeds) in {out}; finished runs are skipped, interrupted ones resumed")
    results = run_grid(grid, out, overrides)
    report = write_report(out)
    print(f"cdfast experiment: results in {results}, report in {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cdfast.report import write_report

    print(f"cdfast report: {write_report(args.grid_dir, args.out, args.title)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cdfast.models import available_models

    for family, names in available_models().items():
        print(f"{family}:\n  " + "\n  ".join(names))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cdfast.train.export import export_member

    path = export_member(args.run, args.member, args.out, program=args.program, force=args.force)
    what = "a torch.export program (torch.export.load(path).module()(images) -> logits)" if args.program else \
        "its state_dict (plain keys: load it into cdfast.models.build_model(name, classes, channels))"
    print(f"cdfast: wrote network {args.member} of {args.run} to {path}: {what}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cdfast.train.evaluate import evaluate_run

    overrides = {k: v for k, v in (("device", args.device), ("data_dir", args.data_dir),
                                   ("test_subset", args.test_subset), ("bn_recalibration", args.bn_recalibration),
                                   ("eval_batch_size", args.eval_batch_size)) if v is not None}
    metrics, cfg = evaluate_run(args.run, **overrides)
    recal = f"BatchNorm recalibrated on {cfg.bn_recalibration} training batches" if cfg.bn_recalibration else \
        "running BatchNorm statistics"
    from cdfast.train.trainer import position

    where = position(metrics["epoch"], metrics["step"], metrics["epoch_progress"])
    print(f"cdfast: {args.run} at {where}, {metrics['test_images']} test images of {cfg.data}, {recal}")
    print(f"{'network':<10}{'model':<22}{'test acc':>10}{'test loss':>11}")
    for i, name in enumerate(cfg.models):
        print(f"{'net ' + str(i):<10}{name:<22}{100 * metrics['test_acc'][i]:>9.2f}%{metrics['test_loss'][i]:>11.4f}")
    print(f"{'ensemble':<10}{'mean of softmax':<22}{100 * metrics['ensemble_acc']:>9.2f}%")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for kind, command in (("train", "cdfast train --config NAME"), ("experiment", "cdfast experiment --config NAME")):
        print(f"{command}:")
        for name in presets.available(kind):
            print(f"  {name:<22} {presets.describe(kind, name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdfast", description="Competitive Distillation, fast.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a group of networks", epilog=EPILOG)
    train.add_argument("--config", help="YAML config file, or a preset's name (cdfast presets lists them)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--resume-with-changes", action="store_true",
                       help="with --resume: apply flags that change the training (lr, alpha, epochs, ...) from the "
                            "resumed step on, recorded in the run's changes.jsonl")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)
    experiment = sub.add_parser(
        "experiment", help="run a comparison grid (methods x ablations x groups x seeds), then its report",
        description="Run every (group, method, seed) of a grid file; rerunning skips finished runs and resumes "
                    "interrupted ones. `cdfast presets` lists the grids shipped with cdfast; cdfast/experiment.py "
                    "describes the format.")
    experiment.add_argument("--config", required=True, help="grid YAML file (base, groups, methods, seeds, report), "
                                                            "or a preset's name")
    experiment.add_argument("--out", help="grid folder (default: runs/experiment-<config name>)")
    experiment.add_argument("--device", help="override the device of every run (cpu, cuda, cuda:N, mps or auto)")
    experiment.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                            help="per-epoch progress bars (default: off; one line per run and epoch)")
    experiment.set_defaults(func=cmd_experiment)
    report = sub.add_parser("report", help="write report.md and plots from a grid folder's results.jsonl")
    report.add_argument("grid_dir", help="the folder cdfast experiment wrote")
    report.add_argument("--out", help="where report.md and the PNGs go (default: the grid folder)")
    report.add_argument("--title", help="report title")
    report.set_defaults(func=cmd_report)
    models = sub.add_parser("models", help="list the model names build_model accepts")
    models.set_defaults(func=cmd_models)
    export = sub.add_parser("export", help="write one network of a run: its plain state_dict or a torch.export program")
    export.add_argument("run", help="the run folder (its latest checkpoint is used)")
    export.add_argument("--member", type=int, required=True, help="which network (0-based, as in the run's models)")
    export.add_argument("--out", help="the file to write (default: RUN/member-<i>.pt, or .pt2 with --program)")
    export.add_argument("--program", action="store_true", help="a torch.export program (images -> logits) instead of "
                                                              "a state_dict")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=cmd_export)
    evaluate = sub.add_parser("evaluate", help="test accuracy of every network of a run and of their ensemble "
                                               "(writes nothing)")
    evaluate.add_argument("run", help="the run folder (its latest checkpoint is used)")
    evaluate.add_argument("--device", help="where to evaluate (default: the run's)")
    evaluate.add_argument("--data-dir", help="where the data set is (default: the run's)")
    evaluate.add_argument("--test-subset", type=int, help="evaluate on a random subset of this many test images")
    evaluate.add_argument("--eval-batch-size", type=int, help="evaluation batch size (default: the run's)")
    evaluate.add_argument("--bn-recalibration", type=int, help="BatchNorm recalibration batches (default: the run's; "
                                                               "0: running statistics)")
    evaluate.set_defaults(func=cmd_evaluate)
    listed = sub.add_parser("presets", help="list the training configs and grids shipped with cdfast (--config NAME)")
    listed.set_defaults(func=cmd_presets)
    return parser


def engine_label(group) -> str:
    """The engine as the user will get it: auto on a GPU is only decided by timing at the first step."""
    if group.engine_spec == "auto" and next(group.parameters()).is_cuda:
        return "auto (the fastest, timed at the first step)"
    return group.engine_spec if group.graphed else group.engine.name


def main(argv: list[str] | None = None) -> int:
    from cdfast.safe_write import WriteError
    from cdfast.train import NonFiniteLossError
    from cdfast.train.trainer import TrainingStopped

    args = build_parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except TrainingStopped as e:
        again = " The grid goes on when you run the same `cdfast experiment` again." if args.command == "experiment" else ""
        print(f"cdfast: {e}.{again}", file=sys.stderr)
        return e.exit_code
    except NonFiniteLossError as e:
        print(f"cdfast: error: {e}", file=sys.stderr)
        return 1
    except WriteError as e:
        print(f"cdfast: error: {e.strerror or e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"cdfast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdfast: interrupted; completed checkpoints are intact: continue a run with `cdfast train --resume "
              "RUN_DIR`, a grid by running the same `cdfast experiment` again", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last resort: one line, the traceback on request
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"cdfast: unexpected error in `cdfast {args.command}`: {type(e).__name__}: {first[:300]}. "
              "Run again with `cdfast --debug ...` for the full traceback; completed checkpoints are intact",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
