"""`edgemodel operator`: run the kopf operator (also runnable as `kopf run -m edgemodel_operator.handlers`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def operator_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgemodel operator", description=__doc__)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    import kopf

    from edgemodel_operator import handlers

    settings = handlers.SETTINGS
    kopf.configure(verbose=args.verbose)
    kopf.run(
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        standalone=settings.peering is None,
        liveness_endpoint=f"http://{settings.health_host}:{settings.health_port}/healthz",
    )
    return 0
