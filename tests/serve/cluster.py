"""A local serving cluster for tests: one `xq coordinator` and replicas of
`mpirun -np tp*pp xq worker --serve`, each under launch/supervise.sh, all on
loopback with free ports, plus helpers that talk to them through the stubs
generated from proto/xquant/v1/xquant.proto (as an outside client would).

Runs under Debian's /usr/bin/python3 (python3-grpcio, python3-protobuf)."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc


def load_stubs(stubs_dir):
    sys.path.insert(0, stubs_dir)
    from xquant.v1 import xquant_pb2, xquant_pb2_grpc  # noqa: E402
    return xquant_pb2, xquant_pb2_grpc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpirun_prefix(np_):
    cmd = ["mpirun", "--oversubscribe", "--mca", "orte_abort_on_non_zero_status", "0"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + ["-np", str(np_)]


# Raw-bytes calls of the standard services, so the test needs no stubs for
# them: grpc.health.v1 HealthCheckRequest{service = 1} / HealthCheckResponse
# {status = 1}, and grpc.reflection.v1alpha ServerReflectionRequest
# {list_services = 7}.
def _string_field(number, text):
    data = text.encode()
    return bytes([(number << 3) | 2, len(data)]) + data


def health_status(channel, service, timeout=2.0):
    """1 SERVING, 2 NOT_SERVING, None when the call fails."""
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        reply = check(_string_field(1, service), timeout=timeout)
    except grpc.RpcError:
        return None
    return reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0


def health_watch_first(channel, service, timeout=5.0):
    """The first status grpc.health.v1 Watch streams for `service`."""
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
    call = watch(_string_field(1, service), timeout=timeout)
    try:
        reply = next(iter(call))
    finally:
        call.cancel()
    return reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0


def _reflect(channel, request, timeout):
    info = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return b"".join(info(iter([request]), timeout=timeout))


def reflection_services(channel, timeout=5.0):
    """The raw reply of a list_services request (service names appear in it)."""
    return _reflect(channel, _string_field(7, ""), timeout)


def reflection_file_of(channel, symbol, timeout=5.0):
    """The raw reply of file_containing_symbol (= 4): the serialized
    FileDescriptorProto that declares `symbol`, which is what lets grpcurl
    call a method without the .proto files."""
    return _reflect(channel, _string_field(4, symbol), timeout)


class Cluster:
    def __init__(self, build, source, model, tokenizer, replicas=2, tp=2, api_key="",
                 worker_args=(), coordinator_args=(), log_dir=None, env=None, tls=None,
                 replica_metrics=False):
        self.build, self.source = build, source
        self.xq = os.path.join(build, "launch", "xq")
        self.model, self.tokenizer = model, tokenizer
        self.api_key = api_key
        self.tp = tp
        self.worker_args = list(worker_args)
        # Each replica also serves Prometheus metrics (--metrics-listen) on
        # a port of its own: proc.metrics_port.
        self.replica_metrics = replica_metrics
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="xq-cluster-")
        self.env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                        **(env or {}))
        self.procs = []
        # tls: (certificate, key) of a self-signed certificate for 127.0.0.1
        # that every server presents and every caller trusts.
        self.tls_args = []
        if tls:
            self.tls_args = ["--tls-cert", tls[0], "--tls-key", tls[1], "--tls-ca", tls[0],
                             "--tls-server-name", "localhost"]
        self.coordinator_port = free_port()
        self.address = "127.0.0.1:%d" % self.coordinator_port
        key = ["--api-key", api_key] if api_key else []
        self.coordinator = self._start("coordinator", [self.xq, "coordinator", "--listen", self.address,
                                                       "--reflection", *key, *self.tls_args,
                                                       *coordinator_args])
        self.replicas = []
        for i in range(replicas):
            self.replicas.append(self.start_replica(i))

    def _start(self, name, cmd):
        log = open(os.path.join(self.log_dir, name + ".log"), "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        proc.name = name
        self.procs.append(proc)
        return proc

    def start_replica(self, index):
        port = free_port()
        key = ["--api-key", self.api_key] if self.api_key else []
        metrics_port = free_port() if self.replica_metrics else None
        if metrics_port:
            key += ["--metrics-listen", "127.0.0.1:%d" % metrics_port]
        worker = [self.xq, "worker", "--serve", "--tp", str(self.tp), "--listen", "127.0.0.1:%d" % port,
                  "--coordinator", self.address, "--replica-id", "replica-%d" % index,
                  "--model", self.model, "--tokenizer", self.tokenizer, "--reflection", *key,
                  *self.tls_args, *self.worker_args]
        supervised = ["bash", os.path.join(self.source, "launch", "supervise.sh"), "--backoff", "1",
                      "--name", "replica-%d" % index, "--"] + mpirun_prefix(self.tp) + worker
        proc = self._start("replica-%d" % index, supervised)
        proc.port = port
        proc.metrics_port = metrics_port
        proc.replica_id = "replica-%d" % index
        return proc

    def log_tail(self, name, lines=30):
        try:
            with open(os.path.join(self.log_dir, name + ".log"), "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def metadata(self, extra=()):
        md = [("authorization", "Bearer " + self.api_key)] if self.api_key else []
        return md + list(extra)

    def wait_ready(self, channel_of, replicas_up, timeout=120):
        """Until the coordinator is SERVING and lists `replicas_up` replicas up."""
        from xquant.v1 import xquant_pb2
        deadline = time.time() + timeout
        registry = channel_of("Registry")
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError("%s exited with %s:\n%s" % (p.name, p.returncode, self.log_tail(p.name)))
            try:
                listing = registry.ListReplicas(xquant_pb2.ListReplicasRequest(), metadata=self.metadata(),
                                                timeout=2)
                up = [r for r in listing.replicas if r.state == "up" and r.load.ready]
                if len(up) >= replicas_up:
                    return listing
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise RuntimeError("cluster not ready within %d s; coordinator log:\n%s" %
                           (timeout, self.log_tail("coordinator")))

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 20
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def self_signed_certificate(directory):
    """A certificate and key for localhost and 127.0.0.1 (openssl)."""
    cert, key = os.path.join(directory, "server.crt"), os.path.join(directory, "server.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def offline_greedy(build, model, tokenizer, tp, prompts, max_tokens, worker_args=(), env=None):
    """The same prompts through `xq worker --input` (the batch path, one
    process group, no server) at the same tp: token ids per prompt."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
        with open(src, "w") as f:
            for i, p in enumerate(prompts):
                f.write(json.dumps({"id": i, "prompt": p, "max_tokens": max_tokens}) + "\n")
        cmd = mpirun_prefix(tp) + [os.path.join(build, "launch", "xq"), "worker", "--tp", str(tp),
                                   "--model", model, "--tokenizer", tokenizer, "--input", src,
                                   "--output", dst, *worker_args]
        run_env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                       **(env or {}))
        done = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError("offline reference failed:\n" + done.stderr[-3000:])
        results = {}
        with open(dst) as f:
            for line in f:
                r = json.loads(line)
                if "error" in r:
                    raise RuntimeError("offline reference: " + r["error"])
                results[r["id"]] = r["token_ids"]
        return [results[i] for i in range(len(prompts))]


