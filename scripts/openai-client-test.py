#!/usr/bin/env python3
"""`edgefusion serve` driven by the official `openai` Python client (PyPI), end to end.

Run by scripts/test-serve-clients.sh, which makes the venv (openai, jsonschema), starts the
server on the default model with an API key and passes its address:

    python scripts/openai-client-test.py --base http://127.0.0.1:PORT --api-key KEY

Checks, each with the client's own types:
  - models.list names the served model; a wrong key raises AuthenticationError;
  - chat and text completions, whole and streamed: greedy (temperature 0) streamed text
    equals the whole text, usage counts add up, finish_reason is right;
  - stop sequences end the text before the stop string;
  - logprobs: chat `logprobs`/`top_logprobs`, completions' `logprobs`; tokens spell the text;
  - response_format json_schema on 20 prompts: every reply parses and validates against the
    schema (jsonschema), finish_reason "stop"; json_object replies parse as objects;
  - bad requests raise BadRequestError naming the field; /tokenize, /detokenize, /health and
    /metrics answer over plain HTTP.
Exits non-zero with the failed check's message.
"""

import argparse
import json
import math
import sys

import urllib.request

import jsonschema
import openai

COUNTRIES = [
    "France", "Japan", "Brazil", "Kenya", "Canada", "India", "Italy", "Mexico", "Egypt",
    "Norway", "Chile", "Vietnam", "Spain", "Ghana", "Peru", "Poland", "Turkey", "Greece",
    "Australia", "Morocco",
]

COUNTRY_SCHEMA = {
    "type": "object",
    "properties": {
        "country": {"type": "string", "minLength": 1, "maxLength": 40},
        "capital": {"type": "string", "minLength": 1, "maxLength": 40},
        "population_millions": {"type": "number"},
        "continent": {"enum": ["Africa", "Americas", "Asia", "Europe", "Oceania"]},
        "languages": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 30},
            "minItems": 1,
            "maxItems": 3,
        },
        "landlocked": {"type": "boolean"},
    },
    "required": ["country", "capital", "population_millions", "continent", "languages", "landlocked"],
    "additionalProperties": False,
}

checks = 0


def check(condition, message):
    global checks
    if not condition:
        sys.exit(f"openai-client-test: FAILED: {message}")
    checks += 1


def chat(client, content, **kw):
    return client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": content}], **kw)


