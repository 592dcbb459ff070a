#!/usr/bin/env python3
"""The front's own work per IVR step on the plane: decode a real IvrReply frame, encode
the next IvrEvent carrying the reply's state back (`pbx.calls.ivr.ivr_event`).

    python perf/bench_ivr_codec.py [--number 20000] [--repeat 7] [--json perf/results/...]

The reply is the one a real executor (this checkout's `workers.ivr`, in process:
`perf/bench_executor.py` `reference_replies`) gives to the session start of the
reference flow, so its state is what the front really carries for a `*99` call (~2 KB
of JSON). timeit, one process; prints µs per step (best and median of the repeats) and
the frame sizes. Runs unchanged against older checkouts (issue 9 compared the state as
an object, protocol 4, with the state as text, protocol 5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_executor import reference_replies  # noqa: E402

from pbx import messages as m  # noqa: E402
from pbx.calls.ivr import ivr_event  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--number", type=int, default=20000, help="steps per repeat")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    first, _ = reference_replies()
    frame = m.encode(first)
    reply = m.decode(frame)
    event_frame = m.encode(ivr_event(reply.session_id, reply.seq + 1, reply.state,
                                     m.CallEndedInput(reason="Hangup")))
    hangup = m.CallEndedInput(reason="Hangup")

    def step() -> bytes:
        got = m.decode(frame)
        return m.encode(ivr_event(got.session_id, got.seq + 1, got.state, hangup))

    def decode_only() -> object:
        return m.decode(frame)

    rounds = [t / args.number * 1e6
              for t in timeit.repeat(step, number=args.number, repeat=args.repeat)]
    decodes = [t / args.number * 1e6
               for t in timeit.repeat(decode_only, number=args.number, repeat=args.repeat)]
    result = {
        "protocol": m.PROTOCOL_VERSION, "reply_bytes": len(frame),
        "event_bytes": len(event_frame),
        "us_per_step_best": round(min(rounds), 2),
        "us_per_step_median": round(statistics.median(rounds), 2),
        "us_decode_best": round(min(decodes), 2),
        "us_decode_median": round(statistics.median(decodes), 2),
        "number": args.number, "repeat": args.repeat,
    }
    print(f"protocol {m.PROTOCOL_VERSION}: reply frame {len(frame)} B, event frame "
          f"{len(event_frame)} B; decode reply + encode event {min(rounds):.2f} µs "
          f"(median {statistics.median(rounds):.2f}), of which decode "
          f"{min(decodes):.2f} µs (median {statistics.median(decodes):.2f})")
    out = args.json or ROOT / "perf" / "results" / \
        f"bench_ivr_codec-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
