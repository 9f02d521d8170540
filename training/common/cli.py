"""The one command-line convention of the training stages (the flag table is in docs/ARCHITECTURE.md).

Output folder: `--output` (`--out` accepted as an alias); a single input model: `--model` (several inputs are named
by role: `--base`, `--specialist`, `--fused`, ...); redo / overwrite: `--force` (`--overwrite` accepted as an
alias). A user error prints one line, "<prog>: error: <message>", and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def user_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Inside it, the caller's input errors (a missing file or model folder, an output folder that exists, a bad
    value, a data source that is not installed) end the command as `parser.error`: one line, exit status 2."""
    from training.common.shared_data import SourceMissing

    try:
        yield
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, SourceMissing) as error:
        parser.error(str(error))


def require_model_folder(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    """`parser.error` unless `path` (the value of `flag`) is a folder (a Conan model repo on this machine)."""
    if not Path(path).is_dir():
        parser.error(f"{flag} {path}: no such model folder")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Run-control flags shared by the accelerate-launched stages (specialist, rehearse)."""
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--resume", default="auto", help="auto (newest checkpoint, default) | never | FOLDER")
    parser.add_argument("--stop-after", type=int, help="stop after this step (checkpoint first via save_every)")
    parser.add_argument("--force", "--overwrite", dest="force", action="store_true",
                        help="replace an existing output folder")


def run_training_stage(
    argv: list[str] | None, prog: str, description: str, config_help: str, model_flags: tuple[str, ...],
    model_key: str, load_config: Callable[[str, dict[str, Any]], Any], run: Callable[..., dict[str, Any]],
    summary: Callable[[dict[str, Any]], dict[str, Any]],
) -> int:
    """The CLI of a config-driven, resumable training stage (specialist, rehearse): parse the flags, load the config
    (`model_flags` override the config key `model_key`), `run(cfg, resume=, stop_after=, overwrite=)`, print
    `summary(result)` as JSON; a user error (a model folder that does not exist included) prints
    "python -m training.<prog>: error: <message>" and returns 2."""
    parser = argparse.ArgumentParser(prog=f"python -m training.{prog}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument(*model_flags, dest="model", help=f"override the config's `{model_key}:` model folder")
    parser.add_argument("--output", "--out", dest="output", help="override the output folder")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, {model_key: args.model, "output": args.output})
        model = Path(getattr(cfg, model_key))
        if not model.is_dir():  # else transformers answers with a Hub repo-id error about the path
            raise FileNotFoundError(f"{model_key} {model}: no such model folder (the config's `{model_key}:` or "
                                    f"{' / '.join(model_flags)})")
        if args.max_steps is not None:
            cfg.train.max_steps = args.max_steps
        result = run(cfg, resume=args.resume, stop_after=args.stop_after, overwrite=args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary(result), indent=1))
    return 0
