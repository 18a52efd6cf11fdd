#!/usr/bin/env python3
"""End-to-end tests of the serving layer on stories260K: a coordinator and two
replicas (each `mpirun -np 2 xq worker --serve --tp 2`, supervised), driven
through the Python stubs generated from the .proto, as an outside client
would.

--check serve:  the standard services (health, reflection), GetModelInfo and
                Tokenize; 32 concurrent greedy streams equal the offline
                greedy result of their prompts (`xq worker --input` at the
                same tp: the batch path without a server) token for token;
                every bad request gets its status while another stream goes
                on untouched; 100 streams cancelled mid-decode give their
                cache back within two replica steps (GetLoad).
--check stall:  one replica; a client of the coordinator that stops reading
                is cut off after --stall-timeout and its request aborted.
--check tls:    one replica, every hop over TLS from a self-signed
                certificate: streams equal the reference, plaintext is refused.
--check kill:   one replica's rank 0 SIGKILLed mid-run: every request ends
                exactly once, either complete and equal to the reference
                (also those rerouted) or with one retryable UNAVAILABLE error
                after a prefix of the reference; the supervisor restarts the
                replica and it takes traffic again."""
import argparse
import os
import signal
import sys
import threading
import time

import grpc

import cluster as cl

API_KEY = "test-key-7d1f"
# The coordinator's --stall-timeout in the stall check (30 s by default).
STALL_SECONDS = 1


