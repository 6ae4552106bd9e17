"""`pdserve down`: remove a deployment (`pdserve serve --deployment NAME`) from a Ray cluster —
its ranks, rendezvous actors, placement groups and record — or list the deployments there."""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator.cli.common import Command


def add_down(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "down",
        help="remove a deployment's pools (pdserve serve --deployment NAME) from a Ray "
        "cluster; without --deployment, list the deployments there",
    )
    p.add_argument("--address", default="auto",
                   help="the Ray cluster (default auto: the one `ray start` made here)")  # fmt: skip
    p.add_argument("--deployment", metavar="NAME", help="the deployment to remove")
    p.add_argument(
        "--force", action="store_true",
        help="remove it even while a pdserve serve serves it (its requests fail)",
    )  # fmt: skip
    func: Command = cmd_down
    p.set_defaults(func=func)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_down(args: argparse.Namespace) -> int:
    import ray

    from orchestrator import deployment as dep
    from orchestrator.cli.serve import check_ray_address

    try:
        check_ray_address(args.address)
    except (ConnectionError, ValueError) as e:
        _say(f"error: {e}")
        return 2
    try:
        ray.init(address=args.address, logging_level=logging.WARNING, namespace=dep.NAMESPACE)
    except (ConnectionError, ValueError) as e:
        _say(f"error: --address {args.address}: no Ray cluster to join ({e})")
        return 2
    try:
        if args.deployment is None:
            names = dep.list_names()
            for name in names:
                record = dep.load(name)
                pools = (
                    ", ".join(f"{i.role}-{i.instance}" for i in record.instances) if record else ""
                )
                print(f"{name}\t{pools}")
            if not names:
                _say("no deployment in this Ray cluster")
            return 0
        try:
            dep.check_name(args.deployment)
        except ValueError as e:
            _say(f"error: {e}")
            return 2
        lease = dep.Lease(args.deployment)
        if not args.force:
            try:
                lease.acquire(timeout_s=5)
            except dep.DeploymentError as e:
                _say(f"error: {e} (or pass --force)")
                return 1
            fronts = dep.live_fronts(args.deployment)
            if fronts:
                lease.release()
                _say(f"error: deployment {args.deployment!r} is served by {', '.join(fronts)}: "
                     "stop them first (SIGTERM), or pass --force")  # fmt: skip
                return 1
        try:
            removed = dep.tear_down(args.deployment)
        except dep.DeploymentError as e:
            _say(f"error: {e}")
            return 1
        finally:
            lease.release()
        _say(f"removed deployment {args.deployment}: {len(removed)} actor(s) and placement "
             "group(s)")  # fmt: skip
        for name in removed:
            print(name)
        return 0
    finally:
        ray.shutdown()
