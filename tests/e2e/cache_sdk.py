"""The response cache as the official `openai` Python SDK sees it.

Run by tests/it/cache.rs against a gateway whose `deepseek-chat` caches, in
front of a simulated upstream that sends reasoning and tool-call deltas.
Exits non-zero on the first failed check.
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ["RELAYGATE_BASE_URL"],
    api_key=os.environ["RELAYGATE_API_KEY"],
    max_retries=0,
    timeout=10,
)
messages = [{"role": "user", "content": "What is the weather in Paris?"}]


def plain():
    raw = client.chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=messages, temperature=0
    )
    return raw.headers.get("x-relaygate-cache"), raw.parse()


(first_state, first), (second_state, second) = plain(), plain()
assert (first_state, second_state) == ("miss", "hit"), (first_state, second_state)
assert second.model_dump() == first.model_dump(), "a hit is the same completion"
message = second.choices[0].message
assert message.tool_calls[0].function.arguments == '{"city":"Paris"}', message
assert (message.model_extra or {}).get("reasoning_content"), message
print("plain: ok", first.id)


def streamed(**extra):
    raw = client.chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=messages, temperature=0, stream=True, **extra
    )
    state = raw.headers.get("x-relaygate-cache")
    events = []
    usage = None
    for chunk in raw.parse():
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            calls = [(c.index, c.id, c.function.name, c.function.arguments) for c in (d.tool_calls or [])]
            events.append(
                (d.content, (d.model_extra or {}).get("reasoning_content"), calls, choice.finish_reason)
            )
    return state, events, usage


s1, e1, u1 = streamed()
s2, e2, u2 = streamed()
s3, e3, u3 = streamed(stream_options={"include_usage": True})
assert (s1, s2, s3) == ("miss", "hit", "hit"), (s1, s2, s3)
assert e1 == e2 == e3, "every event, with its own deltas"
assert sum(1 for e in e1 if e[1]) == 2, "two reasoning deltas"
assert sum(1 for e in e1 if e[2]) == 2, "the tool call in two deltas"
assert e1[-1][3] == "tool_calls", e1[-1]
assert u1 is None and u2 is None, "usage only for the client that asked"
assert u3 is not None and u3.completion_tokens > 0, u3
print("stream: ok", len(e1), "events")
print("ALL OK")
