#!/usr/bin/env python3
"""The coordinator's OpenAI-compatible HTTP front (`xq coordinator
--http-listen`), driven by the official `openai` package (and raw HTTP where
the package hides what is checked), on stories260K with one tp-2 replica.

References: the token ids of `xq worker --input` (the offline batch path, no
server) for the same prompts, greedy, at the same tp; the gRPC Generate and
Tokenize answers for text and token counts; Python's jinja2 rendering of the
model's own chat template for chat prompts (SmolLM2, with --chat).

Checked: /health and /ready (503 before a replica is ready, 200 after);
models.list(); completions, plain and streamed, equal to the reference
(tokens through logprobs, text, usage, finish reasons "length" and "stop"
with a stop string), a prompt given as token ids; the error statuses through
openai's exception classes (401 wrong key, 400 bad values and malformed JSON,
404 another model, 413 an oversized body, 429 with Retry-After when the
queue is full); a client that disconnects, streamed or not, aborts its
request (the replica goes idle within a few steps instead of decoding the
hundreds of tokens left); chat completions."""
import argparse
import http.client
import json
import re
import os
import socket
import sys
import threading
import time

import grpc
import openai

import cluster as cl

API_KEY = "test-key-openai-3c9e"
# Small, so a long request is easy to queue behind: the replica runs 4 and
# queues max(2, 4 / 2) = 2 of its own; the coordinator queues none.
MAX_SEQUENCES = 4
MAX_REQUEST_BYTES = 1 << 20


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def raw_request(port, method, path, body=None, headers=None, timeout=60):
    """(status, headers, body bytes) of one HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        all_headers = {"Authorization": "Bearer " + API_KEY}
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def sse_events(data):
    """The `data:` payloads of a server-sent event stream, in order."""
    events = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            expect(block.startswith("data: "), "not an SSE data event: %r" % block[:200])
            events.append(block[len("data: "):])
    return events


def token_ids_of(logprobs_tokens):
    out = []
    for name in logprobs_tokens:
        expect(name.startswith("token_id:"), "logprobs token %r" % name)
        out.append(int(name[len("token_id:"):]))
    return out


def grpc_generate(stubs, pb, metadata, prompt, max_tokens, stop=()):
    request = pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, stop=list(stop)))
    tokens, text, finished = [], "", None
    for message in stubs["Generation"].Generate(request, metadata=metadata, timeout=60):
        if message.HasField("delta"):
            tokens.extend(message.delta.token_ids)
            text += message.delta.text
        elif message.HasField("finished"):
            finished = message.finished
            text += finished.text
    return tokens, text, finished


def check_completions(client, stubs, pb, metadata, model_id, prompts, reference, max_tokens):
    for prompt, want in zip(prompts, reference):
        _, grpc_text, finished = grpc_generate(stubs, pb, metadata, prompt, max_tokens)
        prompt_tokens = len(stubs["Generation"].Tokenize(pb.TokenizeRequest(text=prompt), metadata=metadata,
                                                         timeout=10).token_ids)
        result = client.completions.create(model=model_id, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, logprobs=0,
                                           extra_body={"an_unknown_field": "ignored"})
        choice = result.choices[0]
        expect(result.object == "text_completion" and result.id.startswith("cmpl-") and
               result.model == model_id, "completion object: %s" % result)
        got = token_ids_of(choice.logprobs.tokens)
        expect(got == want, "completion tokens differ from the offline greedy result:\n http    %s\n"
               " offline %s" % (got, want))
        expect(choice.text == grpc_text, "completion text %r, gRPC text %r" % (choice.text, grpc_text))
        expect(len(choice.logprobs.token_logprobs) == len(want) and
               all(lp <= 0 for lp in choice.logprobs.token_logprobs), "token logprobs %s" % choice.logprobs)
        want_reason = "length" if len(want) == max_tokens else "stop"
        expect(choice.finish_reason == want_reason, "finish_reason %s, wanted %s (%d tokens)" %
               (choice.finish_reason, want_reason, len(want)))
        expect(result.usage.prompt_tokens == prompt_tokens == finished.usage.prompt_tokens and
               result.usage.completion_tokens == len(want) and
               result.usage.total_tokens == prompt_tokens + len(want), "usage %s" % result.usage)

        # The same request streamed: deltas, never cumulative.
        chunks = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=max_tokens,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        expect(chunks[-1].choices == [] and chunks[-1].usage is not None, "last chunk: %s" % chunks[-1])
        expect(chunks[-1].usage.model_dump() == result.usage.model_dump(),
               "streamed usage %s, plain %s" % (chunks[-1].usage, result.usage))
        texts = [c.choices[0].text for c in chunks[:-1]]
        reasons = [c.choices[0].finish_reason for c in chunks[:-1]]
        expect("".join(texts) == grpc_text, "streamed text %r, wanted %r" % ("".join(texts), grpc_text))
        expect(reasons[-1] == want_reason and all(r is None for r in reasons[:-1]),
               "streamed finish reasons %s" % reasons)
        expect(len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks),
               "chunk ids/objects differ")
    print("%d completions, plain and streamed, equal the offline greedy tokens and the gRPC text" % len(prompts))

    # A stop string taken from the middle of the reference text.
    prompt, text = prompts[0], client.completions.create(model=model_id, prompt=prompts[0], max_tokens=max_tokens,
                                                         temperature=0).choices[0].text
    words = text.split()
    expect(len(words) >= 4, "reference text too short for a stop string: %r" % text)
    stop = " " + words[len(words) // 2]
    cut = text[: text.index(stop)]
    result = client.completions.create(model=model_id, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stop=[stop, "never-seen-stop"])
    expect(result.choices[0].finish_reason == "stop" and result.choices[0].text == cut,
           "with stop %r: %r (%s), wanted %r" % (stop, result.choices[0].text, result.choices[0].finish_reason, cut))
    streamed = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=max_tokens,
                                              temperature=0, stop=stop, stream=True))
    expect("".join(c.choices[0].text for c in streamed if c.choices) == cut and
           [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop", "streamed with stop")
    print("stop string %r: finish_reason stop, text cut before it (plain and streamed)" % stop)

    # The prompt as token ids (as Tokenize gives them, BOS included).
    ids = list(stubs["Generation"].Tokenize(pb.TokenizeRequest(text=prompts[1]), metadata=metadata,
                                            timeout=10).token_ids)
    by_ids = client.completions.create(model=model_id, prompt=ids, max_tokens=max_tokens, temperature=0,
                                       logprobs=0)
    expect(token_ids_of(by_ids.choices[0].logprobs.tokens) == reference[1] and
           by_ids.usage.prompt_tokens == len(ids), "prompt as token ids: %s" % by_ids)
    print("a prompt given as %d token ids gives the same tokens" % len(ids))


def check_raw_stream(port, model_id, prompt):
    """The wire format: data events, usage in the last one before [DONE]."""
    status, headers, body = raw_request(port, "POST", "/v1/completions",
                                        {"model": model_id, "prompt": prompt, "max_tokens": 8,
                                         "temperature": 0, "stream": True})
    expect(status == 200 and headers.get("Content-Type", "").startswith("text/event-stream"),
           "stream: %s %s" % (status, headers))
    events = sse_events(body)
    expect(events[-1] == "[DONE]", "the stream does not end with [DONE]: %s" % events[-3:])
    last = json.loads(events[-2])
    expect(last["choices"] == [] and last["usage"]["completion_tokens"] > 0, "last event: %s" % last)
    print("raw stream: %d events, usage in the last before [DONE]" % len(events))


def rejected_by_reason(port):
    """xq:request_rejected_total from the coordinator's /metrics, summed by reason."""
    status, _, body = raw_request(port, "GET", "/metrics")
    expect(status == 200, "/metrics: %s" % status)
    counts = {}
    for line in body.decode().splitlines():
        match = re.match(r'xq:request_rejected_total\{(.*)\} (\S+)$', line)
        if match:
            reason = re.search(r'reason="([^"]*)"', match.group(1)).group(1)
            counts[reason] = counts.get(reason, 0) + float(match.group(2))
    return counts


