"""Drives relaygate with the official `openai` Python SDK.

Run by tests/it/openai_sdk.rs, which starts the gateway and a simulated upstream
and passes RELAYGATE_BASE_URL and RELAYGATE_API_KEY. Exits non-zero on the
first failed check.
"""

import os
import sys

import openai
from openai import OpenAI

base_url = os.environ["RELAYGATE_BASE_URL"]
api_key = os.environ["RELAYGATE_API_KEY"]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=10)
messages = [{"role": "user", "content": "Say hello"}]

# Plain create(): a typed ChatCompletion with usage.
r = client.chat.completions.create(model="deepseek-chat", messages=messages, temperature=0)
assert r.object == "chat.completion", r
assert r.choices[0].message.content.startswith("Hello"), r
assert r.usage is not None and r.usage.completion_tokens == 5, r.usage
print("create: ok", r.usage.prompt_tokens, r.usage.completion_tokens)

# create(stream=True): chunks arrive and the stream ends cleanly.
stream = client.chat.completions.create(model="deepseek-chat", messages=messages, stream=True)
text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
assert text == "Hello from the relaygate simulated", text
print("stream: ok", repr(text))

# Streaming with usage requested: the SDK sees the usage chunk.
stream = client.chat.completions.create(
    model="deepseek-chat", messages=messages, stream=True, stream_options={"include_usage": True}
)
chunks = list(stream)
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5, chunks[-1]
print("stream with usage: ok")

# Typed errors from relaygate's OpenAI-shaped error bodies.
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    sys.exit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e
print("not found: ok")

bad = OpenAI(base_url=base_url, api_key="sk-wrong-key-000", max_retries=0)
try:
    bad.chat.completions.create(model="deepseek-chat", messages=messages)
    sys.exit("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert e.code == "invalid_api_key", e
print("auth: ok")

# A stream that breaks mid-way raises in the SDK instead of ending cleanly.
broken = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=10)
try:
    got = []
    for c in broken.chat.completions.create(model="broken-stream", messages=messages, stream=True):
        if c.choices and c.choices[0].delta.content:
            got.append(c.choices[0].delta.content)
    sys.exit(f"expected an error after {got}")
except openai.APIError as e:
    assert "reset" in str(e).lower() or "upstream" in str(e).lower(), e
    assert len(got) == 3, got
print("broken stream: ok")

models = client.models.list()
assert [m.id for m in models.data] == ["deepseek-chat", "broken-stream"], models
print("models: ok")
print("ALL OK")
