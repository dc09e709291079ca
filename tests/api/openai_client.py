"""`tptt serve` driven by the official OpenAI Python client (issue 15), as tests/api/run starts it:
list models, a chat completion and the same streamed (identical text under greedy decoding), a
second turn that resumes the first's state (cached tokens), concurrent requests, a client that
closes its stream mid-answer (the server cancels and serves on), a plain completion, and the
errors a client sees for a wrong key, an unknown model and an unsupported request."""

import os
import sys
import threading

import openai
from openai import OpenAI

BASE_URL = os.environ["TPTT_API_URL"]
KEY = os.environ["TPTT_API_KEY"]
MODEL = os.environ["TPTT_API_MODEL"]

client = OpenAI(base_url=BASE_URL, api_key=KEY, timeout=120.0, max_retries=0)
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


ids = [m.id for m in client.models.list().data]
check(MODEL in ids, f"models.list() names {MODEL}: {ids}")

first = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
]
answer = client.chat.completions.create(model=MODEL, messages=first, temperature=0, max_tokens=12)
text = answer.choices[0].message.content
check(isinstance(text, str) and answer.choices[0].finish_reason in ("stop", "length"),
      f"a chat completion: {text!r} ({answer.choices[0].finish_reason})")
prompt_tokens = answer.usage.prompt_tokens
check(prompt_tokens > 0 and answer.usage.completion_tokens > 0, f"usage: {answer.usage}")

chunks = list(client.chat.completions.create(
    model=MODEL, messages=first, temperature=0, max_tokens=12, stream=True,
    stream_options={"include_usage": True}))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(streamed == text, f"the streamed answer equals the whole one: {streamed!r}")
check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens,
      f"the last chunk carries the usage: {chunks[-1].usage}")

second = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
answer2 = client.chat.completions.create(model=MODEL, messages=second, temperature=0, max_tokens=8)
cached = answer2.usage.prompt_tokens_details.cached_tokens
check(cached >= prompt_tokens, f"the second turn resumed the first's state: cached {cached} >= {prompt_tokens}")

results = []


def one(i):
    try:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Request {i}"}], temperature=0, max_tokens=6)
        results.append(r.choices[0].message.content is not None)
    except Exception as e:  # noqa: BLE001 - reported as a failure below
        results.append(repr(e))


threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
check(results == [True, True, True], f"three concurrent requests all answered: {results}")

stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Tell me everything"}], temperature=0,
    max_tokens=1_000_000, stream=True)
for n, _ in enumerate(stream):
    if n == 2:
        break
stream.close()
after = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4)
check(after.choices[0].message.content is not None,
      "after a client closed its stream mid-answer, the server answers the next request")

done = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=5)
check(isinstance(done.choices[0].text, str), f"a plain completion: {done.choices[0].text!r}")


def refused(kind, call, what):
    try:
        call()
        check(False, f"{what}: accepted")
    except kind as e:
        check(True, f"{what}: {type(e).__name__} ({e.status_code})")
    except Exception as e:  # noqa: BLE001
        check(False, f"{what}: {e!r}")


refused(openai.AuthenticationError,
        lambda: OpenAI(base_url=BASE_URL, api_key="wrong", max_retries=0).models.list(), "a wrong key")
refused(openai.NotFoundError,
        lambda: client.chat.completions.create(model="gpt-4o", messages=first), "an unknown model")
refused(openai.BadRequestError,
        lambda: client.chat.completions.create(model=MODEL, messages=first, n=2), "n = 2")
refused(openai.BadRequestError,
        lambda: client.chat.completions.create(model=MODEL, messages=[]), "empty messages")

if failures:
    print(f"{len(failures)} check(s) failed", file=sys.stderr)
    sys.exit(1)
print("all checks passed")
