#!/usr/bin/python3
"""launch/examples/stream_completion.py against a server: its output must be
the text the server streams for the same (greedy) request.

    test_python_example.py --stubs build/proto/python [--address HOST:PORT]
                           [--api-key KEY] [--prompt TEXT] [--max-tokens N]

With --address: the example runs against that server, and this test sends
the same request itself and compares the texts (greedy decoding gives the
same tokens both times). Without: a fake Generation server in this process
streams known deltas, and the example's output must be exactly them.
"""
import argparse
import os
import subprocess
import sys
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
EXAMPLE = os.path.join(REPO, "launch", "examples", "stream_completion.py")

parser = argparse.ArgumentParser()
parser.add_argument("--address", default="", help="a running server (default: a fake here)")
parser.add_argument("--stubs", default=os.path.join(REPO, "build", "proto", "python"))
parser.add_argument("--api-key", default="")
parser.add_argument("--prompt", default="Once upon a time")
parser.add_argument("--max-tokens", type=int, default=16)
args = parser.parse_args()

if not os.path.exists(os.path.join(args.stubs, "xquant", "v1", "xquant_pb2_grpc.py")):
    print(f"SKIP: no generated stubs under {args.stubs}")
    sys.exit(0)
sys.path.insert(0, args.stubs)
import grpc  # noqa: E402
from xquant.v1 import xquant_pb2, xquant_pb2_grpc  # noqa: E402

FAKE_DELTAS = ["Once", " upon", " a ", "tim\u00e9"]


class FakeGeneration(xquant_pb2_grpc.GenerationServicer):
    def __init__(self, api_key):
        self.api_key = api_key

    def Generate(self, request, context):
        if self.api_key:
            given = dict(context.invocation_metadata()).get("authorization", "")
            if given != "Bearer " + self.api_key:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong API key")
        for i, text in enumerate(FAKE_DELTAS[:request.sampling.max_tokens]):
            yield xquant_pb2.GenerateResponse(
                request_id="fake", delta=xquant_pb2.Delta(token_ids=[i], text=text))
        yield xquant_pb2.GenerateResponse(request_id="fake", finished=xquant_pb2.Finished(
            reason=xquant_pb2.FINISH_REASON_LENGTH, text="!",
            usage=xquant_pb2.Usage(completion_tokens=len(FAKE_DELTAS))))


def stream_text(address, api_key):
    """The text the server streams for the example's request."""
    stub = xquant_pb2_grpc.GenerationStub(grpc.insecure_channel(address))
    request = xquant_pb2.GenerateRequest(
        text=args.prompt, sampling=xquant_pb2.SamplingParams(max_tokens=args.max_tokens))
    metadata = [("authorization", "Bearer " + api_key)] if api_key else []
    text = ""
    for response in stub.Generate(request, metadata=metadata, timeout=300):
        if response.WhichOneof("event") == "delta":
            text += response.delta.text
        elif response.WhichOneof("event") == "finished":
            text += response.finished.text
        elif response.WhichOneof("event") == "error":
            sys.exit(f"FAIL: the reference request failed: {response.error.message}")
    return text


def run_example(address, api_key):
    command = [sys.executable, EXAMPLE, "--address", address, "--prompt", args.prompt,
               "--max-tokens", str(args.max_tokens), "--stubs", args.stubs]
    if api_key:
        command += ["--api-key", api_key]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


failures = []
server = None
address = args.address
if not address:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    xquant_pb2_grpc.add_GenerationServicer_to_server(FakeGeneration(args.api_key or "K"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    api_key = args.api_key or "K"
    expected = "".join(FAKE_DELTAS[:args.max_tokens]) + "!"
    # A wrong key must fail the example (exit status non-zero, the code named).
    wrong = run_example(address, "wrong")
    if wrong.returncode == 0 or "UNAUTHENTICATED" not in wrong.stderr:
        failures.append(f"a wrong key: exit {wrong.returncode}, stderr {wrong.stderr!r}")
else:
    api_key = args.api_key
    expected = stream_text(address, api_key)

result = run_example(address, api_key)
if result.returncode != 0:
    failures.append(f"the example exited {result.returncode}: {result.stderr}")
elif result.stdout != expected + "\n":
    failures.append(f"the example printed {result.stdout!r}, the server streams {expected!r}")
if server is not None:
    server.stop(grace=1)
for failure in failures:
    print("FAIL:", failure)
if failures:
    sys.exit(1)
print(f"python example: OK ({len(expected)} characters from {address})")
