"""Builds the mini datasets ahead of time (mini_vl, and mini_vl_banners with --banners).

    python -m tasks.mini [--config full|tiny] [--data_dir DIR] [--banners]
"""
import argparse
import time

from tasks import mini


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="full", choices=sorted(mini.CONFIG_SUFFIXES))
  parser.add_argument("--data_dir", default=None,
                      help="default: $OMNI_SMOLA_MINI_DATA_DIR, else TFDS's data dir")
  parser.add_argument("--banners", action="store_true",
                      help="also mini_vl_banners, the wide images MoME's study reads")
  args = parser.parse_args(argv)
  builders = [mini.MiniVl] + ([mini.MiniVlBanners] if args.banners else [])
  for builder_class in builders:
    start = time.time()
    builder = mini.prepare(args.config, data_dir=args.data_dir, builder=builder_class)
    total = sum(split.num_examples for split in builder.info.splits.values())
    print(f"{builder_class.name}/{args.config}: {total} examples in {builder.data_dir} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
  main()
