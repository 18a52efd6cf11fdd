#!/usr/bin/env python3
"""A load generator for a serving endpoint, with the semantics of
`vllm bench serve`: requests arrive at a rate (Gamma-distributed gaps, or all
at once) or under a concurrency limit, every response is streamed, and the
report gives throughput and the latency distributions under vLLM's names.

  bench/serve_load.py [run] --backend grpc --address 127.0.0.1:50051 \\
      --dataset wikitext --num-prompts 200 --input-len 512 --output-len 64 \\
      --request-rate 4 --result-file out.json --plot-dir plots/
  bench/serve_load.py plot A.json B.json ... --out latency.png   # latency vs throughput
  bench/serve_load.py cdf A.json --plot-dir plots/                # CDFs of one run

Backends: `grpc` streams xquant.v1.Generation/Generate (stubs generated from
proto/xquant/v1/xquant.proto, --stubs); `openai` posts to an OpenAI
/v1/completions with stream=true and reads its server-sent events.

Measures, as vLLM defines them (times on this client, perf_counter):
* TTFT: request sent to the first token-carrying message.
* ITL: the gap between successive token-carrying messages, one value per
  message, not divided by the tokens a message carries (vLLM does the same;
  a server that batches its stream shows longer, fewer ITLs).
* E2EL: request sent to the last token-carrying message.
* TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with more than one
  output token; output tokens come from the server's usage.
* goodput: completed requests per second that meet every --goodput SLO
  (a request with one output token has TPOT 0 there).
* max_output_tokens_per_s: the most token-carrying messages that arrived in
  one 1 s bucket counted from the first request's start (one per message,
  as vLLM counts); max_concurrent_requests: the most requests active in any
  such bucket.

Statistics use the population standard deviation and linearly interpolated
percentiles (numpy's defaults, as vLLM uses numpy); this file needs only the
standard library (grpc for --backend grpc and for server-side tokenization;
matplotlib for plots)."""
import argparse
import json
import math
import os
import random
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}

# ---------------------------------------------------------------- statistics


def mean(values):
    return sum(values) / len(values) if values else 0.0


def std(values):
    """Population standard deviation (numpy.std's default, ddof=0)."""
    if not values:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def percentile(values, p):
    """The p-th percentile with linear interpolation between the two nearest
    ranks (numpy.percentile's default method); 0 for no values."""
    if not values:
        return 0.0
    if not 0 <= p <= 100:
        raise ValueError("percentile %s is outside [0, 100]" % p)
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values):
    return percentile(values, 50)


# ---------------------------------------------------------------- arrivals


def ramp_rate(strategy, start_rps, end_rps, index, total):
    """The request rate at request `index` of `total` under a ramp-up."""
    progress = index / max(total - 1, 1)
    if strategy == "linear":
        return start_rps + (end_rps - start_rps) * progress
    if strategy == "exponential":
        return start_rps * (end_rps / start_rps) ** progress
    raise ValueError("unknown ramp-up strategy '%s'" % strategy)


def arrival_offsets(count, request_rate, burstiness=1.0, rng=None, ramp_up=None):
    """Seconds from the start at which each of `count` requests is sent.

    Gaps are Gamma(shape = burstiness, scale = 1 / (rate * burstiness)):
    mean 1 / rate, exponential (a Poisson process) at burstiness 1, burstier
    below 1, more regular above. An infinite rate sends everything at once.
    Without a ramp-up the offsets are rescaled so that the last one is
    exactly count / rate: the run's offered load then does not depend on the
    seed. ramp_up = (strategy, start_rps, end_rps) varies the rate from
    request to request and is not rescaled."""
    if count <= 0:
        raise ValueError("no requests")
    if not burstiness > 0:
        raise ValueError("--burstiness must be positive, got %s" % burstiness)
    rng = rng or random.Random()
    offsets, elapsed = [], 0.0
    for index in range(count):
        rate = ramp_rate(*ramp_up, index, count) if ramp_up else request_rate
        if not rate > 0:
            raise ValueError("the request rate must be positive, got %s" % rate)
        if math.isinf(rate):
            gap = 0.0
        elif math.isinf(burstiness):
            gap = 1.0 / rate
        else:
            gap = rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        elapsed += gap
        offsets.append(elapsed)
    if ramp_up is None and offsets[-1] > 0:
        scale = (count / request_rate) / offsets[-1]
        offsets = [o * scale for o in offsets]
    return offsets


