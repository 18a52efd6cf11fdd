#!/usr/bin/env python3
"""Serving under one cache budget, mode by mode: for each cache mode, a
coordinator and one replica (`mpirun -np TP xq worker --serve --cache MODE
--cache-memory BUDGET`) on loopback; the replica's capacity (GetServerInfo:
tokens its pool holds, hence sequences of --context tokens), then
bench/serve_load.py at each of --rates with prompts of --input-len tokens and
--output-len output tokens (ignore_eos, so every request fills its context).
The same budget holds more sequences in a smaller cache mode; the sweep shows
what that does to throughput and latency as the offered load grows.

  bench/serve_sweep.py [--quick] [--modes fp16,kivi-4] [--rates 0.5,1,2] [--out DIR]
  bench/serve_sweep.py plot DIR      # redraw DIR/sweep.png from DIR/sweep.json

Writes under --out: MODE/rate-R.json (serve_load's results), sweep.json (all
of it), sweep.md (a table, with the command) and sweep.png (sequences held
per mode; output throughput, TTFT and ITL against the request rate). Plots
need matplotlib; where this interpreter lacks it (Debian's python3 without
python3-matplotlib) the sweep says so and `plot DIR` draws them later from
any python3 that has it."""
import argparse
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import serve_load  # noqa: E402

