"""Makes the calls tests/it/sse_shapes.rs asks for with the official `openai`
SDK, and prints what the SDK made of each, as one JSON document on stdout.

The Rust test does the asserting: this script only reports. Environment:
RELAYGATE_BASE_URL, RELAYGATE_API_KEY, RELAYGATE_MESSAGES (the chat messages,
JSON) and RELAYGATE_CALLS (JSON list of {"model", "stream", "include_usage"}).
"""

import json
import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ["RELAYGATE_BASE_URL"],
    api_key=os.environ["RELAYGATE_API_KEY"],
    max_retries=0,
    timeout=10,
)
messages = json.loads(os.environ["RELAYGATE_MESSAGES"])


def usage(u):
    return None if u is None else {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens}


def stream(model, include_usage):
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    s = client.chat.completions.create(model=model, messages=messages, stream=True, **extra)
    chunks = list(s)
    return {
        "request_id": s.response.headers.get("x-request-id"),
        "text": "".join((c.choices[0].delta.content or "") for c in chunks if c.choices),
        "chunks": len(chunks),
        # Chunks without choices: the usage-only chunk, if it came through.
        "choiceless": [i for i, c in enumerate(chunks) if not c.choices],
        "with_usage": [i for i, c in enumerate(chunks) if c.usage is not None],
        "last_usage": usage(chunks[-1].usage) if chunks else None,
    }


def plain(model):
    r = client.chat.completions.create(model=model, messages=messages)
    return {
        "request_id": r._request_id,
        "text": r.choices[0].message.content,
        "last_usage": usage(r.usage),
    }


results = []
for call in json.loads(os.environ["RELAYGATE_CALLS"]):
    if call["stream"]:
        results.append(stream(call["model"], call["include_usage"]))
    else:
        results.append(plain(call["model"]))
print(json.dumps(results))
