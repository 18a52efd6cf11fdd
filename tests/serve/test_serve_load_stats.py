#!/usr/bin/env python3
"""Unit checks of bench/serve_load.py's arithmetic against independent
references: percentiles, median, mean and standard deviation against numpy
and Python's statistics module; the arrival schedule (span N / R, Gamma gaps,
ramp-up); goodput, TPOT and the peak-rate buckets against direct numpy
computations; the server-sent-event reader and the OpenAI client against a
local HTTP server that streams chunks.

Tolerances: results that are sums or interpolations of the same doubles
computed in another order agree to 1e-9 relative (a few ulps of rounding);
the Gamma gaps' squared coefficient of variation, estimated from 20000
draws, lies within 5 % of 1 / burstiness (its standard error there is
below 2 %)."""
import http.server
import io
import json
import math
import os
import random
import statistics
import sys
import threading
import unittest

try:
    import numpy as np
except ImportError:
    print("SKIP: numpy is missing (python3-numpy)")
    sys.exit(0)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import serve_load as sl  # noqa: E402


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


class Statistics(unittest.TestCase):
    def test_percentiles_match_numpy(self):
        rng = random.Random(7)
        for n in (1, 2, 3, 10, 101, 1000):
            values = [rng.expovariate(3.0) for _ in range(n)]
            for p in (0, 1, 25, 50, 90, 99, 99.9, 100):
                self.assertTrue(close(sl.percentile(values, p), float(np.percentile(values, p))), (n, p))
            self.assertTrue(close(sl.median(values), statistics.median(values)))
            self.assertTrue(close(sl.mean(values), statistics.fmean(values)))
            self.assertTrue(close(sl.std(values), float(np.std(values))))
            self.assertTrue(close(sl.std(values), statistics.pstdev(values)))
        self.assertEqual(sl.percentile([], 50), 0.0)
        self.assertEqual(sl.std([]), 0.0)
        with self.assertRaises(ValueError):
            sl.percentile([1.0], 101)

    def test_lengths_cover_the_range(self):
        lens = sl.draw_lengths(random.Random(1), 5000, 40, 0.6, 1)
        self.assertEqual((min(lens), max(lens)), (16, 64))
        self.assertEqual(sl.draw_lengths(random.Random(1), 3, 5, 0.0, 1), [5, 5, 5])
        self.assertEqual(min(sl.draw_lengths(random.Random(1), 500, 2, 0.9, 1)), 1)
        with self.assertRaises(ValueError):
            sl.draw_lengths(random.Random(1), 3, 5, 1.0, 1)


class Arrivals(unittest.TestCase):
    def test_span_is_count_over_rate(self):
        for count, rate, burstiness in ((40, 20.0, 1.0), (1000, 3.5, 0.3), (7, 0.5, 4.0), (1, 2.0, 1.0)):
            offsets = sl.arrival_offsets(count, rate, burstiness, random.Random(count))
            self.assertEqual(len(offsets), count)
            self.assertTrue(close(offsets[-1], count / rate), (count, rate, offsets[-1]))
            self.assertTrue(all(b >= a for a, b in zip(offsets, offsets[1:])))
            self.assertGreater(offsets[0], 0)

    def test_infinite_rate_and_burstiness(self):
        self.assertEqual(sl.arrival_offsets(5, float("inf")), [0.0] * 5)
        regular = sl.arrival_offsets(4, 2.0, float("inf"))
        self.assertTrue(all(close(a, b) for a, b in zip(regular, [0.5, 1.0, 1.5, 2.0])))

    def test_gamma_gaps_have_the_shape(self):
        for burstiness in (0.25, 1.0, 4.0):
            offsets = sl.arrival_offsets(20000, 10.0, burstiness, random.Random(3))
            gaps = np.diff([0.0] + offsets)
            self.assertTrue(close(float(gaps.mean()), 0.1))  # the rescale fixes the mean exactly
            cv2 = float(gaps.var() / gaps.mean() ** 2)
            self.assertAlmostEqual(cv2 * burstiness, 1.0, delta=0.05)

    def test_ramp_up_is_not_rescaled(self):
        offsets = sl.arrival_offsets(11, 1.0, float("inf"), ramp_up=("linear", 1.0, 11.0))
        want = np.cumsum([1.0 / (1.0 + i) for i in range(11)])
        self.assertTrue(all(close(a, float(b)) for a, b in zip(offsets, want)))
        self.assertTrue(close(sl.ramp_rate("exponential", 2.0, 32.0, 2, 5), 8.0))
        with self.assertRaises(ValueError):
            sl.arrival_offsets(3, 0.0)


