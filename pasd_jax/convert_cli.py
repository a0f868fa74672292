"""`pasd-convert {export,import,cache}` (or `python -m pasd_jax.convert_cli`): PASD checkpoints between pasd-jax
and the official layout. It stands above `runs` (export reads a training run), so it is not part of `convert`.

  export --ckpt <train.py checkpoint dir> --out <folder> [--step N] [--overwrite]
      unet/ + controlnet/ in the official PyTorch layout (fp32) and a README of what was trained.
  import --pasd <official checkpoint folder> --out <folder> [--overwrite]
      the same checkpoint as Flax-layout files that `sample.py --ckpt <folder>` loads without converting.
  cache {info,clear}
      where the converted-weights cache is and how big; delete its entries.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from pasd_jax.convert.cache import ENV, resolve_cache
from pasd_jax.convert.io import WeightFileError
from pasd_jax.safe_write import OutputPathError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pasd-convert", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="train.py checkpoint -> official PyTorch PASD folder")
    e.add_argument("--ckpt", required=True, help="train.py checkpoint directory")
    e.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    i = sub.add_parser("import", help="official PyTorch PASD folder -> pasd-jax Flax-layout folder")
    i.add_argument("--pasd", required=True, help="official checkpoint folder with unet/ and controlnet/, or a "
                   "Hugging Face name org/name[:subfolder] (e.g. yangtao9009/PASD:pasd/checkpoint-100000)")
    i.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c = sub.add_parser("cache", help=f"the converted-weights cache (location: ${ENV})")
    c.add_argument("action", choices=("info", "clear"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pasd_jax").setLevel(logging.INFO)  # our progress; JAX and Orbax only when they warn
    from pasd_jax.convert import release  # after argument parsing: --help needs no JAX
    from pasd_jax.runs.export import export_train_checkpoint  # reads train.py runs

    try:
        if args.command == "export":
            out = export_train_checkpoint(args.ckpt, args.out, step=args.step, overwrite=args.overwrite)
            print(f"exported {out}")
        elif args.command == "import":
            from pasd_jax.convert.hub import resolve_pasd  # a Hugging Face name -> the HF cache
            out = release.import_official(resolve_pasd(args.pasd, flag="--pasd"), args.out, overwrite=args.overwrite)
            print(f"imported {out}")
        else:
            cache = resolve_cache()
            if cache is None:
                print(f"the conversion cache is off (${ENV})")
            elif args.action == "clear":
                print(f"removed {cache.clear()} entries from {cache.root}")
            else:
                files = list(cache.root.glob("*.safetensors")) if cache.root.is_dir() else []
                size = sum(f.stat().st_size for f in files)
                print(f"{cache.root}: {len(files)} entries, {size / 2**20:.1f} MiB")
    except (release.ReleaseError, OutputPathError, WeightFileError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
