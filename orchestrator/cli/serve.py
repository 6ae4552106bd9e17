"""`pdserve serve`: the serve config its flags (`serve_flags.py`) make, and the command that starts
(or joins) a Ray cluster and serves until interrupted."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from orchestrator.cli.common import say
from orchestrator.cli.serve_flags import add_serve_flags
from workers import gc_pauses


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start (or join) a Ray cluster and serve a model over HTTP")
    add_serve_flags(p)
    p.set_defaults(func=cmd_serve)


def serve_config(args: argparse.Namespace) -> Any:
    from orchestrator.config import ServeConfig
    from workers.engine.config import EngineConfig

    engine = EngineConfig(
        page_size=args.page_size,
        kv_capacity_tokens=args.kv_capacity_tokens,
        kv_memory_fraction=args.kv_memory_fraction,
        kv_swap_space=args.kv_swap_space,
        prefix_cache_host_space=args.prefix_cache_host_space,
        speculative_ngram=args.speculative_ngram,
        speculative_ngram_min=args.speculative_ngram_min,
        speculative_ngram_max=args.speculative_ngram_max,
        speculative_max_running=args.speculative_max_running,
        speculative_ngram_shared=args.speculative_ngram_shared,
        speculative_mtp=args.speculative_mtp,
        max_running_requests=args.max_running_requests,
        enable_prefix_caching=args.enable_prefix_caching,
        preload_structured_output=args.preload_structured_output,
        chunked_prefill_size=args.chunked_prefill_size,
        stream_interval=args.stream_interval,
        max_context_len=args.max_context_len,
        dtype=args.dtype,
        device=args.device,
        num_threads=args.num_threads,
        cuda_graph_max_batch=args.cuda_graph_max_batch,
        num_redundant_experts=args.num_redundant_experts,
        moe_a2a_backend=args.moe_a2a_backend,
        grouped_gemm_backend=args.grouped_gemm_backend,
        deepep_mode=args.deepep_mode,
        low_latency_capacity=args.low_latency_capacity,
        enable_two_batch_overlap=args.enable_two_batch_overlap,
        kv_write_ahead=args.kv_write_ahead,
    )
    return ServeConfig(
        model=args.model,
        revision=args.revision,
        download_dir=args.download_dir,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        ray_address=args.address,
        colocated=args.colocated,
        num_ranks=args.dp,
        prefill_dp=args.prefill_dp,
        decode_dp=args.decode_dp,
        prefill_instances=args.prefill_instances,
        admin_token=args.admin_token,
        api_key=args.api_key,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ssl_ca_certs=args.ssl_ca_certs,
        eplb_interval_s=args.eplb_interval_s,
        eplb_min_balancedness=args.eplb_min_balancedness,
        eplb_max_staging_gib=args.eplb_max_staging_gib,
        init_expert_placement=args.init_expert_placement,
        decode_instances=args.decode_instances,
        placement_timeout_s=args.placement_timeout,
        scale_drain_timeout_s=args.scale_drain_timeout,
        max_prefill_instances=args.max_prefill_instances,
        max_decode_instances=args.max_decode_instances,
        max_instances=args.max_instances,
        autoscale_target=args.autoscale_target,
        autoscale_up_after_s=args.autoscale_up_after,
        autoscale_down_after_s=args.autoscale_down_after,
        transfer_backend=args.transfer_backend,
        transfer_timeout_s=args.transfer_timeout,
        engine=engine,
        max_request_body_bytes=args.max_request_body_bytes,
        incremental_streaming_output=args.incremental_streaming_output,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        max_prompt_tokens=args.max_prompt_tokens,
        max_concurrent_requests_per_client=args.max_concurrent_requests_per_client,
        max_queued_requests=args.max_queued_requests,
        default_max_new_tokens=args.default_max_new_tokens,
        request_timeout_s=args.request_timeout,
        rank_restart_wait_s=args.rank_restart_wait,
        replace_dead_instances=args.replace_dead_instances,
        kv_migration=args.kv_migration,
        kv_pressure_interval_s=args.kv_pressure_interval,
        # A front router may read its deployment's serve file (`--config`), which names the
        # deployment: that name is the one it serves, not one it starts.
        deployment=None
        if args.front is not None and args.deployment == args.front
        else args.deployment,
        keep_pools=args.keep_pools and args.front is None,
        front=args.front,
        sse_keepalive_s=args.sse_keepalive,
        drain_timeout_s=args.drain_timeout,
        log_level=args.log_level,
        access_log=args.access_log,
        log_requests=args.log_requests,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        otel_service_name=args.otel_service_name,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def log_to_stderr(level: str) -> None:
    """pdserve's own log lines (scaling, rank failures, rebalances: the `orchestrator` and
    `eplb` loggers) on standard error from `level` (`--log-level`) up, with their time."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    value = logging.getLevelName(level.upper())
    for name in ("orchestrator", "eplb"):
        log = logging.getLogger(name)
        log.handlers = [handler]
        log.setLevel(value if isinstance(value, int) else logging.INFO)
        log.propagate = False


