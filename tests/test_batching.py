"""Continuous batching keeps each request's own answer."""
from __future__ import annotations

import asyncio

import httpx

from tests.conftest import TOY

CHAT = "/v1/chat/completions"
PROMPTS = ["Count from 1 to 5.", "Hello!", "What is 2 + 3?", "What is the capital of France?",
           "Count from 1 to 10.", "Good morning!", "What color is the sky?", "Say something."]


def _ask(client: httpx.Client, model: str, prompt: str, **extra) -> dict:
    r = client.post(CHAT, json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                "max_tokens": 40, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


async def _together(url: str, model: str, prompts: list[str], **extra) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(p: str) -> dict:
            r = await client.post(CHAT, json={"model": model, "messages": [{"role": "user", "content": p}],
                                              "max_tokens": 40, "temperature": 0, **extra})
            assert r.status_code == 200, r.text
            return r.json()
        return await asyncio.gather(*(one(p) for p in prompts))


def test_greedy_text_is_the_same_alone_and_in_a_batch_of_8(stack):
    for model in (stack.default_model.split("/")[-1], TOY):
        with stack.client() as client:
            alone = [_ask(client, model, p) for p in PROMPTS]
        batched = asyncio.run(_together(stack.url, model, PROMPTS))
        assert [b["text"] for b in batched] == [a["text"] for a in alone]
        assert [b["usage"] for b in batched] == [a["usage"] for a in alone]


def test_hidden_states_are_per_request_inside_a_batch(stack):
    with stack.client() as client:
        alone = [_ask(client, TOY, p, return_hidden_states=True, max_tokens=8) for p in PROMPTS[:4]]
    # Only some requests in the batch ask for hidden states; each gets its own.
    extras = [{"return_hidden_states": True, "max_tokens": 8}, {"max_tokens": 8}] * 2
    async def mixed():
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            async def one(p, extra):
                r = await client.post(CHAT, json={"model": TOY, "messages": [{"role": "user", "content": p}],
                                                  "temperature": 0, **extra})
                return r.json()
            return await asyncio.gather(*(one(p, e) for p, e in zip(PROMPTS[:4], extras)))
    batched = asyncio.run(mixed())
    for a, b, extra in zip(alone, batched, extras):
        if extra.get("return_hidden_states"):
            assert b["hidden_state"]["shape"] == a["hidden_state"]["shape"]
            diff = max(abs(x - y) for x, y in zip(a["hidden_state"]["final"], b["hidden_state"]["final"]))
            assert diff < 1e-3, diff
        else:
            assert "hidden_state" not in b
    assert alone[0]["hidden_state"]["final"] != alone[1]["hidden_state"]["final"]
