"""Speculative decoding with the MTP module (`--speculative-mtp`) against plain decoding, offline
(one engine, no HTTP), in one run:

    .venv/bin/python benchmarks/mtp.py --batch 1 8 32 --input-len 64 --output-len 64 [--guesses 3]

Two models: the built-in tiny model, whose MTP module is random (its guesses almost never
hold: what the module's pass costs), and a one-layer model made from it whose module agrees
with the model (`tests.checkpoints.agreeing_mtp_checkpoint`: every greedy guess holds, the
gain's ceiling). For each model and batch: decode steps, output tok/s without and with the
module, the guesses kept and the ratio. Each pair is timed twice in alternating order; the
best of each is reported.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.checkpoints import agreeing_mtp_checkpoint  # noqa: E402
from workers.engine.config import EngineConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.messages import GenerateRequest, SamplingParams  # noqa: E402
from workers.model.tiny import ensure_tiny_checkpoint  # noqa: E402


def run(engine: Engine, prompts: list[list[int]], output_len: int) -> tuple[float, int, int]:
    """Seconds, steps and output tokens of greedy requests for `prompts`, all at once."""
    sp = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add(GenerateRequest(f"b{time.monotonic_ns()}-{i}", prompt, sp))
    steps = tokens = 0
    start = time.perf_counter()
    while engine.has_work:
        tokens += sum(len(d.token_ids) for d in engine.step())
        steps += 1
    return time.perf_counter() - start, steps, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--guesses", type=int, default=1, help="--speculative-mtp K")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tiny = ensure_tiny_checkpoint()
    models = {
        "tiny (random module)": tiny,
        "agreeing module": agreeing_mtp_checkpoint(tiny, Path(tempfile.mkdtemp())),
    }
    g = torch.Generator().manual_seed(0)
    print(
        f"{'model':<22} {'batch':>5} {'steps':>11} {'plain tok/s':>12} {'mtp tok/s':>10} "
        f"{'kept':>6} {'ratio':>6}"
    )
    for name, path in models.items():
        engines = {
            mtp: Engine(
                path,
                EngineConfig(speculative_mtp=args.guesses if mtp else 0, kv_capacity_tokens=65536),
                progress=False,
            )  # fmt: skip
            for mtp in (False, True)
        }
        for batch in args.batch:
            prompts = [
                torch.randint(3, 900, (args.input_len,), generator=g).tolist() for _ in range(batch)
            ]
            for engine in engines.values():  # warm up
                run(engine, prompts[:1], 4)
            spec = engines[True].speculator
            assert spec is not None
            spec.num_accepted_tokens = spec.num_guessed_tokens = 0
            best: dict[bool, tuple[float, int, int]] = {}
            for order in ((False, True), (True, False)):
                for mtp in order:
                    result = run(engines[mtp], prompts, args.output_len)
                    if mtp not in best or result[0] < best[mtp][0]:
                        best[mtp] = result
            kept = spec.num_accepted_tokens / max(spec.num_guessed_tokens, 1)
            plain_tps = best[False][2] / best[False][0]
            mtp_tps = best[True][2] / best[True][0]
            print(
                f"{name:<22} {batch:>5} {best[False][1]:>5}/{best[True][1]:<5} {plain_tps:>12.0f} "
                f"{mtp_tps:>10.0f} {kept:>6.0%} {mtp_tps / plain_tps:>5.2f}x"
            )


if __name__ == "__main__":
    main()
