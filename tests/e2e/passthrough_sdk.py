"""The pass-through (`[passthrough]`) as the official `openai` Python SDK sees it.

Run by tests/it/passthrough.rs with RELAYGATE_BASE_URL and RELAYGATE_API_KEY,
and PASSTHROUGH=on or off:
- on: moderations, an upload of UPLOAD_BYTES random bytes whose answer (from
  the simulated upstream) is their SHA-256 and length, and the download of
  file DOWNLOAD_ID, printed as `DOWNLOAD <sha256> <length>` for the test to
  check against what the upstream sent;
- off: each of the same calls gets relaygate's OpenAI-shaped 404.
Exits non-zero on the first failed check.
"""

import hashlib
import os
import sys

import openai
from openai import OpenAI

client = OpenAI(
    base_url=os.environ["RELAYGATE_BASE_URL"],
    api_key=os.environ["RELAYGATE_API_KEY"],
    max_retries=0,
    timeout=30,
)
on = os.environ["PASSTHROUGH"] == "on"
upload = os.urandom(int(os.environ.get("UPLOAD_BYTES", "1024")))
download_id = os.environ.get("DOWNLOAD_ID", "file-abc")


def moderate():
    return client.moderations.create(model="omni-moderation-latest", input=["hello", "world"])


def transcribe():
    return client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", upload, "audio/wav"))


def download():
    digest, length = hashlib.sha256(), 0
    with client.files.with_streaming_response.content(download_id) as response:
        for chunk in response.iter_bytes():
            digest.update(chunk)
            length += len(chunk)
    return digest.hexdigest(), length


if on:
    m = moderate()
    assert m.id.startswith("modr-") and len(m.results) == 2, m
    assert m.results[0].flagged is False and m.results[0].categories.self_harm_intent is False, m
    print("moderations: ok")

    t = transcribe()
    assert t.text == f"{hashlib.sha256(upload).hexdigest()} {len(upload)}", (t.text, len(upload))
    print("transcription: ok", len(upload), "bytes")

    sha, length = download()
    print("DOWNLOAD", sha, length)
    print("download: ok")
else:
    for name, call in [("moderations", moderate), ("transcription", transcribe), ("download", download)]:
        try:
            call()
            sys.exit(f"{name}: expected a 404 with the pass-through off")
        except openai.NotFoundError as e:
            assert e.code == "unknown_url", (name, e.code, e.body)
        print(name, "404: ok")

print("ALL OK")
