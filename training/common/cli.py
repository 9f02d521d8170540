"""The one command-line convention of the training stages (the flag table is in docs/ARCHITECTURE.md).

Output folder: `--output` (`--out` accepted as an alias); a single input model: `--model` (several inputs are named
by role: `--base`, `--specialist`, `--fused`, ...); redo / overwrite: `--force` (`--overwrite` accepted as an
alias). A user error prints one line, "<prog>: error: <message>", and exits with status 2.
"""

from __future__ import annotations

import argparse


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Run-control flags shared by the accelerate-launched stages (specialist, rehearse)."""
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--resume", default="auto", help="auto (newest checkpoint, default) | never | FOLDER")
    parser.add_argument("--stop-after", type=int, help="stop after this step (checkpoint first via save_every)")
    parser.add_argument("--force", "--overwrite", dest="force", action="store_true",
                        help="replace an existing output folder")