def check_errors(client, bad_key_client, port, model_id, prompt):
    rejected_before = rejected_by_reason(port)
    cases = [
        ("wrong API key", bad_key_client, {}, openai.AuthenticationError, 401),
        ("temperature -1", client, {"temperature": -1}, openai.BadRequestError, 400),
        ("n = 2", client, {"n": 2}, openai.BadRequestError, 400),
        ("echo", client, {"echo": True}, openai.BadRequestError, 400),
        ("max_tokens 0", client, {"max_tokens": 0}, openai.BadRequestError, 400),
        ("a batch of prompts", client, {"prompt": [prompt, prompt]}, openai.BadRequestError, 400),
        ("another model", client, {"model": "gpt-nothing"}, openai.NotFoundError, 404),
    ]
    for name, c, change, error_class, status in cases:
        args = {"model": model_id, "prompt": prompt, "max_tokens": 4}
        args.update(change)
        for stream in (False, True):
            try:
                result = c.completions.create(stream=stream, **args)
                if stream:
                    list(result)
                raise AssertionError("%s (stream %s): accepted" % (name, stream))
            except error_class as e:
                expect(e.status_code == status and e.body and e.body.get("message"),
                       "%s: status %s body %s" % (name, e.status_code, e.body))
                message = e.body["message"]
        print("  %-20s -> %d %s: %s" % (name, status, error_class.__name__, message[:80]))
    status, _, body = raw_request(port, "POST", "/v1/completions", b'{"prompt": "Once", "max_tokens": ',
                                  {"Content-Type": "application/json"})
    error = json.loads(body)["error"]
    expect(status == 400 and error["type"] == "invalid_request_error" and "param" in error and "code" in error,
           "malformed JSON: %s %s" % (status, body))
    big = json.dumps({"model": model_id, "prompt": "a" * (MAX_REQUEST_BYTES + 10), "max_tokens": 1})
    status, _, body = raw_request(port, "POST", "/v1/completions", big, {"Content-Type": "application/json"})
    expect(status == 413 and "error" in json.loads(body), "oversized body: %s %s" % (status, body[:200]))
    status, _, body = raw_request(port, "GET", "/v1/nothing-here")
    expect(status == 404 and "error" in json.loads(body), "unknown path: %s %s" % (status, body))
    print("malformed JSON 400, a body over --max-request-bytes 413, an unknown path 404: OpenAI error bodies")
    # Each refused generation request counted once, whether the front or the
    # coordinator refused it: 5 cases x 2 + the malformed JSON are invalid
    # arguments, the other model twice not found, the big body once too large
    # (the wrong key may be refused by the model lookup, which is no
    # generation request, so it is not checked here).
    rejected = rejected_by_reason(port)
    grown = {reason: rejected.get(reason, 0) - rejected_before.get(reason, 0)
             for reason in ("invalid_argument", "not_found", "request_too_large")}
    expect(grown == {"invalid_argument": 11, "not_found": 2, "request_too_large": 1},
           "xq:request_rejected_total grew by %s" % grown)
    print("xq:request_rejected_total counts each refusal once: %s" % grown)


