"""G.711 throughput: the numba kernels (media.g711) next to CPython's audioop, in one run.

    .venv/bin/python perf/bench_g711.py [--calls 1000] [--ticks 200] [--json PATH]

Each "tick" is one 20 ms frame (160 samples) for every call: the kernels take the whole
calls × 160 array at once, as the media worker does; audioop gets one bytes object of
the same samples (its best case: one call over the whole buffer). Prints samples per
second for each and the ratio, next to the DESIGN target (encode ≥ 2×, decode ≥ 1×
audioop), and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # audioop: the reference, 3.11
    import audioop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from media import g711  # noqa: E402

TARGET_RATIO = {"encode": 2.0, "decode": 1.0}


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of `repeat` runs, in seconds (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(7)
    # Speech-like levels: mostly small, some loud samples.
    samples = (rng.standard_normal((args.calls, 160)) * 3000).clip(-32768, 32767).astype(
        np.int16)
    pcm_bytes = samples.tobytes()
    g711.warm()
    n = samples.size * args.ticks
    rows: list[dict[str, Any]] = []
    print(f"G.711, {args.calls} calls x 160 samples per tick, {args.ticks} ticks, "
          f"best of {args.repeat}")
    print(f"{'codec':5} {'op':7} {'kernel Msamples/s':>18} {'audioop Msamples/s':>19} "
          f"{'ratio':>7} {'target':>7}")
    for codec, lin2, to_lin in (("PCMU", audioop.lin2ulaw, audioop.ulaw2lin),
                                ("PCMA", audioop.lin2alaw, audioop.alaw2lin)):
        codes = g711.encode(samples, codec)
        code_bytes = codes.tobytes()
        # Correctness first: the benchmark compares equal work.
        assert code_bytes == lin2(pcm_bytes, 2), f"{codec} encode differs from audioop"
        assert g711.decode(codes, codec).tobytes() == to_lin(code_bytes, 2)

        def kernel_encode(codec: str = codec) -> None:
            for _ in range(args.ticks):
                g711.encode(samples, codec)

        def audioop_encode(lin2: Any = lin2) -> None:
            for _ in range(args.ticks):
                lin2(pcm_bytes, 2)

        def kernel_decode(codec: str = codec, codes: np.ndarray = codes) -> None:
            for _ in range(args.ticks):
                g711.decode(codes, codec)

        def audioop_decode(to_lin: Any = to_lin, code_bytes: bytes = code_bytes) -> None:
            for _ in range(args.ticks):
                to_lin(code_bytes, 2)

        for op, kernel, reference in (("encode", kernel_encode, audioop_encode),
                                      ("decode", kernel_decode, audioop_decode)):
            k = n / best_of(kernel, args.repeat) / 1e6
            a = n / best_of(reference, args.repeat) / 1e6
            ratio = k / a
            target = TARGET_RATIO[op]
            rows.append({"codec": codec, "op": op, "kernel_msamples_s": round(k, 2),
                         "audioop_msamples_s": round(a, 2), "ratio": round(ratio, 2),
                         "target_ratio": target, "meets_target": ratio >= target})
            print(f"{codec:5} {op:7} {k:18.1f} {a:19.1f} {ratio:6.2f}x {target:6.1f}x"
                  f"{'' if ratio >= target else '  (below target)'}")

    result = {
        "tool": "bench_g711",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(),
        "config": vars(args),
        "rows": rows,
    }
    out = Path(args.json or f"perf/results/bench_g711-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