# ---------------------------------------------------------------- datasets


@dataclass
class Request:
    prompt_len: int
    output_len: int
    prompt_ids: list = None  # token ids, or None to send prompt_text
    prompt_text: str = None


def draw_lengths(rng, count, length, range_ratio, minimum):
    """`count` integers uniform in [floor(L (1 - r)), ceil(L (1 + r))], at
    least `minimum` (vLLM's random dataset)."""
    if not 0 <= range_ratio < 1:
        raise ValueError("--range-ratio must be in [0, 1), got %s" % range_ratio)
    low = max(int(math.floor(length * (1 - range_ratio))), minimum)
    high = max(int(math.ceil(length * (1 + range_ratio))), low)
    return [rng.randint(low, high) for _ in range(count)]


class ServerTokenizer:
    """Tokenize and GetModelInfo over gRPC (the coordinator answers both)."""

    def __init__(self, grpc_client):
        self.client = grpc_client
        info = grpc_client.model_info()
        self.vocab_size, self.context_length = info.vocab_size, info.context_length
        self.bos, self.eos, self.name = info.bos_token_id, info.eos_token_id, info.name
        with_special = self.encode("Hello", None)
        plain = self.encode("Hello", False)
        n = len(with_special) - len(plain)
        self.prefix = with_special[:n] if n > 0 and with_special[n:] == plain else []

    def encode(self, text, add_special_tokens):
        return self.client.tokenize(text, add_special_tokens)


def wikitext_requests(rng, text, input_lens, output_lens, tokenizer):
    """Prompts cut from the text at random places: the text from a random
    word on, tokenized by the server (after the prefix the model wants, BOS)
    and truncated to the drawn number of tokens. Without a tokenizer, a
    slice of 4 characters per wanted token, sent as text (its length is then
    an estimate; the server's usage gives the real one)."""
    if len(text) < 1000:
        raise ValueError("the text is too short to cut prompts from")
    requests = []
    for prompt_len, output_len in zip(input_lens, output_lens):
        start = rng.randrange(len(text))
        start = text.find(" ", start) + 1  # from a word's beginning (0 when none follows)
        if tokenizer is None:
            slice_ = (text[start:] + text)[: 4 * prompt_len]
            requests.append(Request(prompt_len, output_len, prompt_text=slice_))
            continue
        want = prompt_len - len(tokenizer.prefix)
        if want < 1:
            raise ValueError("input length %d leaves no room after the prompt prefix" % prompt_len)
        chars, ids = 6 * want + 64, []
        while len(ids) < want:
            if chars > 2 * len(text):
                raise ValueError("the text tokenizes to fewer than %d tokens" % want)
            ids = tokenizer.encode((text[start:] + text)[:chars], False)
            chars *= 2
        requests.append(Request(prompt_len, output_len, prompt_ids=tokenizer.prefix + ids[:want]))
    return requests


def random_requests(rng, input_lens, output_lens, vocab_size, low, special_ids):
    """Prompts of token ids uniform in [low, vocab_size) minus `special_ids`:
    the low ids of the models here are control and byte tokens."""
    if not 0 <= low < vocab_size - len(special_ids):
        raise ValueError("--random-token-low %d leaves no ids below the vocabulary of %d" %
                         (low, vocab_size))
    requests = []
    for prompt_len, output_len in zip(input_lens, output_lens):
        ids = []
        while len(ids) < prompt_len:
            token = rng.randrange(low, vocab_size)
            if token not in special_ids:
                ids.append(token)
        requests.append(Request(prompt_len, output_len, prompt_ids=ids))
    return requests


# ---------------------------------------------------------------- backends


@dataclass
class Output:
    success: bool = False
    error: str = ""
    start_time: float = 0.0  # perf_counter at send
    ttft: float = 0.0
    itl: list = field(default_factory=list)
    latency: float = 0.0  # send to the last token-carrying message
    output_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = ""


def stream_timer(output):
    """A recorder of token-carrying messages: the first sets TTFT, each next
    one adds its gap to ITL."""
    last = [None]

    def token_message():
        now = time.perf_counter()
        if last[0] is None:
            output.ttft = now - output.start_time
        else:
            output.itl.append(now - last[0])
        last[0] = now
        output.latency = now - output.start_time

    return token_message