def check_ray_address(address: str) -> None:
    """ConnectionError (or ValueError) naming `address` (a HOST:PORT `--address`) when no Ray
    cluster answers there: at once, rather than after Ray's retries."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), 5):
            pass
    except ValueError:
        raise ValueError(f"--address {address}: expected HOST:PORT, 'auto' or ray://...") from None
    except OSError as e:
        raise ConnectionError(
            f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start "
            "one with `ray start --head` (or `ray up`), or leave --address out"
        ) from None


def join_ray(config: Any, num_cpus: int | None) -> Any:
    """`ray.init`: a Ray of its own, or the cluster `--address` names. ConnectionError (or
    ValueError) naming the address when there is none to join, rather than Ray's retries."""
    import ray

    from orchestrator.pool_instance import starts_local_ray

    address = config.ray_address
    if address:
        check_ray_address(address)
    # A Ray of this process's own dies with it: when a signal to the whole process group
    # (systemd, `timeout`, Ctrl-C in some shells) ends its GCS too, waiting a minute for the
    # GCS to come back (Ray's default) only delays the exit.
    system = {"gcs_rpc_server_reconnect_timeout_s": 5} if starts_local_ray(config) else None
    # A deployment's detached placement groups are found by name within a namespace.
    from orchestrator.deployment import NAMESPACE

    named = config.deployment is not None or config.front is not None
    namespace = NAMESPACE if named else None
    try:
        return ray.init(
            address=address, num_cpus=num_cpus, logging_level=logging.WARNING,
            _system_config=system, namespace=namespace,
        )  # fmt: skip
    except ConnectionError as e:
        raise ConnectionError(
            f"--address {address}: {e} (start one with `ray start --head` or `ray up`, or "
            "leave --address out to start a Ray of this process's own)"
        ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import ray

    from orchestrator.deployment import DeploymentError
    from orchestrator.launcher import launch, local_ray_cpus, resolve_model_dir
    from orchestrator.pool_instance import RankStartError, starts_local_ray
    from orchestrator.preflight import preflight

    try:
        config = serve_config(args)
    except ValueError as e:
        say(f"error: {e}")
        return 2
    log_to_stderr(config.log_level)
    local = starts_local_ray(config)
    model_dir = None
    if config.front is not None:  # the deployment's record says what it serves
        say(f"front router of deployment {config.front}")
    else:
        say(f"topology: {config.topology}")
        for role, most in config.autoscale_bounds().items():
            start = {"prefill": config.prefill_instances, "decode": config.decode_instances}
            if most == start.get(role, 1):
                say(f"warning: {role} starts with its maximum of {most} instance(s): the "
                    "autoscaler has nothing to add")  # fmt: skip
            else:
                say(f"autoscaling {role} instances between {start.get(role, 1)} and {most}")
        if config.checkpoint is not None and config.checkpoint.is_hub_repo:
            say(f"model: {config.model} from the Hugging Face Hub (or its cache)")
        try:
            model_dir = resolve_model_dir(config)
            warnings = preflight(config, model_dir, local)
        except (ValueError, OSError) as e:
            say(f"error: {e}")
            return 2
        say(f"model: {model_dir}")
        for line in warnings:
            say(f"warning: {line}")
    mutual_tls = config.tls is not None and config.tls.client_cas is not None
    if config.api_key is None and not mutual_tls and not _is_loopback(config.host):
        say(f"warning: listening on {config.host} without --api-key: anyone who reaches the "
               "port can generate (set --api-key or PDSERVE_API_KEY, or --ssl-ca-certs)")  # fmt: skip
    elif config.api_key is not None and config.tls is None and not _is_loopback(config.host):
        say(f"warning: listening on {config.host} without TLS: the API key crosses the network "
               "in clear unless a TLS proxy sits in front (--ssl-certfile / --ssl-keyfile)")  # fmt: skip
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        say("warning: RAY_AUTH_MODE=disabled: anyone who reaches the Ray ports controls the "
               "cluster; keep Ray's token authentication on outside a test box")  # fmt: skip
    num_cpus = None
    if local:
        cores = os.cpu_count() or 1
        num_cpus = local_ray_cpus(config, cores)
        if num_cpus is not None:
            say(f"warning: the ranks take {num_cpus} CPUs and this machine has {cores} cores: "
                   f"the local Ray declares {num_cpus}, so ranks share cores (fine for trying the "
                   "topology out; measure with a core per rank)")  # fmt: skip

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # while starting, SIGTERM interrupts like Ctrl-C
    try:
        ctx = join_ray(config, num_cpus)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except (ValueError, ConnectionError) as e:
        say(f"error: {e}")
        return 2
    dashboard = getattr(ctx, "dashboard_url", None)
    where = f"joined Ray cluster at {config.ray_address}" if config.ray_address else "local Ray"
    say(f"{where}" + (f", dashboard http://{dashboard}" if dashboard else ""))
    stop = threading.Event()
    server = None
    try:
        if config.front is not None:
            from orchestrator import front

            try:
                model_dir = front.model_dir_of(config, front.load_record(config.front))
            except (DeploymentError, ValueError, OSError) as e:
                say(f"error: {e}")
                return 2
            say(f"model: {model_dir}")
        elif config.engine.device == "cuda" and not ray.cluster_resources().get("GPU"):
            say("error: --device cuda: the Ray cluster has no GPUs")
            return 2
        assert model_dir is not None
        say(f"loading {config.model_name(model_dir)} ...")
        server = launch(
            config,
            model_dir=model_dir,
            progress=lambda s: say(f"  still loading ({s:.0f} s)"),
        )
        gc_pauses.freeze_startup_objects("router")  # this process serves from now on
        gc_pauses.PROCESS.install()
        stop_now = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            (stop_now if stop.is_set() else stop).set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        say(f"serving {server.router.model_name} on {server.url}")
        if server.grpc_address:
            say(f"gRPC (pdserve.v1) on {server.grpc_address}")
        while not stop.is_set() and server.http.is_alive():
            stop.wait(0.5)
        in_flight = server.router.num_in_flight
        scaling = server.pools is not None and server.pools.scaling
        if (in_flight or scaling) and config.drain_timeout_s > 0 and server.http.is_alive():
            also = " and winding up the scale that runs" if scaling else ""
            say(f"draining {in_flight} request(s) in flight{also} (up to "
                f"{config.drain_timeout_s:g} s; interrupt again to stop now)")  # fmt: skip
            left = server.drain(config.drain_timeout_s, stop_now)
            if left:
                say(f"{left} request(s) still in flight: ending them")
        say("shutting down")
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except RankStartError as e:
        say(f"error: {e}")
        say("(the rank's whole log: /tmp/ray/session_latest/logs/worker-*.err on its node)")
        return 1
    except Exception as e:
        say(f"error: {type(e).__name__}: {e}")
        return 1
    finally:
        if server is not None:
            server.stop()
        ray.shutdown()
