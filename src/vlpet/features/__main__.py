"""``python -m vlpet.features IMAGES OUTPUT_DIR [--encoder NAME] ...``: stand-alone extractor."""

from __future__ import annotations

import argparse
import json
import sys

from .extract import ENCODERS, DTYPES, UnknownEncoderError, extract_features


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name}: {spec.description}" for name, spec in ENCODERS.items())
    p = argparse.ArgumentParser(
        prog="python -m vlpet.features",
        description="Write [49, F] grid features, one HDF5 file per image ({out}/{img_id}.h5).",
        epilog="encoders:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", help="image directory (non-recursive) or a single image file")
    p.add_argument("output_dir")
    p.add_argument("--encoder", default="efficientnet-lite0", help=f"one of: {', '.join(ENCODERS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--forward-batch-size", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default=None)
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = extract_features(
            args.images, args.output_dir, encoder=args.encoder, batch_size=args.batch_size,
            dtype=args.dtype, progress=not args.no_progress, device=args.device,
            on_error=args.on_error, overwrite=args.overwrite,
            forward_batch_size=args.forward_batch_size,
        )
    except (UnknownEncoderError, ImportError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
