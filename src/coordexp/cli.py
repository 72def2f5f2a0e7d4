"""The ``coordexp`` command: small user-facing entry points beside the DVC stages (check-config, synth, predict,
rehearsal-checkpoint)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from coordexp.core.config import ConfigError, EvaluateConfig, load_params
from coordexp.core.errors import UserError


def _check_config(args: argparse.Namespace) -> int:
    try:
        load_params(args.path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("ok")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from coordexp.preprocess import synth  # lazy: the CLI answers --help without numpy/PIL

    return synth.main(args.rest) or 0


def _evaluate_defaults() -> EvaluateConfig:
    """The project's ``evaluate`` settings (decoding, readout, score, window) when a valid ``params.yaml`` is found from
    the working directory, else the schema's: ``predict`` answers as the evaluation measured."""
    try:
        return load_params().evaluate
    except ConfigError:
        return EvaluateConfig()


def _predict(args: argparse.Namespace) -> int:
    """Exit 0: every input was processed; 1: some were refused (one stderr line each), the rest
    are in predictions.json; 2: nothing could be done (e.g. no usable checkpoint)."""
    from coordexp.evaluate.predict import predict  # lazy: torch and transformers, only for predict

    try:
        cfg = _evaluate_defaults()
        res = predict(
            args.checkpoint,
            args.images,
            args.out,
            max_new_tokens=args.max_new_tokens,
            decoding=args.decoding or cfg.decoding,
            readout=args.readout or cfg.readout,
            score=cfg.score,
            local_window=cfg.local_window,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in res["images"]:
        print(f"{r['image']}: {len(r['objects'])} objects")
    n = len(res["images"])
    wrote = f"wrote {args.out / 'predictions.json'} ({n} image{'' if n == 1 else 's'}, coordinates in pixels)"
    if res["refused"]:
        print(f"{wrote}; {len(res['refused'])} of {len(args.images)} inputs refused (listed there under 'refused')")
        return 1
    print(f"{wrote} and the drawn images")
    return 0


def _rehearsal_checkpoint(args: argparse.Namespace) -> int:
    from coordexp.build_base.rehearsal import build_rehearsal  # lazy: torch and transformers

    if args.layers < 1 or args.vision_depth < 1:
        print(
            f"error: --layers and --vision-depth must be >= 1, got {args.layers} and {args.vision_depth}",
            file=sys.stderr,
        )
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} exists and is not empty; choose a new folder or remove it", file=sys.stderr)
        return 2
    out = build_rehearsal(args.arch, args.out, layers=args.layers, vision_depth=args.vision_depth, seed=args.seed)
    print(
        f"wrote {out}: a rehearsal checkpoint ({args.arch}, {args.layers} layers, vision depth {args.vision_depth}, "
        "random weights; not a model). Use it with: build_base.mode=expand build_base.expand.source=" + str(out)
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coordexp", description="CoordExp workbench utilities")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a params file (exit 0: ok, exit 2: the problems)")
    p.add_argument("path", nargs="?", type=Path, default=None, help="params file (default: the project's)")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("synth", help="generate the embedded synthetic shapes data set (COCO format)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_synth)

    p = sub.add_parser(
        "predict",
        help="detect objects in your own images with a checkpoint (exit 0: all done, 1: some inputs refused, "
        "2: nothing done)",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="e.g. artifacts/train/final")
    p.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--readout",
        choices=["argmax", "expectation", "median", "local_expectation"],
        default=None,
        help="how coordinates are read from the coord distribution (default: evaluate.readout of params.yaml, "
        "else median)",
    )
    p.add_argument(
        "--decoding",
        choices=("constrained", "free"),
        default=None,
        help="constrained: answers follow the contract grammar by construction; free: plain greedy (default: "
        "evaluate.decoding of params.yaml, else constrained)",
    )
    p.add_argument("images", nargs="+", type=Path)
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "rehearsal-checkpoint",
        help="write a Qwen-VL-shaped checkpoint with the real Qwen vocabulary and widths, reduced depth and random "
        "weights: a rehearsal of build_base.mode=expand -> train -> evaluate at real scale, never a model",
    )
    p.add_argument(
        "--arch", choices=("qwen3_vl", "qwen2_5_vl"), required=True, help="Qwen3-VL-2B or Qwen2.5-VL-3B shape"
    )
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the public checkpoints: 28 / 36)")
    p.add_argument("--vision-depth", type=int, default=2, help="vision blocks (the public checkpoints: 24 / 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=_rehearsal_checkpoint)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:  # synth's own parser reads all its options (REMAINDER would drop leading ones)
        return _synth(argparse.Namespace(rest=argv[1:]))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