def output(start, ttft, gaps, tokens, success=True, prompt=10):
    return sl.Output(success=success, start_time=start, ttft=ttft, itl=list(gaps),
                     latency=ttft + sum(gaps), output_tokens=tokens, prompt_tokens=prompt,
                     error="" if success else "boom")


class Metrics(unittest.TestCase):
    def setUp(self):
        rng = random.Random(11)
        self.outputs = []
        for i in range(60):
            gaps = [rng.uniform(0.005, 0.2) for _ in range(rng.randint(0, 12))]
            self.outputs.append(output(rng.uniform(0, 5), rng.uniform(0.01, 0.8), gaps, len(gaps) + 1,
                                       success=(i % 9 != 4), prompt=rng.randint(5, 50)))
        self.requests = [sl.Request(prompt_len=99, output_len=o.output_tokens) for o in self.outputs]

    def test_against_numpy(self):
        duration = 7.25
        goodput = {"ttft": 400.0, "tpot": 100.0}
        r = sl.calculate_metrics(self.requests, self.outputs, duration, [50, 90, 99, 99.9], goodput)
        ok = [o for o in self.outputs if o.success]
        ttft = np.array([o.ttft for o in ok])
        e2el = np.array([o.latency for o in ok])
        tokens = np.array([o.output_tokens for o in ok])
        tpot_all = np.where(tokens > 1, (e2el - ttft) / np.maximum(tokens - 1, 1), 0.0)
        tpot = tpot_all[tokens > 1]
        itl = np.concatenate([o.itl for o in ok])
        self.assertEqual(r["completed"], len(ok))
        self.assertEqual(r["failed"], len(self.outputs) - len(ok))
        self.assertEqual(r["total_output_tokens"], int(tokens.sum()))
        self.assertEqual(r["total_input_tokens"], sum(o.prompt_tokens for o in ok))
        self.assertTrue(close(r["output_throughput"], tokens.sum() / duration))
        self.assertTrue(close(r["request_throughput"], len(ok) / duration))
        self.assertTrue(close(r["total_token_throughput"],
                              (tokens.sum() + sum(o.prompt_tokens for o in ok)) / duration))
        for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
            self.assertTrue(close(r["mean_%s_ms" % name], values.mean() * 1000), name)
            self.assertTrue(close(r["median_%s_ms" % name], np.median(values) * 1000), name)
            self.assertTrue(close(r["std_%s_ms" % name], values.std() * 1000), name)
            for p, key in ((50, "p50"), (90, "p90"), (99, "p99"), (99.9, "p99.9")):
                self.assertTrue(close(r["%s_%s_ms" % (key, name)], np.percentile(values, p) * 1000), (name, p))
        good = int(np.sum((ttft <= 0.4) & (tpot_all <= 0.1)))
        self.assertGreater(good, 0)
        self.assertLess(good, len(ok))
        self.assertTrue(close(r["request_goodput"], good / duration))
        # The peak rate: token-carrying messages per 1 s bucket from the first start.
        first = min(o.start_time for o in ok)
        times = np.concatenate([o.start_time + o.ttft + np.cumsum([0.0] + o.itl) for o in ok]) - first
        self.assertEqual(r["max_output_tokens_per_s"], float(np.bincount(times.astype(int)).max()))
        active = np.zeros(64, dtype=int)
        for o in ok:
            active[int(o.start_time - first): int(o.start_time + o.latency - first) + 1] += 1
        self.assertEqual(r["max_concurrent_requests"], int(active.max()))

    def test_goodput_boundaries(self):
        outs = [output(0.0, 0.5, [0.1, 0.1], 3), output(0.0, 0.5001, [0.1], 2), output(0.0, 0.2, [], 1)]
        reqs = [sl.Request(1, o.output_tokens) for o in outs]
        r = sl.calculate_metrics(reqs, outs, 1.0, [99], {"ttft": 500.0, "tpot": 100.0})
        self.assertEqual(r["request_goodput"], 2.0)  # at the limit counts; one token is TPOT 0
        r = sl.calculate_metrics(reqs, outs, 1.0, [99], {"e2el": 600.0})
        self.assertEqual(r["request_goodput"], 1.0)  # E2ELs 700, 600.1 and 200 ms
        self.assertIsNone(sl.calculate_metrics(reqs, outs, 1.0, [99])["request_goodput"])
        self.assertEqual(sl.parse_goodput(["ttft:5", "e2el:7.5"]), {"ttft": 5.0, "e2el": 7.5})
        with self.assertRaises(SystemExit):
            sl.parse_goodput(["itl:5"])


