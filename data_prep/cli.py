"""``itpn-prep``: ImageNet (or any class-folder data set) -> WebDataset shards.

    itpn-prep folder SRC OUT [--split train|val] [--shard-samples N] [--seed S] [--workers W]
    itpn-prep imagenet-tar ILSVRC2012_img_train.tar OUT ...
    itpn-prep val SRC LABELS OUT ...      SRC: flat folder or ILSVRC2012_img_val.tar
    itpn-prep verify OUT [--decode]       exit status 1 on any mismatch
    itpn-prep demo OUT                    the embedded demo set (OUT/train, OUT/val)

Re-running a command on the same OUT resumes: verified shards are kept.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from . import demo, sources, writer

log = logging.getLogger("itpn-prep")


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)i?b?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G, 1048576)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def _add_shard_options(p: argparse.ArgumentParser, split: str) -> None:
    p.add_argument("--split", default=split, help=f"split name, also the shard prefix (default {split})")
    p.add_argument("--prefix", default=None, help="shard name prefix (default: the split name)")
    p.add_argument("--shard-samples", type=int, default=None,
                   help="samples per shard (default 1000 unless --shard-bytes is given)")
    p.add_argument("--shard-bytes", type=_size, default=None,
                   help="close a shard before it exceeds this many source bytes, e.g. 500M")
    p.add_argument("--seed", type=int, default=0, help="global shuffle seed (default 0)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    p.add_argument("--resize-shorter", type=int, default=None, metavar="N",
                   help="re-encode images whose shorter side exceeds N px down to N px")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class list (one wnid per line, e.g. the train shards' classes.txt); "
                        "default: sorted class names found in the source")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="itpn-prep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("folder", help="SRC/<class>/**/<image> (ImageFolder layout, custom data sets)")
    p.add_argument("src")
    p.add_argument("out")
    _add_shard_options(p, "train")
    p = sub.add_parser("imagenet-tar", help="the original ILSVRC2012_img_train.tar, read in place")
    p.add_argument("tar")
    p.add_argument("out")
    _add_shard_options(p, "train")
    p = sub.add_parser("val", help="flat folder or tar of images + labels file")
    p.add_argument("src")
    p.add_argument("labels", help="LOC_val_solution.csv, or a text file of 'filename wnid' lines")
    p.add_argument("out")
    _add_shard_options(p, "val")
    p = sub.add_parser("verify", help="re-read every shard against manifest.json")
    p.add_argument("out")
    p.add_argument("--decode", action="store_true", help="also decode every image")
    p.add_argument("--workers", type=int, default=0)
    p = sub.add_parser("demo", help="build the embedded demo set: OUT/train and OUT/val shards")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return ap


def _options(args) -> writer.ShardOptions:
    shard_samples = args.shard_samples
    if shard_samples is None and args.shard_bytes is None:
        shard_samples = 1000
    return writer.ShardOptions(split=args.split, prefix=args.prefix, shard_samples=shard_samples,
                               shard_bytes=args.shard_bytes, seed=args.seed, workers=args.workers,
                               resize_shorter=args.resize_shorter, quality=args.quality,
                               progress=not args.no_progress)


def _read_classes(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _summary(out: str, manifest: dict) -> None:
    print(f"{out}: {manifest['total']} samples, {len(manifest['shards'])} shards, "
          f"{manifest['num_classes']} classes, {len(manifest['skipped'])} skipped")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "verify":
            problems = writer.verify_shards(args.out, decode=args.decode, workers=args.workers)
            for p in problems:
                print(f"MISMATCH {p}")
            if problems:
                print(f"{args.out}: {len(problems)} problem(s)")
                return 1
            manifest = writer.load_manifest(args.out)
            print(f"{args.out}: OK, {manifest['total']} samples in {len(manifest['shards'])} shards")
            return 0
        if args.cmd == "demo":
            manifests = demo.build_demo(args.out, seed=args.seed, workers=args.workers,
                                        progress=not args.no_progress)
            for split, m in manifests.items():
                _summary(f"{args.out}/{split}", m)
            return 0
        skipped = []
        if args.cmd == "folder":
            classes, refs = sources.scan_folder(args.src)
            source = args.src
        elif args.cmd == "imagenet-tar":
            classes, refs = sources.scan_imagenet_tar(args.tar)
            source = args.tar
        else:
            classes, refs, skipped = sources.scan_val(args.src, args.labels)
            source = f"{args.src} labelled by {args.labels}"
        if args.classes:
            classes = _read_classes(args.classes)
        manifest = writer.write_shards(classes, refs, args.out, _options(args), source, skipped)
        _summary(args.out, manifest)
        return 0
    except (OSError, ValueError, RuntimeError) as e:
        print(f"itpn-prep: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