class GrpcClient:
    def __init__(self, address, stubs_dir, api_key="", timeout=3600):
        sys.path.insert(0, stubs_dir)
        try:
            import grpc
            from xquant.v1 import xquant_pb2, xquant_pb2_grpc
        except ImportError as e:
            raise SystemExit("serve_load: --backend grpc needs grpcio and the generated stubs "
                             "(--stubs %s): %s" % (stubs_dir, e))
        self.grpc, self.pb = grpc, xquant_pb2
        limit = 64 << 20
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", limit),
                                                               ("grpc.max_send_message_length", limit)])
        self.stub = xquant_pb2_grpc.GenerationStub(self.channel)
        self.metadata = [("authorization", "Bearer " + api_key)] if api_key else []
        self.timeout = timeout

    def model_info(self):
        return self.stub.GetModelInfo(self.pb.GetModelInfoRequest(), metadata=self.metadata, timeout=30)

    def tokenize(self, text, add_special_tokens):
        request = self.pb.TokenizeRequest(text=text)
        if add_special_tokens is not None:
            request.add_special_tokens = add_special_tokens
        return list(self.stub.Tokenize(request, metadata=self.metadata, timeout=60).token_ids)

    def generate(self, request, ignore_eos):
        pb = self.pb
        sampling = pb.SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=ignore_eos)
        if request.prompt_ids is not None:
            message = pb.GenerateRequest(token_ids=pb.TokenIds(ids=request.prompt_ids), sampling=sampling)
        else:
            message = pb.GenerateRequest(text=request.prompt_text, sampling=sampling)
        out = Output(start_time=time.perf_counter())
        token_message = stream_timer(out)
        streamed = 0
        try:
            for reply in self.stub.Generate(message, metadata=self.metadata, timeout=self.timeout):
                kind = reply.WhichOneof("event")
                if kind == "delta" and reply.delta.token_ids:
                    token_message()
                    streamed += len(reply.delta.token_ids)
                elif kind == "finished":
                    f = reply.finished
                    out.finish_reason = pb.FinishReason.Name(f.reason)
                    out.output_tokens = f.usage.completion_tokens or streamed
                    out.prompt_tokens = f.usage.prompt_tokens
                    if f.reason == pb.FINISH_REASON_CANCELLED:
                        out.error = "cancelled: " + f.detail
                    elif streamed == 0:
                        out.error = "finished without a token"
                    else:
                        out.success = True
                elif kind == "error":
                    codes = {c.value[0]: c.name for c in self.grpc.StatusCode}
                    out.error = "%s: %s" % (codes.get(reply.error.code, reply.error.code), reply.error.message)
            if not out.success and not out.error:
                out.error = "the stream ended without a terminal message"
        except self.grpc.RpcError as e:
            out.success = False
            out.error = "%s: %s" % (e.code().name, e.details())
        return out


class OpenAIClient:
    """POST /v1/completions with stream=true over http.client; the prompt is
    token ids where the dataset has them, ignore_eos is vLLM's extension."""

    def __init__(self, base_url, api_key="", model="", timeout=3600, fallback_model=""):
        from urllib.parse import urlsplit
        parts = urlsplit(base_url if "://" in base_url else "http://" + base_url)
        if parts.scheme not in ("http", "https"):
            raise SystemExit("serve_load: --base-url must be http:// or https://")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.api_key, self.timeout = api_key, timeout
        self.model = model or self._first_model(fallback_model)

    def _connection(self):
        import http.client
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=self.timeout)

    def _headers(self):
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        return headers

    def _first_model(self, fallback):
        conn = self._connection()
        try:
            conn.request("GET", self.prefix + "/v1/models", headers=self._headers())
            reply = conn.getresponse()
            body = reply.read()
            if reply.status == 200:
                models = json.loads(body).get("data") or []
                if models:
                    return models[0]["id"]
        except (OSError, ValueError, KeyError):
            pass
        finally:
            conn.close()
        if fallback:
            return fallback
        raise SystemExit("serve_load: GET %s/v1/models named no model; give --model" % self.prefix)

    def generate(self, request, ignore_eos):
        body = {"model": self.model, "max_tokens": request.output_len, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True},
                "prompt": request.prompt_ids if request.prompt_ids is not None else request.prompt_text}
        if ignore_eos:
            body["ignore_eos"] = True
        data = json.dumps(body).encode()
        conn = self._connection()
        out = Output(start_time=time.perf_counter())
        try:
            conn.request("POST", self.prefix + "/v1/completions", body=data, headers=self._headers())
            reply = conn.getresponse()
            if reply.status != 200:
                out.error = "HTTP %d: %s" % (reply.status, reply.read(2000).decode(errors="replace"))
                return out
            read_sse(reply, out)
        except (OSError, ValueError) as e:
            out.success, out.error = False, "%s: %s" % (type(e).__name__, e)
        finally:
            conn.close()
        return out


