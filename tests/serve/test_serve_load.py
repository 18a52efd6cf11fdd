#!/usr/bin/env python3
"""bench/serve_load.py against a local cluster on stories260K (a coordinator
and two `mpirun -np 2 xq worker --serve --tp 2` replicas): 40 requests at 20
per second, wikitext prompts of 16-64 tokens, 8-32 output tokens with
ignore_eos, through the gRPC backend and through the OpenAI backend (the
coordinator's --http-listen).

Checks, all exact:
* every request completes; each one's usage shows the prompt tokens sent and
  the output tokens asked for (ignore_eos), within the drawn ranges;
* the coordinator's Prometheus counters (GET /metrics on its HTTP address)
  grew by what the load generator reports: the sum over labels of
  xq:request_success_total by the requests completed, xq:generation_tokens_total
  by the output tokens and xq:prompt_tokens_total by the input tokens (warm-up
  requests included on both sides). Counters are read again for up to 10 s
  until they reach the expected values, since a server may count a request
  just after its last message went out; the comparison itself has no
  tolerance;
* each replica's own /metrics (--metrics-listen): the replicas' counters sum
  to the coordinator's (each request ran on exactly one replica, none
  aborted)."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc

import cluster as cl

SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")
COUNTERS = ("xq:request_success_total", "xq:generation_tokens_total", "xq:prompt_tokens_total")


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def prometheus_sums(url):
    """Each counter in COUNTERS summed over its label sets (0 when absent),
    from the text exposition format; promtool checks the format where it is
    installed."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        expect(reply.status == 200, "GET %s: HTTP %d" % (url, reply.status))
        text = reply.read().decode()
    promtool = shutil.which("promtool")
    if promtool:
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        # promtool exits 1 for naming advice too (lint); a parse error names the line.
        expect("error while linting" not in lint.stderr and "text format parsing error" not in lint.stderr,
               "promtool rejects /metrics:\n" + lint.stderr)
    sums = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        expect(match is not None, "not a Prometheus sample line: %r" % line)
        if match.group(1) in sums:
            sums[match.group(1)] += float(match.group(3))
    return sums


