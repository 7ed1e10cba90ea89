"""The ``forgetless`` command line: one subcommand per stage, flags built from the stage configs.

Every subcommand takes ``--config FILE.yaml``, a ``--<field>`` flag per config field, and
``key=value`` overrides (``key.sub=value`` for nested sections). Errors print one line and exit 2;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Callable

from forgetless import __version__
from forgetless.config import ConfigError, field_help, load_config
from forgetless.lm import distributed
from forgetless.eval.stage import EvalConfig, print_eval_summary, run_eval
from forgetless.generate.stage import GenerateConfig, print_generate_summary, run_generate
from forgetless.mask.stage import MaskConfig, run_mask
from forgetless.report.stage import ReportConfig, print_report
from forgetless.retention.stage import RetentionConfig, run_retention
from forgetless.run import RunConfig, report_run, run_experiment
from forgetless.score.stage import ScoreConfig, run_score
from forgetless.lm.summary import print_mask_summary, print_score_summary
from forgetless.train.stage import TrainConfig, run_train

# name -> (config class, stage function, printer of the stage's results)
COMMANDS: dict[str, tuple[type, Callable, Callable]] = {
    "score": (ScoreConfig, run_score, print_score_summary),
    "mask": (MaskConfig, run_mask, print_mask_summary),
    "generate": (GenerateConfig, run_generate, print_generate_summary),
    "train": (TrainConfig, run_train, lambda out: None),  # run_train prints its own summary
    "eval": (EvalConfig, run_eval, print_eval_summary),
    "retention": (RetentionConfig, run_retention, lambda out: print(f"retention records in {out}")),
    "report": (ReportConfig, report_run, print_report),
    "run": (RunConfig, run_experiment, print_report),
}


def resolve_config_path(name: str) -> Path:
    """A config file path, or the name of a config shipped with forgetless (``demo``, ``frontier``, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = Path(str(resources.files("forgetless") / "configs" / f"{path.stem}.yaml"))
    if bundled.is_file() and path.suffix in ("", ".yaml", ".yml") and path.parent == Path("."):
        return bundled
    shipped = sorted(p.stem for p in bundled.parent.glob("*.yaml"))
    raise ConfigError(f"config {name!r} not found (shipped configs: {', '.join(shipped)})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgetless", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"forgetless {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, fn, _) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--config", help="YAML file with this stage's settings")
        p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        for field_name, default, help_text in field_help(cls):
            p.add_argument(f"--{field_name.replace('_', '-')}", dest=f"set_{field_name}", metavar="VALUE", help=help_text, default=argparse.SUPPRESS)
        p.add_argument("overrides", nargs="*", metavar="[CONFIG] key=value", help="a config file or shipped config name, then overrides, e.g. tau=10")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may stand anywhere, also between --flags.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cls, stage, show = COMMANDS[args.command]
    flags = [f"{k[4:]}={v}" for k, v in vars(args).items() if k.startswith("set_")]
    overrides = [o for o in args.overrides if "=" in o]
    paths = [o for o in args.overrides if "=" not in o] + ([args.config] if args.config else [])
    if args.command == "report" and paths and Path(paths[0]).is_dir():  # forgetless report RUN_DIR
        overrides.append(f"run_dir={paths.pop(0)}")
    try:
        if len(paths) > 1:
            raise ConfigError(f"one config file at most, got {paths}")
        config = load_config(cls, resolve_config_path(paths[0]) if paths else None, flags + overrides)
        out = stage(config)
        if distributed.is_main():  # under a launcher the first process wrote the results
            show(out)
        distributed.stop()
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, re-run to continue", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; --debug for the traceback
        if args.debug or not isinstance(e, (ConfigError, ValueError, OSError, RuntimeError)):
            raise
        print(f"forgetless {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