def stream_text(stream, chat_kind=True):
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if chat_kind else choice.text
            text += piece or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="server address, e.g. http://127.0.0.1:8080")
    ap.add_argument("--api-key", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base + "/v1", api_key=args.api_key, max_retries=0,
                           timeout=300)

    # Models and authentication.
    models = client.models.list().data
    check(len(models) == 1 and models[0].id, f"models.list: {models}")
    model = models[0].id
    try:
        openai.OpenAI(base_url=args.base + "/v1", api_key="wrong", max_retries=0).models.list()
        check(False, "a wrong API key was accepted")
    except openai.AuthenticationError:
        check(True, "")

    # Chat, whole and streamed, greedy.
    prompt = "Name three colors of the rainbow."
    whole = chat(client, prompt, temperature=0, max_tokens=24)
    text = whole.choices[0].message.content
    check(whole.model == model or whole.model == "default", f"model echoed: {whole.model}")
    check(whole.choices[0].finish_reason in ("stop", "length"), whole.choices[0].finish_reason)
    check(whole.usage.completion_tokens <= 24 and whole.usage.prompt_tokens > 0, f"usage {whole.usage}")
    check(whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens,
          "usage total")
    streamed, finish, usage = stream_text(chat(client, prompt, temperature=0, max_tokens=24,
                                               stream=True, stream_options={"include_usage": True}))
    check(streamed == text, f"streamed chat {streamed!r} != whole {text!r}")
    check(finish == whole.choices[0].finish_reason, f"stream finish {finish}")
    check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens,
          f"stream usage {usage}")

    # Text completions, whole and streamed; max_tokens gives finish_reason "length".
    comp = client.completions.create(model=model, prompt="The capital of France is",
                                     temperature=0, max_tokens=8)
    check(comp.choices[0].finish_reason in ("stop", "length"), "completion finish")
    streamed, _, _ = stream_text(client.completions.create(
        model=model, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True),
        chat_kind=False)
    check(streamed == comp.choices[0].text, f"streamed completion {streamed!r} != {comp.choices[0].text!r}")
    long = client.completions.create(model=model, prompt="Once upon a time", temperature=0,
                                     max_tokens=5)
    check(long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 5,
          f"max_tokens 5: {long.choices[0].finish_reason}, {long.usage}")

    # Stop sequences: the text ends before the first stop string, which is not returned.
    free = chat(client, "Count from one to ten in words, separated by commas.", temperature=0,
                max_tokens=40).choices[0].message.content
    if "," in free:
        stopped = chat(client, "Count from one to ten in words, separated by commas.",
                       temperature=0, max_tokens=40, stop=[","])
        check(stopped.choices[0].message.content == free.split(",")[0],
              f"stop ',': {stopped.choices[0].message.content!r} vs {free!r}")
        check(stopped.choices[0].finish_reason == "stop", "stop finish_reason")

    # Seeded sampling repeats.
    a = chat(client, "Tell me a fun fact.", temperature=0.9, seed=42, max_tokens=16)
    b = chat(client, "Tell me a fun fact.", temperature=0.9, seed=42, max_tokens=16)
    check(a.choices[0].message.content == b.choices[0].message.content, "same seed, same text")

    # Logprobs.
    lp = chat(client, prompt, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    check(len(content) == lp.usage.completion_tokens, "one logprob entry per token")
    check("".join(c.token for c in content) == lp.choices[0].message.content,
          "chat logprob tokens spell the text")
    for c in content:
        check(c.logprob <= 0 and len(c.top_logprobs) == 3, f"entry {c}")
        check(math.isclose(c.top_logprobs[0].logprob, c.logprob, abs_tol=1e-4),
              "greedy token is the most likely")
    clp = client.completions.create(model=model, prompt="The sky is", temperature=0, max_tokens=6,
                                    logprobs=2)
    logprobs = clp.choices[0].logprobs
    check("".join(logprobs.tokens) == clp.choices[0].text, "completion tokens spell the text")
    check(len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs),
          "completion logprob lists")

    # JSON-schema output on 20 prompts.
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "country", "strict": True, "schema": COUNTRY_SCHEMA}}
    for country in COUNTRIES:
        reply = client.chat.completions.create(
            model=model, temperature=0.7, seed=7, max_tokens=300,
            messages=[{"role": "system", "content": "You answer in JSON."},
                      {"role": "user", "content": f"Give the facts about {country} as JSON."}],
            response_format=response_format)
        choice = reply.choices[0]
        check(choice.finish_reason == "stop", f"{country}: finish_reason {choice.finish_reason}: {choice.message.content!r}")
        try:
            value = json.loads(choice.message.content)
        except json.JSONDecodeError as e:
            check(False, f"{country}: reply is not JSON ({e}): {choice.message.content!r}")
        try:
            jsonschema.validate(value, COUNTRY_SCHEMA)
        except jsonschema.ValidationError as e:
            check(False, f"{country}: reply breaks the schema ({e.message}): {value}")
        check(True, "")
    print(f"20 JSON-schema replies valid; the last: {choice.message.content}")
    obj = chat(client, "Describe a cat as a JSON object.", temperature=0.7, seed=1, max_tokens=200,
               response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        check(isinstance(json.loads(obj.choices[0].message.content), dict), "json_object is an object")

    # Bad requests: BadRequestError naming the field.
    for kwargs, field in [
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=7), "temperature"),
        (dict(n=3), "n"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3}}}), "response_format"),
    ]:
        try:
            chat(client, "hi", **kwargs)
            check(False, f"{kwargs} accepted")
        except openai.BadRequestError as e:
            check(e.body.get("param") == field, f"{kwargs}: param {e.body}")

    # The endpoints outside the OpenAI API.
    def http(path, body=None):
        request = urllib.request.Request(
            args.base + path, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {args.api_key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()

    check(http("/health")[0] == 200, "/health")
    tokens = json.loads(http("/tokenize", {"content": "Hello world"})[1])["tokens"]
    check(len(tokens) > 0, "/tokenize")
    back = json.loads(http("/detokenize", {"tokens": tokens})[1])["content"]
    check(back.strip() == "Hello world", f"/detokenize: {back!r}")
    check("edgefusion_requests_total" in http("/metrics")[1], "/metrics")
    print(f"openai-client-test: all {checks} checks passed (openai {openai.__version__})")


if __name__ == "__main__":
    main()
