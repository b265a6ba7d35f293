"""``seme fetch URI DEST`` and ``seme publish DIR URI``: sha256-verified object storage."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch", help="download an s3:// checkpoint prefix, verifying every file's sha256")
    p.add_argument("uri", help="s3://bucket/prefix")
    p.add_argument("dest", nargs="?", help="local directory to create (default: the cache, printed)")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3, else AWS)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument(
        "--retries", type=int, default=5, help="resumed retries per file after a cut transfer (default 5)"
    )
    p.set_defaults(func=run_fetch)

    p = sub.add_parser("publish", help="upload a checkpoint directory to s3://, manifest written last")
    p.add_argument("dir", help="local checkpoint directory")
    p.add_argument("uri", help="s3://bucket/prefix")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3, else AWS)")
    p.add_argument("--workers", type=int, default=4, help="parallel uploads (default 4)")
    p.set_defaults(func=run_publish)


def run_fetch(args: argparse.Namespace) -> int:
    from seme.errors import ConfigError
    from seme.storage import fetch

    if args.workers < 1 or args.retries < 0:
        raise ConfigError("--workers must be at least 1 and --retries at least 0")
    path = fetch(args.uri, endpoint_url=args.endpoint_url, dest=args.dest, workers=args.workers, retries=args.retries)
    print(path)
    return 0


def run_publish(args: argparse.Namespace) -> int:
    from seme.storage import publish

    res = publish(args.dir, args.uri, endpoint_url=args.endpoint_url, workers=args.workers)
    print(f"published {res['files']} files ({res['bytes']} bytes) to {res['uri']} ({res['reference']} last)")
    return 0