QUICK = {"modes": "fp16,kivi-4,xquant-4,xquant-cl-3", "rates": "1,4", "num_prompts": 8, "context": 256,
         "output_len": 32, "cache_memory": "16MiB"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """One coordinator and one replica, each in its own process group."""

    def __init__(self, args, mode, log_dir):
        self.log_dir = log_dir
        self.procs = []
        self.address = "127.0.0.1:%d" % free_port()
        self.replica_address = "127.0.0.1:%d" % free_port()
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        mpirun = ["mpirun", "--oversubscribe", "--mca", "orte_abort_on_non_zero_status", "0"]
        if os.geteuid() == 0:
            mpirun.append("--allow-run-as-root")
        model = ["--model", args.model] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
        self.commands = {
            "coordinator": [args.xq, "coordinator", "--listen", self.address],
            "replica": mpirun + ["-np", str(args.tp), args.xq, "worker", "--serve", "--tp", str(args.tp),
                                 "--listen", self.replica_address, "--coordinator", self.address,
                                 "--replica-id", mode, *model, "--cache", mode, "--cache-memory",
                                 args.cache_memory, "--max-sequences", str(args.max_sequences),
                                 "--threads", str(args.threads), *shlex.split(args.worker_args)],
        }
        for name, cmd in self.commands.items():
            log = open(os.path.join(log_dir, name + ".log"), "ab")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            proc.name = name
            self.procs.append(proc)

    def log_tail(self, name, lines=20):
        try:
            with open(os.path.join(self.log_dir, name + ".log"), "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, pb, pb_grpc, grpc, timeout):
        registry = pb_grpc.RegistryStub(grpc.insecure_channel(self.address))
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError("%s exited with %s:\n%s" % (p.name, p.returncode, self.log_tail(p.name)))
            try:
                listing = registry.ListReplicas(pb.ListReplicasRequest(), timeout=2)
                if any(r.state == "up" and r.load.ready for r in listing.replicas):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        raise RuntimeError("not ready within %d s; replica log:\n%s" % (timeout, self.log_tail("replica")))

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 30
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def sequences_held(info, context):
    """Sequences of `context` tokens the pool holds at once: whole blocks
    each, as the pool hands them out."""
    block = max(info.block_tokens, 1)
    return (info.capacity_tokens // block) // math.ceil(context / block)


def summary_of(result):
    keys = ("completed", "failed", "duration", "request_throughput", "output_throughput",
            "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
            "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
            "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms")
    return {k: result.get(k) for k in keys}


def markdown(sweep):
    c = sweep["config"]
    lines = ["`%s`" % sweep["command"], "",
             "Cache budget %s per rank, tp %d, %d threads per rank, model %s; prompts of %d tokens, "
             "%d output tokens (ignore_eos), %d requests per rate, Poisson arrivals." %
             (c["cache_memory"], c["tp"], c["threads"], os.path.basename(c["model"]), c["input_len"],
              c["output_len"], c["num_prompts"]), "",
             "| mode | capacity (tokens) | sequences of %d | rate (req/s) | completed | failed | req/s | "
             "output tok/s | mean TTFT (ms) | p99 TTFT (ms) | mean ITL (ms) | p99 ITL (ms) | mean E2EL (ms) |"
             % c["context"],
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, m in sweep["modes"].items():
        if "error" in m:
            lines.append("| %s | %s |  |  |  |  |  |  |  |  |  |  |  |" % (mode, m["error"].splitlines()[0]))
            continue
        for run in m["runs"]:
            s = run["summary"]
            lines.append("| %s | %d | %d | %g | %d | %d | %.2f | %.1f | %.0f | %.0f | %.1f | %.1f | %.0f |" % (
                mode, m["capacity_tokens"], m["sequences_held"], run["rate"], s["completed"], s["failed"],
                s["request_throughput"], s["output_throughput"], s["mean_ttft_ms"], s["p99_ttft_ms"],
                s["mean_itl_ms"], s["p99_itl_ms"], s["mean_e2el_ms"]))
    return "\n".join(lines) + "\n"


def plot(sweep, out_dir):
    plt = serve_load.pyplot()
    if plt is None:
        return None
    modes = {mode: m for mode, m in sweep["modes"].items() if "error" not in m}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    held = axes[0][0]
    held.bar(list(modes), [m["sequences_held"] for m in modes.values()], color="tab:blue")
    held.set_title("sequences of %d tokens held in %s" % (sweep["config"]["context"],
                                                          sweep["config"]["cache_memory"]))
    held.set_ylabel("sequences")
    panels = ((axes[0][1], "output_throughput", "output throughput (tok/s)"),
              (axes[1][0], "ttft", "TTFT (ms)"), (axes[1][1], "itl", "ITL (ms)"))
    for ax, key, label in panels:
        for mode, m in modes.items():
            rates = [run["rate"] for run in m["runs"]]
            if key == "output_throughput":
                ax.plot(rates, [run["summary"][key] for run in m["runs"]], "-o", label=mode)
            else:
                line, = ax.plot(rates, [run["summary"]["mean_%s_ms" % key] for run in m["runs"]], "-o",
                                label=mode + " mean")
                ax.plot(rates, [run["summary"]["p99_%s_ms" % key] for run in m["runs"]], "--x",
                        color=line.get_color(), label=mode + " p99")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.set_title(label + " vs request rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "sweep.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parser():
    p = argparse.ArgumentParser(prog="serve_sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a short preset (%s) unless the options are given" %
                        ", ".join("%s %s" % (k.replace("_", "-"), v) for k, v in QUICK.items()))
    p.add_argument("--modes", default=None, help="cache modes (default fp16,kivi-4,xquant-4,xquant-cl-3)")
    p.add_argument("--rates", default=None, help="request rates, req/s (default 0.5,1,2,4)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per rate (default 32)")
    p.add_argument("--context", type=int, default=None, help="tokens per request (default 1024)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens (default 64)")
    p.add_argument("--input-len", type=int, default=None, help="prompt tokens (default: context - output)")
    p.add_argument("--cache-memory", default=None, help="the replica's cache budget per rank (default 64MiB)")
    p.add_argument("--tp", type=int, default=1, help="ranks of the replica (default 1: two cores)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per rank")
    p.add_argument("--max-sequences", type=int, default=64,
                   help="the scheduler's limit, above what the pool holds so the pool decides")
    p.add_argument("--dataset", choices=("wikitext", "random"), default="wikitext")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--tokenizer", default="", help="a llama2.c model's tokenizer")
    p.add_argument("--worker-args", default="", help="more options for `xq worker --serve`, one string")
    p.add_argument("--build", default=os.path.join(REPO, "build"))
    p.add_argument("--xq", default=None, help="the xq binary (default BUILD/launch/xq)")
    p.add_argument("--stubs", default=None, help="generated Python stubs (default BUILD/proto/python)")
    p.add_argument("--shared", default=os.path.join(REPO, "..", "shared"))
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "serve-sweep"))
    return p


def resolve(args):
    defaults = {"modes": "fp16,kivi-4,xquant-4,xquant-cl-3", "rates": "0.5,1,2,4", "num_prompts": 32,
                "context": 1024, "output_len": 64, "cache_memory": "64MiB"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    if args.input_len is None:
        args.input_len = args.context - args.output_len
    if args.input_len < 1 or args.output_len < 1 or args.input_len + args.output_len > args.context:
        raise SystemExit("serve_sweep: --input-len + --output-len must fit in --context")
    args.xq = args.xq or os.path.join(args.build, "launch", "xq")
    args.stubs = args.stubs or os.path.join(args.build, "proto", "python")
    try:
        args.rate_list = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        raise SystemExit("serve_sweep: --rates wants numbers separated by commas")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.rate_list or not args.mode_list:
        raise SystemExit("serve_sweep: no modes or no rates")
    if not os.access(args.xq, os.X_OK):
        raise SystemExit("serve_sweep: no xq at %s (build it: ninja -C build xq)" % args.xq)
    if not os.path.exists(args.model):
        raise SystemExit("serve_sweep: no model at %s" % args.model)


def sweep_mode(args, mode, out_dir, grpc_modules):
    grpc, pb, pb_grpc = grpc_modules
    log_dir = tempfile.mkdtemp(prefix="xq-sweep-%s-" % mode)
    print("== %s: starting (logs in %s)" % (mode, log_dir), flush=True)
    deployment = Deployment(args, mode, log_dir)
    try:
        deployment.wait_ready(pb, pb_grpc, grpc, args.ready_timeout)
        control = pb_grpc.ControlStub(grpc.insecure_channel(deployment.replica_address))
        info = control.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        record = {"capacity_tokens": info.capacity_tokens, "block_tokens": info.block_tokens,
                  "bytes_per_token": list(info.bytes_per_token), "cache_mode": info.cache_mode,
                  "sequences_held": sequences_held(info, args.context), "runs": [],
                  "replica_command": shlex.join(deployment.commands["replica"])}
        print("== %s: pool of %d tokens (blocks of %d): %d sequences of %d tokens" %
              (mode, info.capacity_tokens, info.block_tokens, record["sequences_held"], args.context), flush=True)
        os.makedirs(os.path.join(out_dir, mode), exist_ok=True)
        for rate in args.rate_list:
            result_file = os.path.join(out_dir, mode, "rate-%g.json" % rate)
            cmd = [sys.executable, os.path.join(HERE, "serve_load.py"), "--backend", "grpc",
                   "--address", deployment.address, "--stubs", args.stubs, "--shared", args.shared,
                   "--dataset", args.dataset, "--num-prompts", str(args.num_prompts),
                   "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                   "--request-rate", str(rate), "--burstiness", str(args.burstiness), "--seed", str(args.seed),
                   "--num-warmups", "1", "--label", mode, "--result-file", result_file, "--quiet"]
            print("== %s: rate %g" % (mode, rate), flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not os.path.exists(result_file):
                raise RuntimeError("serve_load failed at rate %g:\n%s" % (rate, (done.stdout + done.stderr)[-2000:]))
            with open(result_file) as f:
                result = json.load(f)
            s = summary_of(result)
            print("   %d completed, %d failed, %.1f output tok/s, mean TTFT %.0f ms, mean ITL %.1f ms" %
                  (s["completed"], s["failed"], s["output_throughput"], s["mean_ttft_ms"], s["mean_itl_ms"]),
                  flush=True)
            record["runs"].append({"rate": rate, "result_file": os.path.relpath(result_file, out_dir),
                                   "summary": s})
        return record
    except (RuntimeError, grpc.RpcError) as e:
        print("== %s: failed: %s" % (mode, e), flush=True)
        return {"error": str(e)}
    finally:
        deployment.stop()


def main(argv):
    command = shlex.join([os.path.relpath(os.path.abspath(sys.argv[0]))] + list(argv))
    print("$ " + command, flush=True)
    if argv and argv[0] == "plot":
        if len(argv) != 2:
            raise SystemExit("usage: serve_sweep.py plot DIR")
        with open(os.path.join(argv[1], "sweep.json")) as f:
            path = plot(json.load(f), argv[1])
        if not path:
            raise SystemExit("serve_sweep plot: matplotlib is missing in %s" % sys.executable)
        print("plot: " + path)
        return 0
    args = parser().parse_args(argv)
    resolve(args)
    sys.path.insert(0, args.stubs)
    try:
        import grpc
        from xquant.v1 import xquant_pb2, xquant_pb2_grpc
    except ImportError as e:
        raise SystemExit("serve_sweep: needs grpcio and the stubs in %s: %s" % (args.stubs, e))
    os.makedirs(args.out, exist_ok=True)
    config = {k: getattr(args, k) for k in ("context", "input_len", "output_len", "cache_memory", "tp", "threads",
                                            "max_sequences", "num_prompts", "dataset", "burstiness", "seed")}
    config.update({"modes": args.mode_list, "rates": args.rate_list, "model": os.path.relpath(args.model, REPO)})
    sweep = {"command": command, "config": config, "modes": {}}
    for mode in args.mode_list:
        sweep["modes"][mode] = sweep_mode(args, mode, args.out, (grpc, xquant_pb2, xquant_pb2_grpc))
        with open(os.path.join(args.out, "sweep.json"), "w") as f:
            json.dump(sweep, f, indent=1)
    table = markdown(sweep)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(table)
    print("\n" + table)
    path = plot(sweep, args.out)
    print("plot: %s" % path if path else
          "no plot: matplotlib is missing in %s; draw it with: python3 bench/serve_sweep.py plot %s" %
          (sys.executable, args.out))
    return 0 if all("error" not in m for m in sweep["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