def read_sse(stream, out):
    """Reads `data:` events from a file-like HTTP body into `out`. A chunk
    with choices is a token-carrying message unless it is the closing one (no
    text and a finish_reason); usage may come with any chunk, normally the
    last; `data: [DONE]` ends the stream; an `error` object fails it."""
    token_message = stream_timer(out)
    data_lines, done, chunks = [], False, 0
    while not done:
        line = stream.readline()
        if not line:
            break
        line = line.decode("utf-8", errors="replace").rstrip("\r\n")
        if line.startswith(":"):
            continue
        if line.startswith("data:"):
            data_lines.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
            continue
        if line or not data_lines:
            continue
        payload, data_lines = "\n".join(data_lines), []
        if payload.strip() == "[DONE]":
            done = True
            break
        event = json.loads(payload)
        if event.get("error"):
            error = event["error"]
            out.error = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            return
        choices = event.get("choices") or []
        if choices:
            choice = choices[0]
            if choice.get("text") or not choice.get("finish_reason"):
                token_message()
                chunks += 1
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]
        usage = event.get("usage")
        if usage:
            out.output_tokens = usage.get("completion_tokens") or 0
            out.prompt_tokens = usage.get("prompt_tokens") or 0
    if not done:
        out.error = "the event stream ended without data: [DONE]"
    elif chunks == 0:
        out.error = "no token-carrying chunk"
    elif not out.output_tokens:
        out.error = "no usage in the stream"
    else:
        out.success = True


# ---------------------------------------------------------------- the run


