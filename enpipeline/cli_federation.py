"""``enpipeline federation ...`` and ``enpipeline importer ...``: partners we serve, pull from and import from."""

from __future__ import annotations

from typing import Any


def register(sub: Any, add: Any) -> None:
    from enpipeline import cli_federation_pull, cli_federation_serve, cli_importer

    federation = sub.add_parser("federation", help="exchange keys with partner key servers (gRPC Fetch)"
                                ).add_subparsers(dest="action", required=True, metavar="ACTION")
    cli_federation_serve.register(federation, add)
    cli_federation_pull.register(federation, add)
    importer = sub.add_parser("importer", help="import partners' published export files"
                              ).add_subparsers(dest="action", required=True, metavar="ACTION")
    cli_importer.register(importer, add)
