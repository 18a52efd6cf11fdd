#!/usr/bin/python3
"""Streams one completion from an xquant server and prints it as it arrives.

    /usr/bin/python3 launch/examples/stream_completion.py --address 127.0.0.1:50051 \
        --prompt "Once upon a time" --max-tokens 32 [--api-key KEY] [--stubs build/proto/python]

Needs grpcio and protobuf (Debian: python3-grpcio python3-protobuf) and the
generated stubs (built with the project, under build/proto/python).
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--address", default="127.0.0.1:50051")
parser.add_argument("--prompt", default="Once upon a time")
parser.add_argument("--max-tokens", type=int, default=32)
parser.add_argument("--api-key", default="")
parser.add_argument("--timeout", type=float, default=300, help="seconds")
parser.add_argument("--stubs", default=os.path.join(REPO, "build", "proto", "python"),
                    help="folder with xquant/v1/xquant_pb2*.py")
args = parser.parse_args()

sys.path.insert(0, args.stubs)
import grpc  # noqa: E402
from xquant.v1 import xquant_pb2, xquant_pb2_grpc  # noqa: E402

channel = grpc.insecure_channel(args.address)
stub = xquant_pb2_grpc.GenerationStub(channel)
request = xquant_pb2.GenerateRequest(
    text=args.prompt, sampling=xquant_pb2.SamplingParams(max_tokens=args.max_tokens))  # greedy
metadata = [("authorization", "Bearer " + args.api_key)] if args.api_key else []

finished = None
try:
    for response in stub.Generate(request, metadata=metadata, timeout=args.timeout):
        event = response.WhichOneof("event")
        if event == "delta":
            print(response.delta.text, end="", flush=True)
        elif event == "finished":
            finished = response.finished
            print(finished.text)
        elif event == "error":  # failed after the server accepted the request
            print()
            retry = " (retryable)" if response.error.retryable else ""
            sys.exit(f"error: {response.error.message}{retry}")
except grpc.RpcError as e:  # refused, unreachable, timed out
    sys.exit(f"failed: {e.code().name}: {e.details()}")
if finished is None:
    sys.exit("failed: the stream ended without a finished message")
reason = xquant_pb2.FinishReason.Name(finished.reason)
print(f"{finished.usage.completion_tokens} tokens, {reason}", file=sys.stderr)