def run_requests(generate, requests, offsets, max_concurrency, progress=True):
    """Sends request i at offsets[i] seconds (a thread each; with
    max_concurrency, at most that many in flight: a request whose time has
    come waits for a slot, and its clock starts when it is sent). Returns
    the outputs in request order and the run's duration."""
    outputs = [None] * len(requests)
    slots = threading.Semaphore(max_concurrency) if max_concurrency else None
    finished = [0]
    lock = threading.Lock()
    step = max(1, len(requests) // 10)

    def one(index):
        if slots:
            slots.acquire()
        try:
            outputs[index] = generate(requests[index])
        except Exception as e:  # a bug in a backend must not lose the request
            outputs[index] = Output(error="%s: %s" % (type(e).__name__, e))
        finally:
            if slots:
                slots.release()
        with lock:
            finished[0] += 1
            if progress and (finished[0] % step == 0 or finished[0] == len(requests)):
                print("  %d/%d requests done" % (finished[0], len(requests)), file=sys.stderr, flush=True)

    threads = []
    start = time.perf_counter()
    for index, offset in enumerate(offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(index,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return outputs, time.perf_counter() - start


def parse_goodput(items):
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, ...} (milliseconds)."""
    slos = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise SystemExit("serve_load: --goodput wants ttft:MS, tpot:MS or e2el:MS, got '%s'" % item)
        try:
            slos[key] = float(value)
        except ValueError:
            raise SystemExit("serve_load: --goodput %s: '%s' is not a number" % (key, value))
        if slos[key] < 0:
            raise SystemExit("serve_load: --goodput %s must not be negative" % key)
    return slos


def calculate_metrics(requests, outputs, duration, percentiles, goodput=None, selected=METRICS):
    """vLLM's result keys from the outputs of a run of `duration` seconds."""
    ttfts, tpots, all_tpots, itls, e2els = [], [], [], [], []
    input_total = output_total = completed = good = 0
    output_lens = []
    for request, out in zip(requests, outputs):
        if not out.success:
            output_lens.append(0)
            continue
        completed += 1
        input_total += out.prompt_tokens or request.prompt_len
        output_total += out.output_tokens
        output_lens.append(out.output_tokens)
        tpot = 0.0
        if out.output_tokens > 1:
            tpot = (out.latency - out.ttft) / (out.output_tokens - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)
        ttfts.append(out.ttft)
        itls.extend(out.itl)
        e2els.append(out.latency)
    if goodput:
        for ttft, tpot, e2el in zip(ttfts, all_tpots, e2els):
            measured = {"ttft": ttft, "tpot": tpot, "e2el": e2el}
            if all(limit / 1000.0 >= measured[key] for key, limit in goodput.items()):
                good += 1

    # Peak output rate: token-carrying messages in 1 s buckets from the first
    # successful request's start; concurrency: requests active in a bucket.
    max_tokens_per_s, max_concurrent = 0.0, 0
    ok = [out for out in outputs if out.success]
    if ok:
        first = min(out.start_time for out in ok)
        last = max(out.start_time + out.latency for out in ok)
        buckets = int(math.ceil(last - first)) + 1
        tokens, active = [0] * buckets, [0] * buckets
        for out in ok:
            t = out.start_time + out.ttft
            times = [t]
            for gap in out.itl:
                t += gap
                times.append(t)
            for t in times:
                bucket = int(t - first)
                if 0 <= bucket < buckets:
                    tokens[bucket] += 1
            for second in range(int(out.start_time - first), int(out.start_time + out.latency - first) + 1):
                active[second] += 1
        max_tokens_per_s, max_concurrent = float(max(tokens)), max(active)

    result = {
        "duration": duration,
        "completed": completed,
        "failed": len(outputs) - completed,
        "total_input_tokens": input_total,
        "total_output_tokens": output_total,
        "request_throughput": completed / duration,
        "request_goodput": good / duration if goodput else None,
        "output_throughput": output_total / duration,
        "total_token_throughput": (input_total + output_total) / duration,
        "max_output_tokens_per_s": max_tokens_per_s,
        "max_concurrent_requests": max_concurrent,
    }
    samples = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    for name in selected:
        values = samples[name]
        result["mean_%s_ms" % name] = mean(values) * 1000
        result["median_%s_ms" % name] = median(values) * 1000
        result["std_%s_ms" % name] = std(values) * 1000
        for p in percentiles:
            result["p%s_%s_ms" % (percentile_word(p), name)] = percentile(values, p) * 1000
    return result


def percentile_word(p):
    return str(int(p)) if int(p) == p else str(p)


def markdown_table(result, percentiles, selected):
    rows = [("Successful requests", "%d" % result["completed"]),
            ("Failed requests", "%d" % result["failed"])]
    if result.get("max_concurrency"):
        rows.append(("Maximum request concurrency", "%d" % result["max_concurrency"]))
    if result.get("request_rate") not in (None, "inf"):
        rows.append(("Request rate configured (RPS)", "%.2f" % result["request_rate"]))
    rows += [("Benchmark duration (s)", "%.2f" % result["duration"]),
             ("Total input tokens", "%d" % result["total_input_tokens"]),
             ("Total generated tokens", "%d" % result["total_output_tokens"]),
             ("Request throughput (req/s)", "%.2f" % result["request_throughput"])]
    if result.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s)", "%.2f" % result["request_goodput"]))
    rows += [("Output token throughput (tok/s)", "%.2f" % result["output_throughput"]),
             ("Peak output token throughput (tok/s)", "%.2f" % result["max_output_tokens_per_s"]),
             ("Peak concurrent requests", "%d" % result["max_concurrent_requests"]),
             ("Total token throughput (tok/s)", "%.2f" % result["total_token_throughput"])]
    for name in selected:
        label = METRIC_NAMES[name]
        rows += [("Mean %s (ms)" % label, "%.2f" % result["mean_%s_ms" % name]),
                 ("Median %s (ms)" % label, "%.2f" % result["median_%s_ms" % name]),
                 ("Std %s (ms)" % label, "%.2f" % result["std_%s_ms" % name])]
        for p in percentiles:
            word = percentile_word(p)
            rows.append(("P%s %s (ms)" % (word, label), "%.2f" % result["p%s_%s_ms" % (word, name)]))
    lines = ["| Metric | Value |", "|---|---:|"] + ["| %s | %s |" % row for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_cdfs(results, plot_dir, name="serve_load"):
    """CDFs of TTFT, ITL and E2EL (ms) of one or more runs, one PNG."""
    plt = pyplot()
    if plt is None:
        return None
    os.makedirs(plot_dir, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for result in results:
        label = result.get("label") or "run"
        series = {"TTFT": result.get("ttfts", []), "ITL": [g for r in result.get("itls", []) for g in r],
                  "E2EL": result.get("e2els", [])}
        for ax, (title, values) in zip(axes, series.items()):
            values = sorted(v * 1000 for v in values if v is not None)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=label)
    for ax, title in zip(axes, ("TTFT", "ITL", "E2EL")):
        ax.set_title(title + " CDF")
        ax.set_xlabel(title + " (ms)")
        ax.set_ylabel("fraction of " + ("gaps" if title == "ITL" else "requests"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(plot_dir, name + "_cdf.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_vs_throughput(results, path):
    """Mean and P99 of TTFT, ITL and E2EL against output throughput, one line
    per label (runs of one label sorted by throughput)."""
    plt = pyplot()
    if plt is None:
        raise SystemExit("serve_load plot: matplotlib is missing in %s" % sys.executable)
    groups = {}
    for result in results:
        groups.setdefault(result.get("label") or "run", []).append(result)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, runs in groups.items():
        runs.sort(key=lambda r: r["output_throughput"])
        x = [r["output_throughput"] for r in runs]
        for ax, name in zip(axes, ("ttft", "itl", "e2el")):
            for stat, style in (("mean", "-o"), ("p99", "--x")):
                key = "%s_%s_ms" % (stat, name)
                if all(key in r for r in runs):
                    ax.plot(x, [r[key] for r in runs], style, label="%s %s" % (label, stat))
    for ax, name in zip(axes, ("ttft", "itl", "e2el")):
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(METRIC_NAMES[name] + " (ms)")
        ax.set_title(METRIC_NAMES[name] + " vs throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- command line


def float_or_inf(text):
    return float("inf") if text.strip().lower() == "inf" else float(text)


def parser():
    p = argparse.ArgumentParser(prog="serve_load.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("grpc", "openai"), default="grpc")
    p.add_argument("--address", default="127.0.0.1:50051", help="grpc: the server (host:port)")
    p.add_argument("--stubs", default=os.path.join(REPO, "build", "proto", "python"),
                   help="grpc: the folder of the generated Python stubs")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="openai: the server's base URL")
    p.add_argument("--model", default="", help="openai: the model field (default: GET /v1/models' first)")
    p.add_argument("--tokenizer-address", default=None,
                   help="a gRPC Generation server for Tokenize and GetModelInfo (default: --address "
                        "with --backend grpc; none with openai: wikitext prompts go as text)")
    p.add_argument("--api-key", default=os.environ.get("XQ_API_KEY", ""))
    p.add_argument("--dataset", choices=("wikitext", "random"), default="wikitext")
    p.add_argument("--shared", default=os.path.join(REPO, "..", "shared"),
                   help="the shared data folder (wikitext: data/wikitext-2-test.txt)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (centre of the range)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (centre of the range)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L (1 - r), L (1 + r)], r in [0, 1)")
    p.add_argument("--random-token-low", type=int, default=32,
                   help="random: the lowest token id drawn (below are control and byte tokens)")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="random without a tokenizer address: the vocabulary size")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let the model stop at its end-of-sequence token (default: ignore it, "
                        "so output lengths are as drawn)")
    p.add_argument("--request-rate", type=float_or_inf, default=float("inf"),
                   help="requests per second (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of the gaps: 1 is Poisson, < 1 burstier, > 1 more regular")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--ramp-up-strategy", choices=("linear", "exponential"), default=None)
    p.add_argument("--ramp-up-start-rps", type=float, default=None)
    p.add_argument("--ramp-up-end-rps", type=float, default=None)
    p.add_argument("--num-warmups", type=int, default=0,
                   help="copies of the first request sent before the run, not measured")
    p.add_argument("--ready-check-timeout", type=float, default=0,
                   help="seconds to retry the first request until it succeeds before the run "
                        "(0: no check); it is not measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=3600)
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--percentile-metrics", default=",".join(METRICS),
                   help="metrics to report statistics of (of ttft,tpot,itl,e2el)")
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument("--label", default="", help="the run's name in plots (default: the backend)")
    p.add_argument("--result-file", default=None, help="write the results JSON here")
    p.add_argument("--markdown-file", default=None, help="also write the markdown table here")
    p.add_argument("--plot-dir", default=None, help="write the CDF plot here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run(argv):
    args = parser().parse_args(argv)
    selected = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    for m in selected:
        if m not in METRICS:
            raise SystemExit("serve_load: --percentile-metrics: unknown metric '%s' (of %s)" % (m, ",".join(METRICS)))
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    except ValueError:
        raise SystemExit("serve_load: --metric-percentiles wants numbers, got '%s'" % args.metric_percentiles)
    if any(not 0 < p < 100 for p in percentiles):
        raise SystemExit("serve_load: --metric-percentiles must lie in (0, 100)")
    goodput = parse_goodput(args.goodput)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise SystemExit("serve_load: --num-prompts, --input-len and --output-len must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("serve_load: --max-concurrency must be positive")
    ramp_up = None
    if args.ramp_up_strategy:
        if args.ramp_up_start_rps is None or args.ramp_up_end_rps is None:
            raise SystemExit("serve_load: --ramp-up-strategy needs --ramp-up-start-rps and --ramp-up-end-rps")
        if args.ramp_up_start_rps <= 0 or args.ramp_up_end_rps <= 0:
            raise SystemExit("serve_load: ramp-up rates must be positive")
        ramp_up = (args.ramp_up_strategy, args.ramp_up_start_rps, args.ramp_up_end_rps)
    elif not args.request_rate > 0:
        raise SystemExit("serve_load: --request-rate must be positive (or inf)")

    rng = random.Random(args.seed)
    tokenizer_address = args.tokenizer_address or (args.address if args.backend == "grpc" else None)
    tokenizer = None
    if tokenizer_address:
        tokenizer = ServerTokenizer(GrpcClient(tokenizer_address, args.stubs, args.api_key))
    if args.backend == "grpc":
        backend = GrpcClient(args.address, args.stubs, args.api_key, args.request_timeout)
    else:
        backend = OpenAIClient(args.base_url, args.api_key, args.model, args.request_timeout,
                               tokenizer.name if tokenizer else "")

    input_lens = draw_lengths(rng, args.num_prompts, args.input_len, args.range_ratio, 1)
    output_lens = draw_lengths(rng, args.num_prompts, args.output_len, args.range_ratio, 1)
    if tokenizer and tokenizer.context_length:
        longest = max(i + o for i, o in zip(input_lens, output_lens))
        if longest > tokenizer.context_length:
            raise SystemExit("serve_load: a request of %d tokens exceeds the model's context of %d" %
                             (longest, tokenizer.context_length))
    if args.dataset == "wikitext":
        path = os.path.join(args.shared, "data", "wikitext-2-test.txt")
        try:
            with open(path, encoding="utf-8") as f:
                text = " ".join(f.read().split())
        except OSError as e:
            raise SystemExit("serve_load: %s (set --shared)" % e)
        requests = wikitext_requests(rng, text, input_lens, output_lens, tokenizer)
    else:
        vocab = tokenizer.vocab_size if tokenizer else args.vocab_size
        if not vocab:
            raise SystemExit("serve_load: --dataset random needs --tokenizer-address or --vocab-size")
        special = {tokenizer.bos, tokenizer.eos} if tokenizer else set()
        requests = random_requests(rng, input_lens, output_lens, vocab, args.random_token_low, special)
    offsets = arrival_offsets(args.num_prompts, args.request_rate, args.burstiness, rng, ramp_up)

    def generate(request):
        return backend.generate(request, args.ignore_eos)

    warmup = {"requests": 0, "completed": 0, "input_tokens": 0, "output_tokens": 0}

    def untimed(outs):
        for out in outs:
            warmup["requests"] += 1
            if out.success:
                warmup["completed"] += 1
                warmup["input_tokens"] += out.prompt_tokens
                warmup["output_tokens"] += out.output_tokens

    if args.ready_check_timeout > 0:
        deadline = time.time() + args.ready_check_timeout
        while True:
            out = generate(requests[0])
            untimed([out])
            if out.success:
                break
            if time.time() > deadline:
                raise SystemExit("serve_load: the first request still fails after %g s: %s" %
                                 (args.ready_check_timeout, out.error))
            time.sleep(1)
    if args.num_warmups > 0:
        print("Warming up with %d requests..." % args.num_warmups, flush=True)
        outs, _ = run_requests(generate, [requests[0]] * args.num_warmups, [0.0] * args.num_warmups,
                               args.max_concurrency, progress=False)
        untimed(outs)

    if ramp_up:
        print("Traffic ramp-up: %s from %g to %g RPS" % ramp_up, flush=True)
    else:
        print("Traffic request rate: %s" % args.request_rate, flush=True)
    print("Burstiness factor: %s (%s)" % (args.burstiness, "Poisson process" if args.burstiness == 1
                                           else "Gamma distribution"), flush=True)
    print("Maximum request concurrency: %s" % args.max_concurrency, flush=True)
    outputs, duration = run_requests(generate, requests, offsets, args.max_concurrency, not args.quiet)

    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "command": command_line(argv),
        "backend": args.backend,
        "label": args.label or args.backend,
        "model_id": tokenizer.name if tokenizer else getattr(backend, "model", ""),
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "ramp_up_strategy": args.ramp_up_strategy,
        "ramp_up_start_rps": args.ramp_up_start_rps,
        "ramp_up_end_rps": args.ramp_up_end_rps,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "goodput_config": goodput or None,
        "warmup": warmup,
    }
    result.update(calculate_metrics(requests, outputs, duration, percentiles, goodput, selected))
    first_start = min((o.start_time for o in outputs), default=0.0)
    result.update({
        "requested_input_lens": [r.prompt_len for r in requests],
        "requested_output_lens": [r.output_len for r in requests],
        "input_lens": [o.prompt_tokens or r.prompt_len for r, o in zip(requests, outputs)],
        "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "e2els": [o.latency for o in outputs],
        "start_times": [o.start_time - first_start for o in outputs],
        "finish_reasons": [o.finish_reason for o in outputs],
        "errors": [o.error for o in outputs],
    })
    table = markdown_table(result, percentiles, selected)
    if args.result_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.result_file)), exist_ok=True)
        with open(args.result_file, "w") as f:
            json.dump(result, f, indent=1)
        print("results: %s" % args.result_file)
    if args.markdown_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown_file)), exist_ok=True)
        with open(args.markdown_file, "w") as f:
            f.write("`%s`\n\n%s" % (result["command"], table))
    print("\n" + table)
    failures = [o.error for o in outputs if not o.success]
    if failures:
        print("first failure: %s" % failures[0])
    if args.plot_dir:
        path = plot_cdfs([result], args.plot_dir)
        if path:
            print("plot: %s" % path)
        else:
            print("no plot: matplotlib is missing in %s; with --result-file, draw it with an interpreter "
                  "that has it: python3 bench/serve_load.py cdf RESULT.json --plot-dir %s" %
                  (sys.executable, args.plot_dir))
    return result


def command_line(argv):
    return shlex.join([os.path.relpath(os.path.abspath(sys.argv[0]))] + list(argv))


def main(argv):
    print("$ " + command_line(argv), flush=True)
    if argv and argv[0] == "plot":
        p = argparse.ArgumentParser(prog="serve_load.py plot",
                                    description="latency against output throughput of several runs")
        p.add_argument("results", nargs="+")
        p.add_argument("--out", default="serve_load_latency.png")
        a = p.parse_args(argv[1:])
        results = [json.load(open(path)) for path in a.results]
        print("plot: " + plot_latency_vs_throughput(results, a.out))
        return 0
    if argv and argv[0] == "cdf":
        p = argparse.ArgumentParser(prog="serve_load.py cdf", description="CDFs of TTFT, ITL and E2EL")
        p.add_argument("results", nargs="+")
        p.add_argument("--plot-dir", default=".")
        a = p.parse_args(argv[1:])
        path = plot_cdfs([json.load(open(path)) for path in a.results], a.plot_dir)
        if not path:
            raise SystemExit("serve_load cdf: matplotlib is missing in %s" % sys.executable)
        print("plot: " + path)
        return 0
    result = run(argv[1:] if argv and argv[0] == "run" else argv)
    return 0 if result["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
