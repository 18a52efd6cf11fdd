#!/usr/bin/env python3
"""launch/two_hosts.sh (xq worker at tp 1 x pp 2, one stage in each of two
network namespaces joined by a veth pair, Open MPI over TCP) against the
single-process `xq generate` on the same prompt: the greedy token ids must be
identical. It also checks, from the lines the script prints, that the two
ranks ran on different hosts (hostname, namespace, address) other than this
one, that the data crossed the veth, and that the namespaces are gone
afterwards. Exits 77 (ctest SKIP_RETURN_CODE) with "SKIP: cannot create
network namespaces here: REASON" where the script cannot make the namespaces
(not root, a container that forbids it); any other problem is a failure."""
import argparse
import os
import re
import signal
import subprocess
import sys
import time

SKIP = 77
TIMEOUT = 120  # seconds for one run of the script
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went"]
# Launch traffic alone (orted start-up, wire-up, shutdown) is about 7 KB each
# way; 64 tokens of activations a->b add far more than that. Back b->a go only
# the sampled tokens (8 bytes a step), so that direction is checked against
# what the worker says stage 1 sent.
MIN_BYTES = 16 * 1024
SENT_LINE = re.compile(r"^rank (\d+) \(stage \d+, .*sent (\d+) bytes$", re.M)
RANK_LINE = re.compile(r"^two_hosts: rank (\d+) host (\S+) netns (\S*) (net:\[\d+\]) addr (.*)$")


def netns_list():
    run = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return run.stdout


def check_run(stderr, tokens):
    """Problems found in the script's report, as a list of strings."""
    problems = []
    ranks = {}
    for line in stderr.splitlines():
        m = RANK_LINE.match(line.strip())
        if m:
            ranks[int(m.group(1))] = {"host": m.group(2), "netns": m.group(3),
                                      "net": m.group(4), "addr": m.group(5).split()}
    if sorted(ranks) != [0, 1]:
        return [f"expected one line from each of ranks 0 and 1, got ranks {sorted(ranks)}"]
    mine = os.readlink("/proc/self/ns/net")
    for r, want_host, want_addr in [(0, "xq-host-a", "10.77.0.1/24"), (1, "xq-host-b", "10.77.0.2/24")]:
        info = ranks[r]
        if info["host"] != want_host:
            problems.append(f"rank {r} on host {info['host']}, expected {want_host}")
        if not info["netns"].startswith(want_host + "-"):
            problems.append(f"rank {r} in namespace '{info['netns']}', expected {want_host}-PID")
        if info["net"] == mine:
            problems.append(f"rank {r} shares this process's network namespace {mine}")
        if info["addr"] != [want_addr]:
            problems.append(f"rank {r} has addresses {info['addr']}, expected only {want_addr}")
    if ranks[0]["net"] == ranks[1]["net"]:
        problems.append(f"both ranks in the same network namespace {ranks[0]['net']}")
    m = re.search(r"^two_hosts: veth bytes a->b (\d+) b->a (\d+)$", stderr, re.M)
    if not m:
        problems.append("no 'veth bytes' line")
    else:
        ab, ba = int(m.group(1)), int(m.group(2))
        sent = {int(r): int(b) for r, b in SENT_LINE.findall(stderr)}
        if set(sent) != {0, 1}:
            problems.append("no 'rank N (...) sent B bytes' lines for both ranks")
        elif tokens >= 64 and (ab < max(MIN_BYTES, sent[0]) or ba < sent[1]):
            problems.append(f"only {ab} bytes a->b and {ba} b->a crossed the veth (expected "
                            f"at least {max(MIN_BYTES, sent[0])} and {sent[1]}: the ranks sent "
                            f"{sent[0]} and {sent[1]} bytes)")
    left = netns_list()
    for r in ranks.values():
        if r["netns"] and re.search(rf"^{re.escape(r['netns'])}\b", left, re.M):
            problems.append(f"namespace {r['netns']} still exists after the script ended")
    return problems


def run_script(command, env, timeout=TIMEOUT):
    """Runs the script in its own session; past the timeout, SIGTERM lets its
    trap stop the job and delete the namespaces (SIGKILL would leave them)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        print(stdout + stderr)
        return None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", required=True, help="launch/two_hosts.sh")
    parser.add_argument("--xq", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    env = dict(os.environ, XQ_BIN=args.xq)
    for i, prompt in enumerate(PROMPTS):
        single = subprocess.run([args.xq, "generate", "--model", args.model, "--prompt", prompt,
                                 "--max-tokens", str(args.tokens), "--ids"],
                                capture_output=True, text=True, timeout=60, check=True).stdout.split()
        start = time.monotonic()
        run = run_script(["bash", args.script, "--model", args.model, "--prompt", prompt,
                          "--max-tokens", str(args.tokens), "--ids", "--threads", "1"], env)
        if run is None:
            print(f"FAIL: two_hosts.sh took more than {TIMEOUT} s (stopped with SIGTERM)")
            return 1
        seconds = time.monotonic() - start
        cannot = re.search(r"^two_hosts: cannot create network namespaces here: (.*)$",
                           run.stderr, re.M)
        if run.returncode == SKIP and cannot and i == 0:
            print(run.stderr, end="")
            print(f"SKIP: cannot create network namespaces here: {cannot.group(1)}")
            return SKIP
        if run.returncode != 0:
            print(run.stdout + run.stderr)
            print(f"FAIL: two_hosts.sh exited with {run.returncode}")
            return 1
        parallel = run.stdout.split()
        if parallel != single or len(single) != args.tokens:
            print(run.stderr, end="")
            print(f"FAIL on '{prompt}':\n single    {' '.join(single)}\n two hosts {' '.join(parallel)}")
            return 1
        problems = check_run(run.stderr, args.tokens)
        if problems:
            print(run.stderr, end="")
            for p in problems:
                print(f"FAIL on '{prompt}': {p}")
            return 1
        report = " ".join(l.removeprefix("two_hosts: ") for l in run.stderr.splitlines()
                          if l.startswith(("two_hosts: wall", "two_hosts: veth")))
        print(f"ok: '{prompt}': {len(single)} tokens identical across two namespaces "
              f"({report}; {seconds:.2f} s with set-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