def prompts_from(text_path, count):
    """The first `count` paragraphs' first sentences, of varied lengths."""
    out = []
    with open(text_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if len(line) < 20:
                continue
            words = line.split()
            out.append(" ".join(words[: 3 + (len(out) * 7) % 23]))
            if len(out) == count:
                return out
    raise RuntimeError("not enough text in " + text_path)


class Stream:
    """One Generate call in its own thread; records every message."""

    def __init__(self, stub, pb, request, metadata, timeout=300):
        self.stub, self.pb, self.request, self.metadata = stub, pb, request, metadata
        self.timeout = timeout
        self.tokens, self.texts, self.finished, self.errors = [], [], None, []
        self.status = None
        self.terminals = 0
        self.first_delta = threading.Event()
        self.call = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.call = self.stub.Generate(self.request, metadata=self.metadata, timeout=self.timeout)
            for message in self.call:
                kind = message.WhichOneof("event")
                if kind == "delta":
                    if self.terminals:
                        raise AssertionError("a delta after the terminal message")
                    self.tokens.extend(message.delta.token_ids)
                    self.texts.append(message.delta.text)
                    self.first_delta.set()
                elif kind == "finished":
                    self.terminals += 1
                    self.finished = message.finished
                    self.texts.append(message.finished.text)
                elif kind == "error":
                    self.terminals += 1
                    self.errors.append(message.error)
            self.status = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.status = e.code()
            self.status_details = e.details()
        finally:
            self.first_delta.set()

    def cancel(self):
        while self.call is None and self.thread.is_alive():
            time.sleep(0.001)
        if self.call is not None:
            self.call.cancel()

    def join(self, timeout):
        self.thread.join(timeout)
        return not self.thread.is_alive()


def make_request(pb, prompt, max_tokens, ignore_eos=False, request_id=""):
    return pb.GenerateRequest(request_id=request_id, text=prompt,
                              sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def check_standard_services(c, pb, stubs, replica_channel):
    coordinator_channel = stubs["channel"]
    for channel, name in ((coordinator_channel, "coordinator"), (replica_channel, "replica")):
        expect(cl.health_status(channel, "") == 1, name + ": health '' is not SERVING")
        expect(cl.health_status(channel, "xquant.v1.Generation") == 1,
               name + ": health xquant.v1.Generation is not SERVING")
        expect(cl.health_watch_first(channel, "xquant.v1.Generation") == 1,
               name + ": health Watch does not stream SERVING")
        listing = cl.reflection_services(channel)
        for service in (b"xquant.v1.Generation", b"grpc.health.v1.Health"):
            expect(service in listing, "%s: reflection does not list %s" % (name, service.decode()))
        for symbol, file_name in (("xquant.v1.Generation", b"xquant/v1/xquant.proto"),
                                  ("xquant.v1.GenerateRequest", b"xquant/v1/xquant.proto"),
                                  ("grpc.health.v1.Health", b"grpc/health/v1/health.proto")):
            expect(file_name in cl.reflection_file_of(channel, symbol),
                   "%s: reflection gives no descriptor for %s" % (name, symbol))
    expect(b"xquant.v1.Control" in cl.reflection_services(replica_channel),
           "replica: reflection does not list xquant.v1.Control")
    info = stubs["Generation"].GetModelInfo(pb.GetModelInfoRequest(), metadata=c.metadata(), timeout=10)
    expect(info.vocab_size == 512 and info.context_length > 0, "GetModelInfo: %s" % info)
    tokens = stubs["Generation"].Tokenize(pb.TokenizeRequest(text="Once upon a time"),
                                          metadata=c.metadata(), timeout=10)
    expect(len(tokens.token_ids) >= 4 and len(tokens.pieces) == len(tokens.token_ids),
           "Tokenize: %s" % tokens)
    print("standard services, GetModelInfo (context %d) and Tokenize: ok" % info.context_length)
    return info


def check_clients(c, pb, stubs, build, source, prompt, reference):
    """The shipped clients against the cluster: `xq client --json`, the C++
    example and the Python example; each must give the greedy text the
    stubs give for the same request."""
    import json
    import subprocess
    request = make_request(pb, prompt, len(reference))
    want = Stream(stubs["Generation"], pb, request, c.metadata())
    expect(want.join(60) and want.tokens == reference, "the stub call differs from the reference")
    text = "".join(want.texts)
    run = subprocess.run([os.path.join(build, "launch", "xq"), "client", "--address", c.address,
                          "--api-key", c.api_key, "--prompt", prompt, "--max-tokens", str(len(reference)),
                          "--json"], capture_output=True, text=True, timeout=60)
    expect(run.returncode == 0, "xq client failed: %s" % run.stderr)
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    ids = [t for line in lines if "delta" in line for t in line["delta"]["token_ids"]]
    expect(ids == reference and "finished" in lines[-1], "xq client --json: %s" % run.stdout[-500:])
    run = subprocess.run([os.path.join(build, "launch", "examples", "xq_client_example"), "--address",
                          c.address, "--api-key", c.api_key, "--prompt", prompt, "--max-tokens",
                          str(len(reference))], capture_output=True, text=True, timeout=60)
    expect(run.returncode == 0 and run.stdout.startswith(text),
           "the C++ example printed %r, wanted %r (%s)" % (run.stdout, text, run.stderr))
    run = subprocess.run([sys.executable, os.path.join(source, "tests", "serve", "test_python_example.py"),
                          "--stubs", os.path.join(build, "proto", "python"), "--address", c.address,
                          "--api-key", c.api_key, "--prompt", prompt, "--max-tokens", str(len(reference))],
                         capture_output=True, text=True, timeout=60)
    expect(run.returncode == 0, "the Python example: %s %s" % (run.stdout, run.stderr))
    print("xq client --json, the C++ example and the Python example stream the reference text")


def check_streams(c, pb, stubs, prompts, reference, max_tokens):
    start = time.time()
    streams = [Stream(stubs["Generation"], pb, make_request(pb, p, max_tokens), c.metadata())
               for p in prompts]
    for s in streams:
        expect(s.join(300), "a stream did not end within 300 s")
    replicas = {}
    for i, s in enumerate(streams):
        expect(s.status == grpc.StatusCode.OK and s.finished is not None and not s.errors,
               "stream %d: status %s, errors %s" % (i, s.status, s.errors))
        expect(s.terminals == 1, "stream %d: %d terminal messages" % (i, s.terminals))
        expect(s.tokens == reference[i],
               "stream %d differs from the offline greedy result:\n served  %s\n offline %s" %
               (i, s.tokens, reference[i]))
        expect(s.finished.usage.completion_tokens == len(s.tokens),
               "stream %d: usage says %d tokens, %d streamed" %
               (i, s.finished.usage.completion_tokens, len(s.tokens)))
        replicas[s.finished.replica_id] = replicas.get(s.finished.replica_id, 0) + 1
    expect(len(replicas) == 2, "32 streams were served by %s, not by both replicas" % replicas)
    print("%d concurrent streams equal the offline greedy tokens (%d tokens, %.1f s; per replica %s)" %
          (len(streams), sum(len(r) for r in reference), time.time() - start, replicas))


def check_bad_requests(c, pb, stubs, info, prompt, reference):
    gen = stubs["Generation"]
    background = Stream(gen, pb, make_request(pb, prompt, len(reference)), c.metadata())
    S = pb.SamplingParams
    long_prompt = " ".join(["once upon a time"] * info.context_length)
    cases = [
        ("empty prompt", pb.GenerateRequest(text="", sampling=S(max_tokens=4)), c.metadata(),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("no prompt", pb.GenerateRequest(sampling=S(max_tokens=4)), c.metadata(),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("prompt longer than the context", pb.GenerateRequest(text=long_prompt, sampling=S(max_tokens=4)),
         c.metadata(), grpc.StatusCode.INVALID_ARGUMENT),
        ("max_tokens 0", make_request(pb, prompt, 0), c.metadata(), grpc.StatusCode.INVALID_ARGUMENT),
        ("max_tokens -5", make_request(pb, prompt, -5), c.metadata(), grpc.StatusCode.INVALID_ARGUMENT),
        ("max_tokens beyond the context", make_request(pb, prompt, info.context_length), c.metadata(),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("temperature -0.5", pb.GenerateRequest(text=prompt, sampling=S(max_tokens=4, temperature=-0.5)),
         c.metadata(), grpc.StatusCode.INVALID_ARGUMENT),
        ("top_p 0", pb.GenerateRequest(text=prompt, sampling=S(max_tokens=4, top_p=0.0)), c.metadata(),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("top_p 1.5", pb.GenerateRequest(text=prompt, sampling=S(max_tokens=4, top_p=1.5)), c.metadata(),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown routing policy", make_request(pb, prompt, 4),
         c.metadata([("x-routing-policy", "fastest-please")]), grpc.StatusCode.INVALID_ARGUMENT),
        ("wrong API key", make_request(pb, prompt, 4), [("authorization", "Bearer not-the-key")],
         grpc.StatusCode.UNAUTHENTICATED),
        ("no API key", make_request(pb, prompt, 4), [], grpc.StatusCode.UNAUTHENTICATED),
        ("10 MB prompt", pb.GenerateRequest(text="a" * (10 << 20), sampling=S(max_tokens=4)), c.metadata(),
         grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("n = 2", pb.GenerateRequest(text=prompt, sampling=S(max_tokens=4, n=2)), c.metadata(),
         grpc.StatusCode.UNIMPLEMENTED),
    ]
    for name, request, metadata, want in cases:
        try:
            messages = list(gen.Generate(request, metadata=metadata, timeout=30))
            raise AssertionError("%s: accepted (%d messages), wanted %s" % (name, len(messages), want))
        except grpc.RpcError as e:
            expect(e.code() == want, "%s: status %s (%s), wanted %s" % (name, e.code(), e.details(), want))
            expect(bool(e.details()), "%s: status %s without a message" % (name, e.code()))
            print("  %-32s -> %s: %s" % (name, e.code().name, e.details()[:100]))
    # The same checks on a replica's own endpoint need no coordinator.
    expect(background.join(120), "the background stream did not end")
    expect(background.status == grpc.StatusCode.OK and background.tokens == reference,
           "the background stream was disturbed: %s %s" % (background.status, background.errors))
    print("%d bad requests got their status; the stream beside them was untouched" % len(cases))


def replica_loads(c, pb, controls):
    return [ctl.GetLoad(pb.GetLoadRequest(), metadata=c.metadata(), timeout=5) for ctl in controls]


def used_bytes(load):
    return sum(r.cache_bytes_used for r in load.ranks)


def check_cancel(c, pb, stubs, controls, prompts, count):
    baseline = [used_bytes(l) for l in replica_loads(c, pb, controls)]
    streams = []
    for i in range(count):
        prompt = prompts[i % len(prompts)]
        streams.append(Stream(stubs["Generation"], pb, make_request(pb, prompt, 400, ignore_eos=True),
                              c.metadata()))
    deadline = time.time() + 180
    for s in streams:
        expect(s.first_delta.wait(max(0.1, deadline - time.time())), "a stream got no token in 180 s")
    expect(all(s.finished is None and s.status is None for s in streams),
           "a stream ended before it was cancelled")
    # GetLoad's snapshot is taken after a step's events went out: allow it
    # a few steps to show every request running.
    deadline = time.time() + 10
    while True:
        busy = replica_loads(c, pb, controls)
        if sum(l.running_requests for l in busy) == count or time.time() > deadline:
            break
        time.sleep(0.01)
    expect(sum(l.running_requests for l in busy) == count,
           "%d requests running on the replicas, wanted %d" % (sum(l.running_requests for l in busy), count))
    for s in streams:
        s.cancel()
    for s in streams:
        expect(s.join(30), "a cancelled stream did not end")
        expect(s.status == grpc.StatusCode.CANCELLED and s.finished is None,
               "a cancelled stream ended with %s" % s.status)
    # Per replica: the step count when it first shows no request left, and
    # when its cache bytes are back at the baseline.
    for ctl, base in zip(controls, baseline):
        idle_step, back_step = None, None
        deadline = time.time() + 30
        while time.time() < deadline and back_step is None:
            load = ctl.GetLoad(pb.GetLoadRequest(), metadata=c.metadata(), timeout=5)
            if idle_step is None and load.running_requests == 0 and load.queued_requests == 0:
                idle_step = load.steps
            if idle_step is not None and used_bytes(load) == base:
                back_step = load.steps
            time.sleep(0.002)
        expect(back_step is not None, "cache bytes did not return to the baseline %d" % base)
        expect(back_step - idle_step <= 2, "cache back %d steps after the aborts" % (back_step - idle_step))
        print("  replica: %d busy -> %d bytes (baseline) %d step(s) after the last abort" %
              (max(used_bytes(l) for l in busy), base, back_step - idle_step))
    print("%d streams cancelled mid-decode; the cache returned to its baseline" % count)


def check_stalled_reader(c, pb, stubs, control, prompts, stall_seconds):
    """A client of the coordinator that stops reading: after --stall-timeout
    the coordinator ends its call and the replica aborts the request. The
    request runs beside 63 others of the same length that started before
    it, so "aborted" means: gone from the replica while all of those still
    run (a request left to run would end after them)."""
    background = [Stream(stubs["Generation"], pb, make_request(pb, prompts[i % len(prompts)], 440,
                                                                ignore_eos=True), c.metadata())
                  for i in range(63)]
    for s in background:
        expect(s.first_delta.wait(120), "a background stream got no token")
    request = make_request(pb, prompts[0], 440, ignore_eos=True, request_id="stalled-reader")
    request.output.logprobs = 20  # about 200 bytes a token: the buffers fill sooner
    started = time.time()
    client = cl.ZeroWindowClient(c.coordinator_port, "/xquant.v1.Generation/Generate",
                                 request.SerializeToString(), c.metadata())
    try:
        deadline = time.time() + 120
        while control.GetLoad(pb.GetLoadRequest(), metadata=c.metadata(), timeout=5).running_requests < 64:
            expect(time.time() < deadline, "the stalled request never ran")
            time.sleep(0.01)
        while True:
            expect(time.time() < deadline, "the stalled request was never aborted")
            load = control.GetLoad(pb.GetLoadRequest(), metadata=c.metadata(), timeout=5)
            if load.running_requests < 64:
                break
            time.sleep(0.02)
        # Abort answers found = false: it ended on its own side already.
        gone = not control.Abort(pb.AbortRequest(request_id="stalled-reader"), metadata=c.metadata(),
                                 timeout=5).found
        still_running = sum(1 for s in background if s.status is None)
        expect(gone and still_running == len(background),
               "the stalled request ended only with the others (%d of %d still running)" %
               (still_running, len(background)))
        print("a client that stopped reading was cut off %.1f s after it started (--stall-timeout %d s) "
              "while the %d requests begun before it still ran" %
              (time.time() - started, stall_seconds, still_running))
    finally:
        client.close()
    for s in background:
        expect(s.join(120) and s.finished is not None, "a background stream failed")


def find_rank0(port):
    """The pid of the `xq worker` listening on `port` with world rank 0."""
    needle = ("127.0.0.1:%d" % port).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().split(b"\0")
            if not cmd or not cmd[0].endswith(b"/xq") or needle not in cmd:
                continue
            with open("/proc/%s/environ" % pid, "rb") as f:
                env = f.read().split(b"\0")
            if b"OMPI_COMM_WORLD_RANK=0" in env:
                return int(pid)
        except OSError:
            continue
    return None


def check_kill(c, pb, stubs, prompts, reference, max_tokens):
    victim = c.replicas[0]
    streams = [Stream(stubs["Generation"], pb, make_request(pb, p, max_tokens), c.metadata())
               for p in prompts]
    # Mid-run: once a few streams have tokens (others are still queued).
    deadline = time.time() + 120
    while sum(1 for s in streams if s.tokens) < 4 and time.time() < deadline:
        time.sleep(0.005)
    pid = find_rank0(victim.port)
    expect(pid is not None, "rank 0 of %s not found" % victim.replica_id)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    for s in streams:
        expect(s.join(240), "a request was lost: its stream never ended")
    done = rerouted_or_kept = failed = 0
    for i, s in enumerate(streams):
        expect(s.terminals == 1 or s.status != grpc.StatusCode.OK,
               "stream %d: %d terminal messages" % (i, s.terminals))
        if s.finished is not None:
            expect(s.tokens == reference[i], "stream %d: tokens differ from the reference (duplicated "
                   "or lost tokens?)\n served %s\n wanted %s" % (i, s.tokens, reference[i]))
            done += 1
            rerouted_or_kept += s.finished.replica_id != victim.replica_id
        else:
            expect(len(s.errors) == 1 and s.errors[0].retryable and
                   s.errors[0].code == grpc.StatusCode.UNAVAILABLE.value[0],
                   "stream %d ended without a finished message or one retryable UNAVAILABLE error: "
                   "status %s errors %s" % (i, s.status, s.errors))
            expect(s.tokens == reference[i][: len(s.tokens)], "stream %d: streamed tokens are not a "
                   "prefix of the reference" % i)
            failed += 1
    expect(failed < len(streams), "every request failed")
    # Requests waiting on the killed replica (8 sequences run there, more
    # wait) had streamed nothing: the coordinator must have moved them.
    with open(os.path.join(c.log_dir, "coordinator.log"), errors="replace") as f:
        rerouted = sum(1 for line in f if "on replica %s" % victim.replica_id in line and
                       "routing it elsewhere" in line)
    expect(rerouted > 0, "no request was rerouted off the killed replica")
    print("replica killed: %d requests completed equal to the reference (%d on the survivor, %d of "
          "them rerouted off the killed one), %d ended with a retryable UNAVAILABLE; all within "
          "%.1f s of the kill" % (done, rerouted_or_kept, rerouted, failed, time.time() - killed_at))
    # The supervisor restarts it; it registers again and takes traffic.
    deadline = time.time() + 120
    while time.time() < deadline:
        listing = stubs["Registry"].ListReplicas(pb.ListReplicasRequest(), metadata=c.metadata(), timeout=5)
        states = {r.replica_id: (r.state, r.load.ready) for r in listing.replicas}
        if states.get(victim.replica_id) == ("up", True):
            break
        time.sleep(0.25)
    else:
        raise AssertionError("the killed replica did not come back: %s\n%s" %
                             (states, c.log_tail(victim.name)))
    print("restarted replica up after %.1f s" % (time.time() - killed_at))
    again = [Stream(stubs["Generation"], pb, make_request(pb, prompts[i], max_tokens),
                    c.metadata([("x-routing-policy", "round-robin")])) for i in range(8)]
    served = {}
    for i, s in enumerate(again):
        expect(s.join(120) and s.finished is not None, "request after the restart failed: %s %s" %
               (s.status, s.errors))
        expect(s.tokens == reference[i], "request after the restart differs from the reference")
        served[s.finished.replica_id] = served.get(s.finished.replica_id, 0) + 1
    listing = stubs["Registry"].ListReplicas(pb.ListReplicasRequest(), metadata=c.metadata(), timeout=5)
    expect(served.get(victim.replica_id, 0) > 0, "the restarted replica took no traffic: %s\n%s" %
           (served, listing))
    print("after the restart, 8 round-robin requests were served as %s, all equal to the reference" % served)


def check_tls(c, pb, pb_grpc, cert, prompts, reference):
    """Every hop over TLS (client -> coordinator -> replica, replica ->
    coordinator for Register): streams equal the reference; a plaintext
    client is refused."""
    with open(cert, "rb") as f:
        roots = f.read()
    channel = grpc.secure_channel(c.address, grpc.ssl_channel_credentials(root_certificates=roots))
    gen = pb_grpc.GenerationStub(channel)
    streams = [Stream(gen, pb, make_request(pb, p, len(r)), c.metadata()) for p, r in zip(prompts, reference)]
    for i, s in enumerate(streams):
        expect(s.join(120) and s.finished is not None and s.tokens == reference[i],
               "TLS stream %d: %s %s" % (i, s.status, s.errors))
    plain = pb_grpc.GenerationStub(grpc.insecure_channel(c.address))
    try:
        list(plain.Generate(make_request(pb, prompts[0], 4), metadata=c.metadata(), timeout=10))
        raise AssertionError("a plaintext client was served by a TLS coordinator")
    except grpc.RpcError as e:
        expect(e.code() == grpc.StatusCode.UNAVAILABLE, "plaintext client: %s" % e.code())
    print("%d streams over TLS equal the reference; a plaintext client is refused" % len(streams))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--shared", required=True)
    parser.add_argument("--check", choices=["serve", "kill", "tls", "stall"], required=True)
    args = parser.parse_args()
    model = os.path.join(args.shared, "models", "stories260K.bin")
    tokenizer = os.path.join(args.shared, "models", "tok512.bin")
    if not os.path.exists(model):
        print("SKIP: %s is absent" % model)
        return 0
    pb, pb_grpc = cl.load_stubs(os.path.join(args.build, "proto", "python"))
    prompts = prompts_from(os.path.join(args.shared, "data", "tinystories-valid.txt"), 32)
    max_tokens = 48
    worker_args = ["--max-sequences", "8" if args.check == "kill" else "64"]
    env = {"XQ_COMM_TIMEOUT_SECONDS": "3"} if args.check == "kill" else {}
    reference = cl.offline_greedy(args.build, model, tokenizer, 2, prompts, max_tokens, worker_args, env)
    tls = None
    if args.check == "tls":
        import tempfile
        tls = cl.self_signed_certificate(tempfile.mkdtemp(prefix="xq-tls-"))
    one_replica = args.check in ("tls", "stall")
    coordinator_args = ["--stall-timeout", str(STALL_SECONDS)] if args.check == "stall" else []
    c = cl.Cluster(args.build, args.source, model, tokenizer, replicas=1 if one_replica else 2, tp=2,
                   api_key=API_KEY, worker_args=worker_args, env=env, tls=tls,
                   coordinator_args=coordinator_args)
    print("logs in", c.log_dir)
    try:
        if tls:
            with open(tls[0], "rb") as f:
                channel = grpc.secure_channel(c.address, grpc.ssl_channel_credentials(f.read()))
        else:
            channel = grpc.insecure_channel(c.address)
        stubs = {"channel": channel, "Generation": pb_grpc.GenerationStub(channel),
                 "Registry": pb_grpc.RegistryStub(channel)}
        c.wait_ready(lambda name: stubs[name], replicas_up=len(c.replicas))
        if args.check == "serve":
            replica_channels = [grpc.insecure_channel("127.0.0.1:%d" % r.port) for r in c.replicas]
            controls = [pb_grpc.ControlStub(ch) for ch in replica_channels]
            info = check_standard_services(c, pb, stubs, replica_channels[0])
            check_clients(c, pb, stubs, args.build, args.source, prompts[3], reference[3])
            check_streams(c, pb, stubs, prompts, reference, max_tokens)
            check_bad_requests(c, pb, stubs, info, prompts[5], reference[5])
            check_cancel(c, pb, stubs, controls, prompts, 100)
        elif args.check == "stall":
            control = pb_grpc.ControlStub(grpc.insecure_channel("127.0.0.1:%d" % c.replicas[0].port))
            check_stalled_reader(c, pb, stubs, control, prompts, STALL_SECONDS)
        elif args.check == "tls":
            check_tls(c, pb, pb_grpc, tls[0], prompts[:4], reference[:4])
        else:
            check_kill(c, pb, stubs, prompts, reference, max_tokens)
    except Exception:
        for name in ["coordinator"] + [r.name for r in c.replicas]:
            sys.stderr.write("---- %s log (tail) ----\n%s\n" % (name, c.log_tail(name)))
        raise
    finally:
        c.stop()
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
