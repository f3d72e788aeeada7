"""The Responses API as the official `openai` Python SDK sees it.

Run by tests/it/responses.rs, against the simulated upstream directly (the
sim speaks the API as the SDK expects) and through relaygate. Environment:
RELAYGATE_BASE_URL and RELAYGATE_API_KEY; RESPONSES_MODEL for the plain call,
the streams and `retrieve`; optionally RESPONSES_FAILOVER_MODEL (its first
target answers 503) and RESPONSES_BROKEN_MODEL (its stream breaks after
RESPONSES_BROKEN_AFTER deltas).

Prints `EVENT <json>` for each event of one `create(stream=True)`, as the SDK
parsed it, so the test can compare them with what the upstream sent, and
`USAGE <input> <output>` for each call's usage. Exits non-zero on the first
failed check.
"""

import json
import os
import sys

import openai
from openai import OpenAI

client = OpenAI(
    base_url=os.environ["RELAYGATE_BASE_URL"],
    api_key=os.environ["RELAYGATE_API_KEY"],
    max_retries=0,
    timeout=10,
)
model = os.environ["RESPONSES_MODEL"]
# The simulated upstream's answer of five words.
expected = "Hello from the relaygate simulated"


def usage(u):
    assert u is not None and u.input_tokens > 0 and u.output_tokens == 5, u
    assert u.total_tokens == u.input_tokens + u.output_tokens, u
    print("USAGE", u.input_tokens, u.output_tokens, flush=True)


def deltas(events):
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


# Plain create(): a typed Response whose output_text is the answer.
r = client.responses.create(model=model, input="Say hello")
assert r.object == "response" and r.status == "completed", r
assert r.output_text == expected, r.output_text
usage(r.usage)
print("create: ok", r.id)

# The stream helper builds a Response from the events, so they must fit
# together (items and parts added before their deltas).
with client.responses.stream(model=model, input=[{"role": "user", "content": "Say hello"}]) as stream:
    text = deltas(stream)
    final = stream.get_final_response()
assert text == expected and final.output_text == expected, (text, final.output_text)
usage(final.usage)
print("stream helper: ok")

# create(stream=True): typed events in order, ending with response.completed.
events = list(client.responses.create(model=model, input="Say hello", stream=True))
types = [e.type for e in events]
assert types[:4] == [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
], types
assert types[-1] == "response.completed", types
assert [e.sequence_number for e in events] == list(range(len(events))), "in order, none lost"
assert deltas(events) == expected, deltas(events)
for e in events:
    print("EVENT", json.dumps(e.to_dict(mode="json")), flush=True)
done = events[-1].response
assert done.status == "completed" and done.output_text == expected, done
usage(done.usage)
print("stream: ok", len(events), "events")

got = client.responses.retrieve(done.id)
assert got.id == done.id and got.status == "completed" and got.output_text == expected, got
print("retrieve: ok")

failover = os.environ.get("RESPONSES_FAILOVER_MODEL")
if failover:
    streamed = list(client.responses.create(model=failover, input="Say hello", stream=True))
    assert deltas(streamed) == expected and streamed[-1].type == "response.completed", streamed
    rid = streamed[-1].response.id
    # Stored only by the upstream that served it, not by the first target.
    assert client.responses.retrieve(rid).output_text == expected
    plain = client.responses.create(model=failover, input="Say hello")
    assert plain.output_text == expected, plain
    print("FAILOVER_ID", rid)
    print("failover: ok")

broken = os.environ.get("RESPONSES_BROKEN_MODEL")
if broken:
    got = []
    try:
        for e in client.responses.create(model=broken, input="Say hello", stream=True):
            if e.type == "response.output_text.delta":
                got.append(e.delta)
        sys.exit(f"expected an error after {got}")
    except openai.APIConnectionError as e:
        sys.exit(f"a transport error, not the stream's error event: {e!r}")
    except openai.APIError as e:
        assert e.code and e.message, (e.code, e.message)
        print("broken: ok", e.code, e.message)
    assert len(got) == int(os.environ["RESPONSES_BROKEN_AFTER"]), got

print("ALL OK")