def replica_idle_steps(control, pb, metadata, timeout=30):
    """The replica's step count once it runs and queues nothing."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        load = control.GetLoad(pb.GetLoadRequest(), metadata=metadata, timeout=5)
        if load.running_requests == 0 and load.queued_requests == 0:
            return load
        time.sleep(0.005)
    raise AssertionError("the replica did not go idle within %d s" % timeout)


def wait_running(control, pb, metadata, count, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        load = control.GetLoad(pb.GetLoadRequest(), metadata=metadata, timeout=5)
        if load.running_requests >= count:
            return load
        time.sleep(0.005)
    raise AssertionError("%d requests never ran" % count)


def used_bytes(load):
    return sum(r.cache_bytes_used for r in load.ranks)


def check_disconnect(port, control, pb, metadata, model_id, prompt, max_tokens):
    """A client that goes away mid-request: the replica stops the request
    within a few steps, where running it out would take hundreds."""
    baseline = replica_idle_steps(control, pb, metadata)
    for stream in (True, False):
        body = json.dumps({"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " +
                     API_KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: " +
                     str(len(body)).encode() + b"\r\n\r\n" + body)
        if stream:
            received = b""
            while b"data: " not in received:
                chunk = sock.recv(4096)
                expect(chunk, "the stream closed before its first event")
                received += chunk
        running = wait_running(control, pb, metadata, 1)
        sock.close()
        closed_at = time.time()
        idle = replica_idle_steps(control, pb, metadata)
        steps = idle.steps - running.steps
        # Left to run, the request would take about max_tokens steps (one
        # token a step when it runs alone); 50 allows for the poll interval
        # and the replica's canary.
        expect(steps < 50, "%s: the replica ran %d steps after the client left (max_tokens %d)" %
               ("streamed" if stream else "plain", steps, max_tokens))
        expect(used_bytes(idle) == used_bytes(baseline), "cache bytes %d, baseline %d" %
               (used_bytes(idle), used_bytes(baseline)))
        print("client gone (%s): the replica idle %d steps later (%.2f s), cache back to its baseline" %
              ("streamed" if stream else "plain", steps, time.time() - closed_at))


def check_rate_limit(client, registry, pb, metadata, port, model_id, prompt):
    """The replica full (4 running, 2 in its queue) and the coordinator's
    queue 0: the next request is refused with 429 and Retry-After. A try in
    which a long request ended before the probe proves nothing and is run
    again (at most 3 tries)."""
    for attempt in range(3):
        outcome = rate_limit_try(client, registry, pb, metadata, model_id, prompt)
        if outcome is not None:
            break
        print("  (a long request ended before the probe; again)")
    expect(outcome is not None, "the replica could not be kept full for the probe in 3 tries")
    status, headers, body = raw_request(port, "POST", "/v1/completions",
                                        {"model": model_id, "prompt": prompt, "max_tokens": 2})
    expect(status == 200, "after the load: %s %s" % (status, body))
    print("full replica, queue 0: 429 RateLimitError with Retry-After %s s" % outcome)


def rate_limit_try(client, registry, pb, metadata, model_id, prompt):
    results = []

    def long_stream():
        # Refused while the coordinator's view of the replica still holds
        # the requests just routed (until its next poll): sent again.
        deadline = time.time() + 30
        while True:
            try:
                list(client.completions.create(model=model_id, prompt=prompt, max_tokens=450, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}))
                results.append(("done", time.time()))
                return
            except openai.RateLimitError as e:
                if time.time() > deadline:
                    results.append(("error", time.time(), e))
                    return
                time.sleep(0.02)
            except openai.APIError as e:
                results.append(("error", time.time(), e))
                return

    # One at a time, each routed (the coordinator's count of requests in
    # flight on the replica; the replica's own load would also count its
    # canary) before the next is sent.
    threads = []
    for i in range(MAX_SEQUENCES + 2):
        t = threading.Thread(target=long_stream, daemon=True)
        t.start()
        threads.append(t)
        deadline = time.time() + 30
        while registry.ListReplicas(pb.ListReplicasRequest(), metadata=metadata,
                                    timeout=5).replicas[0].in_flight < i + 1:
            expect(time.time() < deadline and not any(r[0] == "error" for r in results),
                   "long stream %d did not start: %s" % (i, results))
            time.sleep(0.002)
    retry_after = None
    try:
        client.completions.create(model=model_id, prompt=prompt, max_tokens=4)
        accepted = True
    except openai.RateLimitError as e:
        accepted = False
        retry_after = e.response.headers.get("retry-after")
        expect(e.status_code == 429 and retry_after is not None and int(retry_after) >= 0,
               "429 without Retry-After: %s" % e.response.headers)
    ended_before = len(results)
    for t in threads:
        t.join(120)
    expect(len(results) == MAX_SEQUENCES + 2 and all(r[0] == "done" for r in results),
           "a long stream failed: %s" % [r for r in results if r[0] != "done"][:1])
    if accepted:
        expect(ended_before > 0, "a request was accepted while the replica and the queue were full")
        return None
    return retry_after


def check_chat_refused(client, model_id):
    try:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        raise AssertionError("chat accepted for a model without a chat template")
    except openai.BadRequestError as e:
        expect("chat template" in e.body["message"], "chat refusal: %s" % e.body)
        message = e.body["message"]
    print("chat on a model without a chat template: 400 (%s)" % message[:80])


def check_chat(client, stubs, pb, metadata, model_id, info):
    """Chat prompts equal the model's Jinja template rendered by jinja2: a
    chat answer equals what gRPC Generate gives for the rendered prompt
    (its markers parsed as control tokens) with the template's stop."""
    import jinja2
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    template = jinja2.Environment(loader=jinja2.BaseLoader()).from_string(info.chat_template)
    rendered = template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")

    def reference(max_tokens):
        request = pb.GenerateRequest(text=rendered, parse_special=True,
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, stop=["<|im_end|>"]))
        text, finished = "", None
        for message in stubs["Generation"].Generate(request, metadata=metadata, timeout=120):
            if message.HasField("delta"):
                text += message.delta.text
            elif message.HasField("finished"):
                finished = message.finished
                text += finished.text
        return text, finished

    max_tokens = 12
    want, finished = reference(max_tokens)
    chat = client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                          temperature=0)
    expect(chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and
           chat.choices[0].message.role == "assistant", "chat object: %s" % chat)
    expect(chat.choices[0].message.content == want,
           "chat %r, Generate of the jinja2 prompt %r" % (chat.choices[0].message.content, want))
    expect(chat.usage.prompt_tokens == finished.usage.prompt_tokens and
           chat.usage.completion_tokens == finished.usage.completion_tokens, "chat usage %s" % chat.usage)
    chunks = list(client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                                 temperature=0, stream=True))
    expect(chunks[0].choices[0].delta.role == "assistant", "first chunk %s" % chunks[0])
    expect(all(c.object == "chat.completion.chunk" for c in chunks), "chunk objects")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expect(text == want, "streamed chat %r, wanted %r" % (text, want))
    expect(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens,
           "streamed chat usage %s" % chunks[-1])
    # No max_tokens: what the context leaves; the answer ends on its own.
    long_want, long_finished = reference(64)
    free = client.chat.completions.create(model=model_id, messages=messages, temperature=0)
    content = free.choices[0].message.content
    if long_finished.reason == pb.FINISH_REASON_LENGTH:
        expect(content.startswith(long_want), "chat without max_tokens %r, wanted it to start %r" %
               (content, long_want))
    else:
        expect(content == long_want and free.choices[0].finish_reason == "stop",
               "chat without max_tokens %r (%s), wanted %r" % (content, free.choices[0].finish_reason, long_want))
    print("chat (%s), plain, streamed and without max_tokens, equals Generate of the jinja2-rendered "
          "prompt: %r" % (model_id, chat.choices[0].message.content))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--shared", required=True)
    parser.add_argument("--chat-model", default="", help="a GGUF with a chat template (chat checks)")
    args = parser.parse_args()
    model = os.path.join(args.shared, "models", "stories260K.bin")
    tokenizer = os.path.join(args.shared, "models", "tok512.bin")
    if not os.path.exists(model):
        print("SKIP: %s is absent" % model)
        return 0
    pb, pb_grpc = cl.load_stubs(os.path.join(args.build, "proto", "python"))
    started = time.time()
    with open(os.path.join(args.shared, "data", "tinystories-valid.txt"), encoding="utf-8") as f:
        lines = [l.strip() for l in f if len(l.strip()) > 40]
    prompts = [" ".join(l.split()[:6 + 3 * i]) for i, l in enumerate(lines[:3])]
    max_tokens = 24
    worker_args = ["--max-sequences", str(MAX_SEQUENCES)]
    reference = cl.offline_greedy(args.build, model, tokenizer, 2, prompts, max_tokens, worker_args)
    http_port = cl.free_port()
    c = cl.Cluster(args.build, args.source, model, tokenizer, replicas=1, tp=2, api_key=API_KEY,
                   worker_args=worker_args,
                   coordinator_args=["--http-listen", "127.0.0.1:%d" % http_port, "--max-queued-requests", "0",
                                     "--poll-ms", "20",
                                     "--max-request-bytes", str(MAX_REQUEST_BYTES)])
    print("logs in", c.log_dir)
    try:
        # /health answers as soon as the coordinator runs; /ready only once
        # a replica is ready (this replica needs seconds to start).
        deadline = time.time() + 30
        while True:
            try:
                status, _, _ = raw_request(http_port, "GET", "/health", headers={"Authorization": ""}, timeout=2)
                break
            except OSError:
                expect(time.time() < deadline, "no /health answer")
                time.sleep(0.02)
        ready_status, _, ready_body = raw_request(http_port, "GET", "/ready", headers={"Authorization": ""})
        expect(status == 200 and ready_status == 503, "/health %s, /ready %s %s before any replica" %
               (status, ready_status, ready_body))
        channel = grpc.insecure_channel(c.address)
        stubs = {"Generation": pb_grpc.GenerationStub(channel), "Registry": pb_grpc.RegistryStub(channel)}
        c.wait_ready(lambda name: stubs[name], replicas_up=1)
        status, _, _ = raw_request(http_port, "GET", "/ready", headers={"Authorization": ""})
        expect(status == 200, "/ready %s with a replica ready" % status)
        print("/health 200 at once; /ready 503 before the replica, 200 after")

        metadata = c.metadata()
        info = stubs["Generation"].GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10)
        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % http_port, api_key=API_KEY, max_retries=0,
                               timeout=120)
        bad_key_client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % http_port, api_key="wrong",
                                       max_retries=0, timeout=60)
        models = client.models.list().data
        expect(len(models) == 1 and models[0].id == info.name and models[0].owned_by == "xquant" and
               models[0].object == "model", "models: %s" % models)
        print("models.list(): %s" % models[0].id)
        model_id = models[0].id

        check_completions(client, stubs, pb, metadata, model_id, prompts, reference, max_tokens)
        check_raw_stream(http_port, model_id, prompts[2])
        check_errors(client, bad_key_client, http_port, model_id, prompts[0])
        check_chat_refused(client, model_id)
        control = pb_grpc.ControlStub(grpc.insecure_channel("127.0.0.1:%d" % c.replicas[0].port))
        check_disconnect(http_port, control, pb, metadata, model_id, prompts[0], 450)
        check_rate_limit(client, stubs["Registry"], pb, metadata, http_port, model_id, prompts[0])
    except Exception:
        for name in ["coordinator"] + [r.name for r in c.replicas]:
            sys.stderr.write("---- %s log (tail) ----\n%s\n" % (name, c.log_tail(name)))
        raise
    finally:
        c.stop()

    if args.chat_model:
        if not os.path.exists(args.chat_model):
            print("chat checks left out: %s is absent" % args.chat_model)
        else:
            run_chat(args, pb, pb_grpc)
    print("PASS (%.1f s)" % (time.time() - started))
    return 0


def run_chat(args, pb, pb_grpc):
    http_port = cl.free_port()
    c = cl.Cluster(args.build, args.source, args.chat_model, "", replicas=1, tp=2, api_key=API_KEY,
                   coordinator_args=["--http-listen", "127.0.0.1:%d" % http_port])
    try:
        channel = grpc.insecure_channel(c.address)
        stubs = {"Generation": pb_grpc.GenerationStub(channel), "Registry": pb_grpc.RegistryStub(channel)}
        c.wait_ready(lambda name: stubs[name], replicas_up=1, timeout=300)
        info = stubs["Generation"].GetModelInfo(pb.GetModelInfoRequest(), metadata=c.metadata(), timeout=10)
        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % http_port, api_key=API_KEY, max_retries=0,
                               timeout=300)
        check_chat(client, stubs, pb, c.metadata(), client.models.list().data[0].id, info)
    except Exception:
        for name in ["coordinator"] + [r.name for r in c.replicas]:
            sys.stderr.write("---- %s log (tail) ----\n%s\n" % (name, c.log_tail(name)))
        raise
    finally:
        c.stop()


if __name__ == "__main__":
    sys.exit(main())
