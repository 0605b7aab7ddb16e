"""One benchmarked model in its own process (``python -m ditq.runtime.bench_worker``; no torch import).

The process holds one ONNX Runtime session, so its peak RSS is that of the inference alone (interpreter,
numpy and onnxruntime included, the same for every variant). It speaks JSON lines on stdin/stdout:

    (start)          -> {"ready": true, "load_s": ...}      session created, one warm-up run written to --output
    "run"            -> {"s": seconds}                       one timed forward on the fixed inputs
    "quit"           -> {"peak_rss_bytes": ...}              then exits

With ``--profile FILE`` it instead runs ``--runs`` profiled forwards and writes the time per op type.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

import numpy as np

from ditq.runtime.session import OrtDiT, create_session


def _reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def peak_rss_bytes() -> int:
    """This process's peak resident set size. ``VmHWM`` belongs to the process's own address space;
    ``getrusage``'s ``ru_maxrss`` would also count the parent's size at fork (Linux keeps it across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # other systems: upper bound


def _feeds(session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of ``inputs`` (keyed by the family's input names) in the session's input order: a graph
    written by another tool (ONNX Runtime's quantizers) keeps the float graph's names and order."""
    return {i.name: inputs[i.name] for i in session.get_inputs()}


def op_times(profile_json: str) -> dict[str, float]:
    """Microseconds per op type in an ONNX Runtime profile (node events only)."""
    with open(profile_json) as f:
        events = json.load(f)
    out: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            out[op] = out.get(op, 0.0) + float(e.get("dur", 0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True, help=".npz with the graph's inputs by name")
    ap.add_argument("--output", help="write the warm-up run's output here (.npy)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--profile", help="profile --runs forwards; write {op: microseconds per run} here")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)

    data = dict(np.load(args.inputs))
    t0 = time.perf_counter()
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="ditq-prof-") as tmp:
            sess = create_session(args.model, provider=args.provider, threads=args.threads or None, profile_prefix=f"{tmp}/p")
            feeds = _feeds(sess, data)
            for _ in range(args.runs + 1):  # the warm-up run is averaged in: profiles give shares, not times
                sess.run(None, feeds)
            times = op_times(sess.end_profiling())
        with open(args.profile, "w") as f:
            json.dump({k: v / (args.runs + 1) for k, v in times.items()}, f)
        return 0

    fn = OrtDiT(args.model, provider=args.provider, threads=args.threads or None)  # IO binding on CUDA
    feeds = {n: data[n] for n in fn.input_names}
    out = fn.run_feeds(feeds)
    if args.output:
        np.save(args.output, out)
    _reply({"ready": True, "load_s": time.perf_counter() - t0})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            t = time.perf_counter()
            fn.run_feeds(feeds)
            _reply({"s": time.perf_counter() - t})
        elif cmd == "quit":
            break
    _reply({"peak_rss_bytes": peak_rss_bytes()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