def run_load(source, build, shared, extra, out_json):
    cmd = [sys.executable, os.path.join(source, "bench", "serve_load.py"), "--dataset", "wikitext",
           "--shared", shared, "--stubs", os.path.join(build, "proto", "python"), "--num-prompts", "40",
           "--request-rate", "20", "--input-len", "40", "--output-len", "20", "--range-ratio", "0.6",
           "--num-warmups", "2", "--seed", "5", "--result-file", out_json, "--quiet", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(done.stdout[-2500:])
    expect(done.returncode == 0, "serve_load failed (%d):\n%s" % (done.returncode, done.stderr[-3000:]))
    expect(done.stdout.startswith("$ "), "serve_load does not print its command line first")
    with open(out_json) as f:
        return json.load(f)


def check_result(r, name):
    expect(r["completed"] == 40 and r["failed"] == 0,
           "%s: %d completed, %d failed: %s" % (name, r["completed"], r["failed"],
                                                 [e for e in r["errors"] if e][:3]))
    expect(r["output_lens"] == r["requested_output_lens"],
           "%s: output tokens differ from max_tokens under ignore_eos" % name)
    expect(r["input_lens"] == r["requested_input_lens"], "%s: usage prompt tokens differ from the prompts" % name)
    expect(all(16 <= n <= 64 for n in r["input_lens"]) and all(8 <= n <= 32 for n in r["output_lens"]),
           "%s: lengths outside 16-64 / 8-32" % name)
    expect(r["total_output_tokens"] == sum(r["output_lens"]) and r["total_input_tokens"] == sum(r["input_lens"]),
           "%s: totals are not the sums" % name)
    expect(all(len(itl) <= n - 1 for itl, n in zip(r["itls"], r["output_lens"])),
           "%s: more token-carrying messages than tokens" % name)
    expect(r["warmup"]["requests"] == 2 and r["warmup"]["completed"] == 2, "%s: warm-ups failed" % name)
    for key in ("mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "p90_tpot_ms", "p50_itl_ms",
                "mean_e2el_ms", "request_throughput", "output_throughput", "total_token_throughput",
                "max_output_tokens_per_s", "max_concurrent_requests"):
        expect(key in r, "%s: the result lacks %s" % (name, key))
    print("%s: 40 completed, %d input and %d output tokens, %.1f output tok/s" %
          (name, r["total_input_tokens"], r["total_output_tokens"], r["output_throughput"]))


def check_counters(metrics_url, before, r, name):
    want = {"xq:request_success_total": r["completed"] + r["warmup"]["completed"],
            "xq:generation_tokens_total": r["total_output_tokens"] + r["warmup"]["output_tokens"],
            "xq:prompt_tokens_total": r["total_input_tokens"] + r["warmup"]["input_tokens"]}
    deadline = time.time() + 10
    while True:
        after = prometheus_sums(metrics_url)
        grown = {k: after[k] - before[k] for k in COUNTERS}
        if all(grown[k] == want[k] for k in COUNTERS) or time.time() > deadline:
            break
        time.sleep(0.2)
    for k in COUNTERS:
        expect(grown[k] == want[k], "%s: %s grew by %g, serve_load reports %d" % (name, k, grown[k], want[k]))
    print("%s: Prometheus counters equal the report: %s" % (name, want))
    return after


def check_replica_counters(cluster, coordinator_sums):
    """Every replica's own /metrics (--metrics-listen): together they ran
    what the coordinator relayed, so their counters sum to its counters."""
    replicas = [p for p in cluster.procs if getattr(p, "metrics_port", None)]
    expect(len(replicas) == 2, "replicas with metrics: %d" % len(replicas))
    total = dict.fromkeys(COUNTERS, 0.0)
    for proc in replicas:
        sums = prometheus_sums("http://127.0.0.1:%d/metrics" % proc.metrics_port)
        expect(sums["xq:request_success_total"] > 0, "%s ran no request" % proc.replica_id)
        for k in COUNTERS:
            total[k] += sums[k]
    for k in COUNTERS:
        expect(total[k] == coordinator_sums[k],
               "replicas' %s sum to %g, the coordinator's is %g" % (k, total[k], coordinator_sums[k]))
    print("replicas' own metrics sum to the coordinator's: %s" % total)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--shared", required=True)
    args = parser.parse_args()
    model = os.path.join(args.shared, "models", "stories260K.bin")
    tokenizer = os.path.join(args.shared, "models", "tok512.bin")
    if not os.path.exists(model):
        print("SKIP: %s is absent" % model)
        return 0
    xq = os.path.join(args.build, "launch", "xq")
    help_text = subprocess.run([xq, "coordinator", "--help"], capture_output=True, text=True).stdout
    http = "--http-listen" in help_text
    http_args, metrics_url, base_url = [], None, None
    if http:
        port = cl.free_port()
        http_args = ["--http-listen", "127.0.0.1:%d" % port]
        base_url = "http://127.0.0.1:%d" % port
        metrics_url = base_url + "/metrics"
    sys.path.insert(0, os.path.join(args.build, "proto", "python"))
    from xquant.v1 import xquant_pb2_grpc as pb_grpc

    log_dir = tempfile.mkdtemp(prefix="xq-serve-load-")
    c = cl.Cluster(args.build, args.source, model, tokenizer, replicas=2, tp=2, coordinator_args=http_args,
                   log_dir=log_dir, replica_metrics=True)
    try:
        channel = grpc.insecure_channel(c.address)
        stubs = {"Registry": pb_grpc.RegistryStub(channel)}
        c.wait_ready(lambda name: stubs[name], replicas_up=2)
        before = prometheus_sums(metrics_url) if http else None
        with tempfile.TemporaryDirectory() as tmp:
            r = run_load(args.source, args.build, args.shared, ["--backend", "grpc", "--address", c.address],
                         os.path.join(tmp, "grpc.json"))
            check_result(r, "grpc")
            expect(http, "xq coordinator has no --http-listen")
            before = check_counters(metrics_url, before, r, "grpc")
            r = run_load(args.source, args.build, args.shared,
                         ["--backend", "openai", "--base-url", base_url, "--tokenizer-address", c.address],
                         os.path.join(tmp, "openai.json"))
            check_result(r, "openai")
            after = check_counters(metrics_url, before, r, "openai")
            check_replica_counters(c, after)
    except Exception:
        print("logs in %s; coordinator log ends:\n%s" % (log_dir, c.log_tail("coordinator")))
        raise
    finally:
        c.stop()
    print("serve_load against the cluster: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
