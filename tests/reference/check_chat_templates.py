#!/usr/bin/python3
"""Chat templates (runtime/chat_template) against Jinja itself: each family's
canonical template text, rendered with Debian's python3-jinja2 the way
Hugging Face's apply_chat_template renders it (a sandbox with trim_blocks and
lstrip_blocks, raise_exception), must give exactly the text that
`xq chat-template --jinja FILE` prints for the same conversation, and where
the template raises an exception xq must fail with one error line. The
templates: SmolLM2-135M-Instruct's, read from its GGUF file with the small
reader below, and the canonical ones of the other families written out here.

The templates write BOS (`bos_token`) at the start; the tokenizer adds that
BOS itself, so xq leaves it out: the reference removes exactly one leading
BOS, and checks that the template wrote it there.

    check_chat_templates.py XQ MODEL.gguf
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML as OpenHermes-2.5 has it: no default system prompt; escapes in its
# literals ("\n"), where SmolLM2's carries raw newlines.
CHATML_PLAIN = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Qwen2's: a default system prompt written with escapes.
CHATML_QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Meta-Llama-3-8B-Instruct.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

# Llama-2-7b-chat-hf.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

# zephyr-7b-beta: one tag a line (trim_blocks removes those newlines).
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# gemma-7b-it.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")

# Not of a known family: xq must refuse them rather than guess.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n<|assistant|>\\n'}}"
    "{% else %}{{message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}")

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello"}],
    "system+user": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [SYSTEM, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke.\n"}],
    "multi-turn no system": [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": " Hi there. "},
                             {"role": "user", "content": "Bye"}],
    "ends with assistant": [{"role": "user", "content": "Ping"},
                            {"role": "assistant", "content": "Pong"}],
    # Python's str.strip() (Jinja's trim) removes Unicode spaces too.
    "unicode": [{"role": "system", "content": "\u00a0Réponds en français.\u3000"},
                {"role": "user", "content": "  Grüße, 世界! 🌍 {{ not jinja }} 'q\" \\n\u2003\n"}],
    "system in the middle": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "system", "content": "c"}, {"role": "user", "content": "d"}],
    "starts with assistant": [{"role": "assistant", "content": "Hi"},
                              {"role": "user", "content": "Hello"}],
}

# (name, Jinja text, BOS the template writes, EOS, family, stop strings)
TEMPLATES = [
    ("chatml (plain)", CHATML_PLAIN, "", "<|im_end|>", "chatml", ["<|im_end|>"]),
    ("chatml (Qwen2)", CHATML_QWEN2, "", "<|im_end|>", "chatml", ["<|im_end|>"]),
    ("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "llama3", ["<|eot_id|>"]),
    ("llama2", LLAMA2, "<s>", "</s>", "llama2", ["</s>"]),
    ("zephyr", ZEPHYR, "", "</s>", "zephyr", ["</s>"]),
    ("gemma", GEMMA, "<bos>", "<eos>", "gemma", ["<end_of_turn>"]),
]
# Families whose canonical template has no default system prompt, so that
# `--chat-template NAME` must render as the template itself does.
BY_NAME = {"chatml (plain)": "chatml", "llama3": "llama3", "llama2": "llama2",
           "zephyr": "zephyr", "gemma": "gemma"}


def gguf_string(path, wanted):
    """A string value from a GGUF file's metadata (GGUF v2/v3), or None."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        magic, version, _, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path}: not a GGUF v2/v3 file")

        def string():
            (length,) = struct.unpack("<Q", f.read(8))
            return f.read(length)

        def skip(kind):
            if kind == 8:
                string()
            elif kind == 9:
                item, count = struct.unpack("<IQ", f.read(12))
                if item in sizes:
                    f.seek(sizes[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                f.seek(sizes[kind], 1)

        for _ in range(n_kv):
            key = string().decode()
            (kind,) = struct.unpack("<I", f.read(4))
            if key == wanted and kind == 8:
                return string().decode()
            skip(kind)
    return None


def render(jinja_text, messages, add_generation_prompt, bos, eos):
    """The template's text without its leading BOS, or None where it raises."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(jinja_text).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos, eos_token=eos)
    except jinja2.exceptions.TemplateError:
        return None
    if bos:
        assert text.startswith(bos), f"the template does not start with BOS: {text!r}"
        text = text[len(bos):]
    return text


def run_xq(xq, args):
    r = subprocess.run([xq, "chat-template", "--json", *args], capture_output=True, text=True,
                       timeout=60)
    if r.returncode == 0:
        return json.loads(r.stdout), None
    assert r.returncode in (1, 2) and r.stderr.startswith("error: ") and \
        r.stderr.count("\n") == 1, f"xq failed badly ({r.returncode}): {r.stderr!r}"
    return None, r.stderr.strip()


def main():
    xq, model = sys.argv[1], sys.argv[2]
    templates = list(TEMPLATES)
    if os.path.exists(model):
        smollm2 = gguf_string(model, "tokenizer.chat_template")
        assert smollm2, f"{model}: no tokenizer.chat_template"
        templates.insert(0, ("chatml (SmolLM2)", smollm2, "", "<|im_end|>", "chatml",
                             ["<|im_end|>"]))
    else:
        print(f"{model} not fetched (run launch/setup.sh): SmolLM2's template is left out")
    failures, checked = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, text, bos, eos, family, stop in templates:
            path = os.path.join(tmp, "template.jinja")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            for conversation, messages in CONVERSATIONS.items():
                for add in (True, False):
                    expected = render(text, messages, add, bos, eos)
                    options = ["--messages", json.dumps(messages)] + \
                              ([] if add else ["--no-generation-prompt"])
                    sources = [["--jinja", path]]
                    if name in BY_NAME:
                        sources.append(["--chat-template", BY_NAME[name]])
                    for source in sources:
                        got, error = run_xq(xq, source + options)
                        checked += 1
                        case = f"{name} / {conversation} / add_generation_prompt={add} / {source[0]}"
                        if expected is None and got is not None:
                            failures.append(f"{case}: Jinja raises, xq printed {got['prompt']!r}")
                        elif expected is not None and got is None:
                            failures.append(f"{case}: Jinja gives {expected!r}, xq: {error}")
                        elif got is not None and (got["prompt"] != expected or
                                                  got["family"] != family or got["stop"] != stop):
                            failures.append(f"{case}:\n  jinja {expected!r}\n  xq    {got!r}")
        # Templates of no known family, and an empty one, are errors that
        # name the known families.
        for name, text in (("mistral", MISTRAL), ("phi-3", PHI3), ("empty", "")):
            path = os.path.join(tmp, "unknown.jinja")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            got, error = run_xq(xq, ["--jinja", path, "--prompt", "Hi"])
            checked += 1
            if got is not None or "chatml" not in error or "gemma" not in error:
                failures.append(f"{name}: expected an error naming the families, got {got or error}")
    for failure in failures:
        print("FAIL", failure)
    print(f"{checked - len(failures)} of {checked} checks agree with Jinja {jinja2.__version__}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
