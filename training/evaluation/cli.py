"""Evaluate a Conan model: mteb tasks/benchmarks (MAEB, MIEB, ...), MMEB (VLM2Vec format), or the offline proxy suite.

  python -m training.evaluate mteb  --model DIR --benchmark "MAEB(v1)" [--tasks T ...] [--out DIR]
  python -m training.evaluate mmeb  --model DIR --jsonl FILE:KIND ... | --hf-subsets NAME:KIND ... --image-root DIR
  python -m training.evaluate proxy --model DIR [--tasks ...] [--limit N] [--compare DIR2 ...] [--out DIR]

mteb and MMEB need the official data (Hugging Face Hub) except for local JSONL files; the proxy suite runs offline on
real local data and is labelled "offline proxy suite, not MMEB/MAEB" everywhere it reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _kind_pair(spec: str) -> tuple[str, str]:
    name, _, kind = spec.rpartition(":")
    if not name or kind not in ("image", "video", "visdoc"):
        raise argparse.ArgumentTypeError(f"expected NAME:KIND with KIND in image/video/visdoc, got {spec!r}")
    return name, kind


def cmd_mteb(a: argparse.Namespace) -> int:
    import mteb

    from training.evaluation.embedder import SentenceTransformerEmbedder
    from training.evaluation.mteb_encoder import ConanMtebEncoder

    if not a.benchmark and not a.tasks:
        raise SystemExit("mteb: give --benchmark NAME and/or --tasks NAME ...")
    tasks: list[Any] = []
    if a.benchmark:
        tasks += list(mteb.get_benchmark(a.benchmark).tasks)
    if a.tasks:
        tasks += list(mteb.get_tasks(tasks=a.tasks))
    emb = SentenceTransformerEmbedder(a.model, device=a.device)
    enc = ConanMtebEncoder(emb, model_name=Path(a.model).name, embed_dim=emb.embed_dim, batch_size=a.batch_size)
    cache = mteb.ResultCache(a.out) if a.out else None
    res = mteb.evaluate(enc, tasks, cache=cache, encode_kwargs={"batch_size": a.batch_size})
    for tr in res.task_results:
        print(f"{tr.task_name}\t{tr.get_score():.4f}")
    return 0


def cmd_mmeb(a: argparse.Namespace) -> int:
    from training.evaluation.cache import CachedEmbedder, EmbeddingCache, model_hash
    from training.evaluation.embedder import SentenceTransformerEmbedder
    from training.evaluation.mmeb import load_mmeb_hf, load_mmeb_jsonl, run_mmeb

    data: dict[str, Any] = {}
    for path, kind in a.jsonl or []:
        data[Path(path).stem] = (load_mmeb_jsonl(path, a.image_root, limit=a.limit), kind)
    for name, kind in a.hf_subsets or []:
        if not a.image_root:
            raise SystemExit("mmeb: --hf-subsets needs --image-root (the unpacked MMEB images.zip)")
        data[name] = (load_mmeb_hf(name, a.image_root, dataset=a.hf_dataset, limit=a.limit), kind)
    if not data:
        raise SystemExit("mmeb: give --jsonl FILE:KIND and/or --hf-subsets NAME:KIND")
    emb = CachedEmbedder(SentenceTransformerEmbedder(a.model, device=a.device),
                         EmbeddingCache(Path(a.cache_dir) / "embeddings", model_hash(a.model)))
    res = run_mmeb(emb, data, batch_size=a.batch_size, ties=a.ties)
    print(json.dumps({k: {"main_score": v["main_score"], "metric": v["main_score_name"]}
                      for k, v in res["datasets"].items()}, indent=1))
    print(f"overall (mean main score over {len(data)} sets): {res['overall']:.4f}")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "mmeb_results.json").write_text(json.dumps(res, indent=2, default=float))
    return 0


def cmd_proxy(a: argparse.Namespace) -> int:
    from training.evaluation.report import compare_table, markdown_table, write_reports
    from training.evaluation.suite import run_proxy_suite

    results = {}
    for model in [a.model] + list(a.compare or []):
        r = run_proxy_suite(model, a.tasks, a.limit, a.cache_dir, device=a.device, batch_size=a.batch_size)
        name = base = Path(model).name or "model"
        k = 2
        while name in results:  # the same folder name twice (e.g. runs/a/final vs runs/b/final)
            name, k = f"{base}#{k}", k + 1
        results[name] = r
        if a.out:
            paths = write_reports(r, Path(a.out) / name)
            print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    if len(results) > 1:
        print(compare_table(results))
    else:
        print(markdown_table(next(iter(results.values()))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("mteb", "mmeb", "proxy"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True, help="model folder loadable by SentenceTransformer")
        s.add_argument("--device", default=None)
        s.add_argument("--batch-size", type=int, default=8)
        s.add_argument("--output", "--out", dest="out", default=None, help="folder for results")
        if name == "mteb":
            s.add_argument("--benchmark", default=None, help='e.g. "MAEB(v1)"')
            s.add_argument("--tasks", nargs="*", default=None)
            s.set_defaults(fn=cmd_mteb)
        elif name == "mmeb":
            s.add_argument("--jsonl", nargs="*", type=_kind_pair, help="FILE:KIND (KIND image/video/visdoc)")
            s.add_argument("--hf-subsets", nargs="*", type=_kind_pair, help="e.g. ImageNet-1K:image")
            s.add_argument("--hf-dataset", default="TIGER-Lab/MMEB-eval")
            s.add_argument("--image-root", default=None)
            s.add_argument("--limit", type=int, default=None)
            s.add_argument("--ties", choices=["pessimistic", "optimistic", "average"], default="pessimistic",
                           help="'optimistic' = the official VLM2Vec argmax (gold wins exact ties)")
            s.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "conan-eval"))
            s.set_defaults(fn=cmd_mmeb)
        else:
            from training.evaluation.proxy_tasks import TASKS

            s.add_argument("--tasks", nargs="*", default=None, choices=sorted(TASKS))
            s.add_argument("--limit", type=int, default=None, help="at most N queries per task")
            s.add_argument("--compare", nargs="*", default=None, help="more model folders, shown side by side")
            s.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "conan-eval"))
            s.set_defaults(fn=cmd_proxy)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    raise SystemExit(main())
