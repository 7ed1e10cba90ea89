"""The ``forgetless`` command line: one subcommand per stage, flags built from the stage configs.

Every subcommand takes ``--config FILE.yaml``, a ``--<field>`` flag per config field, and
``key=value`` overrides (``key.sub=value`` for nested sections). Errors print one line and exit 2;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import traceback
from importlib import resources
from pathlib import Path
from typing import Callable

from forgetless import __version__
from forgetless.config import REQUIRED, ConfigError, field_help, load_config
from forgetless.core.errors import ForgetlessError
from forgetless.core.recipes import recipe_lines
from forgetless.lm import distributed
from forgetless.eval.stage import EvalConfig, print_eval_summary, run_eval
from forgetless.generate.stage import GenerateConfig, print_generate_summary, run_generate
from forgetless.mask.stage import MaskConfig, run_mask
from forgetless.report.stage import ReportConfig, print_report
from forgetless.retention.stage import RetentionConfig, run_retention
from forgetless.run import RunConfig, report_run, run_experiment
from forgetless.verdict import print_verdict
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
    "run": (RunConfig, run_experiment, print_verdict),
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


# A command each subcommand's --help shows; tests/test_config_cli.py checks that each builds a valid config.
EXAMPLES = {
    "score": "forgetless score --data my.jsonl --limit 16 --output-dir runs/mine/scores",
    "mask": "forgetless mask --scores runs/mine/scores --policy auto-tau --fraction 0.2 --output-dir runs/mine/masks",
    "generate": "forgetless generate --method self_output --data mbpp-train --limit 8 --output-dir runs/mine/generate",
    "train": "forgetless train --data runs/mine/masks/data.parquet --adapter-type lora --learning-rate 1e-4 "
             "--output-dir runs/mine/train",
    "eval": "forgetless eval --tasks gsm8k --limit 20 --adapter runs/mine/train/adapter --output-dir runs/mine/eval",
    "retention": "forgetless retention --mc-tasks arc_easy --adapter runs/mine/train/adapter "
                 "--output-dir runs/mine/ret",
    "report": "forgetless report runs/demo",
    "run": "forgetless run demo data=my.jsonl --output-dir runs/mine",
}
# What else a subcommand's --help shows below its example.
MORE_HELP = {"run": f"\n\nrecipes (methods: [{{method: NAME, ...}}]):\n{recipe_lines()}"}
# Flag spellings that differ from the field name: (config field, flag) for one output directory everywhere and an
# adapter *kind* that is not confused with the adapter *directory* of eval/retention.
# Errors shown as one line: forgetless's own (a setting, a file, a data set to fix) and a path that does not exist.
USER_ERRORS = (ForgetlessError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
FLAG_NAMES = {"out_dir": "output-dir", "output_dir": "output-dir"}
TRAIN_FLAG_NAMES = {"adapter": "adapter-type"}
DEPRECATED = {"--out-dir": "--output-dir"}
TRAIN_DEPRECATED = {"--adapter": "--adapter-type"}


def flag_names(command: str) -> dict[str, str]:
    return {**FLAG_NAMES, **(TRAIN_FLAG_NAMES if command == "train" else {})}


def deprecated_flags(command: str) -> dict[str, str]:
    return {**DEPRECATED, **(TRAIN_DEPRECATED if command == "train" else {})}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgetless", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"forgetless {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, fn, _) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0], allow_abbrev=False,
                           epilog=f"example: {EXAMPLES[name]}{MORE_HELP.get(name, '')}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML file with this stage's settings")
        p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        names = flag_names(name)
        for field_name, default, help_text in field_help(cls):
            flag = names.get(field_name, field_name.replace("_", "-"))
            shown = "required" if default is REQUIRED else f"default: {default}"
            p.add_argument(f"--{flag}", dest=f"set_{field_name}", metavar="VALUE", help=f"{help_text} ({shown})",
                           default=argparse.SUPPRESS)
        p.add_argument("overrides", nargs="*", metavar="[CONFIG] key=value",
                       help="a config file or shipped config name, then key=value overrides "
                            "(key.sub=value for sections)")
    return parser


def rename_deprecated(command: str, argv: list[str]) -> list[str]:
    """Old flag spellings (``--out-dir``; train's ``--adapter``) become the new ones, with one line on stderr."""
    old_to_new, out = deprecated_flags(command), []
    for arg in argv:
        old, eq, value = arg.partition("=")
        if old in old_to_new:
            print(f"forgetless {command}: {old} is deprecated; use {old_to_new[old]}", file=sys.stderr)
            arg = old_to_new[old] + eq + value
        out.append(arg)
    return out


def unknown_flag_error(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """One line naming the unknown arguments, and the flags of the command that the first unknown flag may mean:
    those whose words start with its letters (``--lr``: ``--learning-rate``), then the nearest spellings."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    first = next((u.split("=")[0] for u in unknown if u.startswith("--")), None)
    near: list[str] = []
    if first:
        letters = first[2:].replace("-", "")
        near = [f for f in flags if "".join(w[0] for w in f[2:].split("-")).startswith(letters) and len(letters) > 1]
        near = near or difflib.get_close_matches(first, flags, n=2, cutoff=0.6)
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {', '.join(near[:3])}?)" if near else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        argv = [argv[0], *rename_deprecated(argv[0], argv[1:])]
    # key=value overrides may stand anywhere, also between --flags.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        print(f"forgetless {args.command}: error: {unknown_flag_error(parser, args.command, unknown)}", file=sys.stderr)
        return 2
    args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
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
    except USER_ERRORS as e:  # what the user can fix from the message: one line (--debug: the traceback)
        if args.debug:
            raise
        print(f"forgetless {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # a bug, or a resource that ran out (memory, disk): the traceback, and where to send it
        traceback.print_exc()
        print(f"forgetless {args.command}: unexpected error (forgetless {__version__}): a bug, or a resource such as "
              f"memory that ran out. If it is not the latter, please report it to the forgetless maintainers with the "
              f"traceback above and the command that ran.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
