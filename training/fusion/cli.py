"""Stage F (docs/ARCHITECTURE.md, data flow): fuse modality specialists into one dense backbone.

    python -m training.fuse --config training/configs/fusion/example.yaml
    python -m training.fuse --base BASE --model image=PATH --model audio=PATH:0.5 --method ties --density 0.2 \
        --output OUT

The library lives in `training/fusion/`; this file is the command-line entry point and re-exports the API.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.fusion import CheckpointError, ConfigError, FusionConfig, ModelSpec, PlanError, fuse, load_config
from training.fusion.config import METHODS, SEMANTICS

__all__ = ["FusionConfig", "ModelSpec", "fuse", "load_config", "main"]


def _model_arg(text: str) -> dict:
    """NAME=PATH[:WEIGHT]"""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model expects NAME=PATH[:WEIGHT], got {text!r}")
    name, rest = text.split("=", 1)
    path, weight = rest, 1.0
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        try:
            weight, path = float(tail), head
        except ValueError:
            pass
    return {"name": name, "path": path, "weight": weight}


def _group_lambda(text: str) -> tuple[str, float]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--lambda-group expects GROUP=VALUE, got {text!r}")
    g, v = text.split("=", 1)
    return g, float(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.fuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML config (flags override its keys)")
    p.add_argument("--base", help="base model folder")
    p.add_argument("--model", action="append", type=_model_arg, dest="models", help="NAME=PATH[:WEIGHT], repeatable")
    p.add_argument("--output", help="output folder (written atomically)")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--semantics", choices=SEMANTICS)
    p.add_argument("--lambda", type=float, dest="lambda_")
    p.add_argument("--lambda-group", action="append", type=_group_lambda, help="GROUP=VALUE, repeatable")
    p.add_argument("--density", type=float)
    p.add_argument("--gamma", type=float)
    p.add_argument("--trim-scope", choices=["tensor", "model"], help="TIES top-k per tensor or over the whole model")
    p.add_argument("--normalize", choices=["true", "false"])
    p.add_argument("--seed", type=int)
    p.add_argument("--out-dtype", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--reference", action="store_true", default=None, help="compute in float64")
    p.add_argument("--workers", type=int)
    p.add_argument("--memory-limit-gb", type=float)
    p.add_argument("--chunk-elems", type=int)
    p.add_argument("--files-from")
    p.add_argument("--force", "--overwrite", dest="overwrite", action="store_true", default=None,
                   help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        "base": args.base, "models": args.models, "output": args.output, "method": args.method,
        "semantics": args.semantics, "lambda": args.lambda_, "density": args.density, "gamma": args.gamma,
        "trim_scope": args.trim_scope,
        "normalize": None if args.normalize is None else args.normalize == "true", "seed": args.seed,
        "out_dtype": args.out_dtype, "reference": args.reference, "workers": args.workers,
        "memory_limit_gb": args.memory_limit_gb, "chunk_elems": args.chunk_elems, "files_from": args.files_from,
        "overwrite": args.overwrite, "progress": False if args.no_progress else None,
        "lambda_groups": dict(args.lambda_group) if args.lambda_group else None,
    }
    try:
        cfg = load_config(args.config, **overrides)
        manifest = fuse(cfg)
    except (ConfigError, PlanError, CheckpointError, FileExistsError) as e:
        print(f"fuse: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(cfg.output), **manifest["summary"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
