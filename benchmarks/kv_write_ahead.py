"""KV written ahead (layer by layer, as the prefill computes it) against KV sent after the
prefill: the time from the end of a prompt's prefill to the decode rank holding its KV.

    .venv/bin/python benchmarks/kv_write_ahead.py [--input-len 512 2048] [--layers 27]
        [--device cuda --dtype bfloat16 --hidden 2048]   # on a GPU (two actors share it)

Two Ray actors — a prefill rank and a decode rank, each a real `Engine` with its `KVHandoff`
and NIXL transfer engine, as in `pdserve serve` — and a random model with a large KV for its
compute (`--layers` layers of `kv_lora_rank` 512 + rope 64, as DeepSeek-V3's, but hidden
`--hidden`), so that the transfer is a visible part of the time to first token. One request
at a time: the decode rank reserves the pages and posts its receive, the prefill rank gets the
target, then computes the prompt. Printed per prompt length, with and without write-ahead in
alternation: the prefill time (its first step to its hand-off), the tail (the hand-off to the
decode rank admitting the request, clocked on each side with `time.time()` on one host), and
their sum, the time to first token less the router's part. Medians over `--reps`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from safetensors.torch import save_file

from workers.model.tiny import _weights, tiny_config

PAGE = 16


def write_checkpoint(path: Path, args: argparse.Namespace) -> int:
    """A random model of `args`' shape; its KV bytes per token in `args.dtype`."""
    cfg = tiny_config(1024, 0, 1)
    cfg.update(
        hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        kv_lora_rank=512, qk_rope_head_dim=64, num_nextn_predict_layers=0,
        max_position_embeddings=8192,
    )  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(_weights(cfg), str(path / "model.safetensors"), metadata={"format": "pt"})
    return args.layers * (512 + 64) * getattr(torch, args.dtype).itemsize


class Rank:
    def __init__(
        self, model_dir: str, role: str, write_ahead: bool, capacity: int, device: str, dtype: str
    ):
        from workers.engine.config import EngineConfig
        from workers.engine.engine import Engine
        from workers.engine.handoff import KVHandoff
        from workers.transfer import create_transfer_engine

        torch.set_num_threads(1)
        config = EngineConfig(
            page_size=PAGE, kv_capacity_tokens=capacity, kv_write_ahead=write_ahead,
            enable_prefix_caching=False, chunked_prefill_size=8192, num_threads=1,
            device=device, dtype=dtype, cuda_graph_max_batch=0,
        )  # fmt: skip
        self.engine = Engine(model_dir, config, progress=False)
        name = f"ahead-{role}-{time.time_ns()}"
        transfer = create_transfer_engine("nixl", name, self.engine.kv.data, PAGE)
        self.handoff = KVHandoff(role, transfer, 60.0)
        self.handoff.bind(self.engine)

    def _add(self, rid: str, prompt: list[int], mode: str) -> None:
        from workers.engine.messages import GenerateRequest, SamplingParams

        sampling = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        self.engine.add(GenerateRequest(rid, prompt, sampling), mode=mode)

    # decode rank
    def post(self, rid: str, prompt: list[int]):
        self._add(rid, prompt, "decode")
        self.engine.reserve_kv()
        (ready,) = self.handoff.post_receives(self.engine)
        return ready.target

    def wait(self, rid: str) -> float:
        """When the request's KV arrived (it ends there: one token)."""
        while True:
            deltas, _ = self.handoff.after_step(self.engine)
            for d in deltas:
                if d.rid == rid:
                    if d.error:
                        raise RuntimeError(d.error)
                    return time.time()
            time.sleep(0.0002)

    # prefill rank
    def prefill(self, rid: str, prompt: list[int], target) -> tuple[float, float]:
        """When its prefill started and when it was handed off (sent)."""
        self._add(rid, prompt, "prefill")
        self.handoff.set_target(rid, target)
        started = time.time()
        while True:
            self.engine.step()
            self.handoff.after_step(self.engine)
            if rid in self.engine.scheduler.handed_off:
                sent = time.time()
                break
        while self.handoff.busy:  # its pages back before the next request
            self.handoff.after_step(self.engine)
            time.sleep(0.0005)
        return started, sent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input-len", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="kv-ahead-"))
    per_token = write_checkpoint(tmp / "model", args)
    capacity = max(args.input_len) + 2 * PAGE
    # Four actors (two rank pairs) share the GPU.
    actor = ray.remote(num_cpus=0, num_gpus=0.25 if args.device == "cuda" else 0)(Rank)
    model = str(tmp / "model")
    ranks = {
        ahead: tuple(
            actor.remote(model, role, ahead, capacity, args.device, args.dtype)  # type: ignore[attr-defined]
            for role in ("prefill", "decode")
        )
        for ahead in (True, False)
    }
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, {args.dtype}, KV "
        f"{per_token / 1024:.1f} KiB per token; {device}, NIXL (UCX) between two processes; "
        f"medians of {args.reps}"
    )
    print(
        f"{'tokens':>7} {'KV MiB':>7} {'mode':>12} {'prefill ms':>11} {'tail ms':>8} {'sum ms':>8}"
    )
    gen = torch.Generator().manual_seed(0)
    n = 0
    for length in args.input_len:
        times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for rep in range(args.reps + 1):  # the first of each: warm-up
            for ahead in (True, False) if rep % 2 else (False, True):
                prefill, decode = ranks[ahead]
                prompt = torch.randint(3, 1000, (length,), generator=gen).tolist()
                rid = f"r{n}"
                n += 1
                target = ray.get(decode.post.remote(rid, prompt))
                arrived = decode.wait.remote(rid)
                started, sent = ray.get(prefill.prefill.remote(rid, prompt, target))
                landed = ray.get(arrived)
                if rep:
                    times[ahead].append((sent - started, landed - sent))
        for ahead in (False, True):
            pre = statistics.median(t[0] for t in times[ahead]) * 1000
            tail = statistics.median(t[1] for t in times[ahead]) * 1000
            mode = "write-ahead" if ahead else "after"
            mib = length * per_token / 2**20
            print(
                f"{length:>7} {mib:>7.1f} {mode:>12} {pre:>11.1f} {tail:>8.2f} {pre + tail:>8.1f}"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