class ZeroWindowClient:
    """A raw HTTP/2 client that announces a flow-control window of 0 and
    never opens it: the server can send nothing of the stream, so its writes
    stall once gRPC's own buffers are full -- a client that stopped reading,
    without depending on how much a real client library buffers."""

    def __init__(self, port, method, request_bytes, metadata=()):
        self.sock = socket.create_connection(("127.0.0.1", port))
        out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        out += self._frame(4, 0, 0, b"\x00\x04\x00\x00\x00\x00")  # SETTINGS_INITIAL_WINDOW_SIZE = 0
        out += self._frame(4, 1, 0, b"")  # ACK of the server's SETTINGS
        headers = b""
        for name, value in [(":method", "POST"), (":scheme", "http"), (":path", method),
                            (":authority", "127.0.0.1"), ("content-type", "application/grpc"),
                            ("te", "trailers"), *metadata]:
            # A literal header field without indexing, new name, no Huffman
            # coding (names and values here are shorter than 127 bytes).
            headers += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
        out += self._frame(1, 0x4, 1, headers)  # END_HEADERS
        message = b"\x00" + len(request_bytes).to_bytes(4, "big") + request_bytes
        out += self._frame(0, 0x1, 1, message)  # END_STREAM
        self.sock.sendall(out)

    @staticmethod
    def _frame(kind, flags, stream, payload):
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def close(self):
        self.sock.close()
