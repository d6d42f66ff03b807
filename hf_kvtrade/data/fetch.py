"""``python -m hf_kvtrade.data.fetch``: fetch the pinned data archives into the cache (what `make setup` runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .archives import ARCHIVES, FETCH_COMMAND, DataNotFetchedError, fetch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=FETCH_COMMAND, description="Fetch the pinned data archives into the cache and check their SHA-256."
    )
    parser.add_argument("--force", action="store_true", help="download and extract again even if the cache is complete")
    parser.add_argument("--from", dest="source", metavar="PATH",
                        help="use local copies of the archives (one file, or the folder holding them) instead of "
                             "downloading; an archive not there is downloaded")  # fmt: skip
    args = parser.parse_args(argv)
    for archive in ARCHIVES:
        complete = archive.complete() and not args.force
        # A single file given with --from is one archive; the others are downloaded.
        own_file = args.source and (Path(args.source).is_dir() or Path(args.source).name == archive.filename)
        try:
            root = fetch(archive, force=args.force, source=args.source if own_file else None)
        except DataNotFetchedError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"{archive.requirement}: {'already complete' if complete else 'fetched'} in {root} "
              f"({len(archive.members)} files checked by SHA-256)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
