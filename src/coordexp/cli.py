"""The ``coordexp`` command: small user-facing entry points beside the DVC stages."""

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

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:  # synth's own parser reads all its options (REMAINDER would drop leading ones)
        return _synth(argparse.Namespace(rest=argv[1:]))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