def sse(*events):
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
                    for e in events)


def chunk(text, finish=None, usage=None):
    event = {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage:
        event["usage"] = usage
    return event


class ServerSentEvents(unittest.TestCase):
    def test_usage_in_the_last_chunk(self):
        body = b": a comment\n\n" + sse(chunk("a"), chunk("b"), chunk(""), chunk("c"),
                                         chunk("", "length", {"prompt_tokens": 9, "completion_tokens": 5}),
                                         b"[DONE]")
        out = sl.Output()
        sl.read_sse(io.BytesIO(body), out)
        self.assertTrue(out.success, out.error)
        self.assertEqual((len(out.itl), out.output_tokens, out.prompt_tokens), (3, 5, 9))
        self.assertEqual(out.finish_reason, "length")

    def test_usage_in_a_chunk_of_its_own(self):
        body = sse(chunk("a", None), chunk("b", "length"),
                   {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}}, b"[DONE]")
        out = sl.Output()
        sl.read_sse(io.BytesIO(body.replace(b"\n\n", b"\r\n\r\n")), out)
        self.assertTrue(out.success, out.error)
        self.assertEqual((len(out.itl), out.output_tokens), (1, 2))

    def test_failures(self):
        for body, words in ((sse(chunk("a")), "[DONE]"),
                            (sse({"error": {"message": "pool exhausted"}}), "pool exhausted"),
                            (sse(chunk("a"), b"[DONE]"), "usage")):
            out = sl.Output()
            sl.read_sse(io.BytesIO(body), out)
            self.assertFalse(out.success)
            self.assertIn(words, out.error)


class FakeCompletions(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeCompletions.seen.append((self.path, self.headers.get("Authorization"), request))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = request["max_tokens"]
        events = [chunk("t%d" % i) for i in range(n)]
        events[-1]["choices"][0]["finish_reason"] = "length"
        events[-1]["usage"] = {"prompt_tokens": len(request["prompt"]), "completion_tokens": n}
        for data in [sse(e) for e in events] + [sse(b"[DONE]")]:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


class OpenAIBackend(unittest.TestCase):
    def test_streams_from_a_chunked_server(self):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            client = sl.OpenAIClient("http://127.0.0.1:%d" % server.server_address[1], api_key="k1")
            self.assertEqual(client.model, "fake-model")
            out = client.generate(sl.Request(3, 6, prompt_ids=[5, 6, 7]), ignore_eos=True)
        finally:
            server.shutdown()
            server.server_close()
        self.assertTrue(out.success, out.error)
        self.assertEqual((out.output_tokens, out.prompt_tokens, len(out.itl)), (6, 3, 5))
        path, auth, request = FakeCompletions.seen[-1]
        self.assertEqual((path, auth), ("/v1/completions", "Bearer k1"))
        self.assertEqual((request["prompt"], request["ignore_eos"], request["stream"]), ([5, 6, 7], True, True))
        self.assertTrue(close(out.latency, out.ttft + sum(out.itl)))


if __name__ == "__main__":
    unittest.main(verbosity=1)
