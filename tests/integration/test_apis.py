"""Every API llama-server speaks, through the router, with the real server and real clients.

The Anthropic SDK and the OpenAI SDK's Responses API talk to the router as
coding agents do; /tokenize, /detokenize, /completion, /infill and /v1/rerank
as editor plugins and RAG pipelines do. Models: the demo model as a chat
model, as a reranker (``--rerank``: its scores mean nothing, their order
through the router is what is checked), and a copy of it whose metadata names
fill-in-the-middle tokens (SmolLM2 has none; ``/infill`` needs them).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anthropic
import gguf
import openai
import pytest

from tests.device.shrink_gguf import shrink
from tests.integration.conftest import generating
from tests.integration.test_router_multi import KEY, Fleet, fleet, until, until_async

MODELS = """
[models.chat]
path = DEMO
ctx = 2048
parallel = 2
[models.other]
path = DEMO
ctx = 1024
[models.fim]
path = "FIM"
ctx = 2048
parallel = 1
queue = 8
order = "lifo"
[models.rank]
path = DEMO
ctx = 1024
args = ["--rerank"]
"""


@pytest.fixture(scope="module")
def fim_model(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with three of its special tokens named as fill-in-the-middle ones."""
    dest = tmp_path_factory.mktemp("fim") / "smollm2-fim.gguf"
    uint32 = gguf.GGUFValueType.UINT32
    shrink(
        demo_model,
        dest,
        extra={
            "tokenizer.ggml.fim_pre_token_id": (3, uint32),  # <repo_name>
            "tokenizer.ggml.fim_suf_token_id": (4, uint32),  # <reponame>
            "tokenizer.ggml.fim_mid_token_id": (5, uint32),  # <file_sep>
        },
    )
    return dest


@pytest.fixture
async def served(
    llama_server: Path, demo_model: Path, fim_model: Path, tmp_path: Path
) -> AsyncIterator[Fleet]:
    toml = MODELS.replace('"FIM"', json.dumps(str(fim_model)))
    async with fleet(toml, llama_server, demo_model, tmp_path) as f:
        yield f


def anthropic_client(f: Fleet) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f.base, api_key=KEY, max_retries=0, timeout=60)


async def post(f: Fleet, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http,
        http.post(f"{f.base}{path}", json=body, timeout=aiohttp.ClientTimeout(total=240)) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_anthropic_messages_plain_and_streamed(served: Fleet) -> None:
    client = anthropic_client(served)
    message = await client.messages.create(
        model="chat", max_tokens=16, messages=[{"role": "user", "content": "Say hello."}]
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    assert text.strip() and message.usage.output_tokens > 0

    events: list[str] = []
    pieces: list[str] = []
    async with client.messages.stream(
        model="chat", max_tokens=16, messages=[{"role": "user", "content": "Count to five."}]
    ) as stream:
        async for event in stream:
            events.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                pieces.append(event.delta.text)
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_delta" in events and "".join(pieces).strip()
    counted = await client.messages.count_tokens(
        model="chat", messages=[{"role": "user", "content": "Say hello."}]
    )
    assert counted.input_tokens > 0


async def test_openai_responses_plain_and_streamed(served: Fleet) -> None:
    client = served.client()
    response = await client.responses.create(model="chat", input="Say hello.", max_output_tokens=16)
    assert response.output_text.strip()
    kinds: list[str] = []
    text = ""
    stream = await client.responses.create(
        model="chat", input="Count to five.", max_output_tokens=16, stream=True
    )
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert text.strip()


async def test_tokenize_detokenize_and_template(served: Fleet) -> None:
    status, tokens = await post(served, "/tokenize", {"model": "other", "content": "Hello there"})
    assert status == 200 and tokens["tokens"]
    status, text = await post(served, "/detokenize", {"model": "other", "tokens": tokens["tokens"]})
    assert status == 200 and str(text["content"]).strip() == "Hello there"
    chat = {"model": "other", "messages": [{"role": "user", "content": "Hi"}]}
    status, rendered = await post(served, "/apply-template", chat)
    assert status == 200 and "Hi" in str(rendered["prompt"])
    # each went to "other": it was loaded for them, "chat" was not
    assert served.supervisor.servers["other"].endpoint is not None


async def test_completion_streams_as_llama_cpp_writes_it(served: Fleet) -> None:
    body = {"model": "chat", "prompt": "Once upon a time", "n_predict": 3000, "stream": True,
            "ignore_eos": True}  # fmt: skip
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http,
        http.post(f"{served.base}/completion", json=body) as resp,
    ):
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        first = await resp.content.readline()
        assert first.startswith(b"data: ") and "content" in json.loads(first[6:])
        # the first event is here while llama-server is still generating: passed on, not
        # buffered (then the client leaves, and the server must stop)
        assert await generating(served.supervisor.servers["chat"].endpoint)
    await until_async(lambda: _idle(served, "chat"), 30)


async def _idle(f: Fleet, name: str) -> bool:
    return not await generating(f.supervisor.servers[name].endpoint)


async def test_an_unknown_model_gets_a_404_in_each_apis_shape(served: Fleet) -> None:
    with pytest.raises(anthropic.NotFoundError) as refused:
        await anthropic_client(served).messages.create(
            model="nope", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )
    assert refused.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        await served.client().responses.create(model="nope", input="Hi")
    assert missing.value.code == "model_not_found"
    status, body = await post(served, "/tokenize", {"model": "nope", "content": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found"  # type: ignore[index]


async def test_rerank_through_the_router(served: Fleet) -> None:
    documents = ["hi", "The giant panda is a bear species endemic to China.", "Paris"]
    body = {"model": "rank", "query": "What is a panda?", "documents": documents}
    status, ranked = await post(served, "/v1/rerank", body)
    assert status == 200, ranked
    results = ranked["results"]
    assert isinstance(results, list) and {r["index"] for r in results} == {0, 1, 2}
    assert all(isinstance(r["relevance_score"], float) for r in results)


async def test_infill_with_lifo_serves_the_newest_and_drops_the_abandoned(served: Fleet) -> None:
    fim = {"model": "fim", "input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n"}
    status, answer = await post(served, "/infill", {**fim, "n_predict": 4})
    assert status == 200 and "content" in answer  # loaded, and infill is supported

    queue = served.scheduler.queue("fim")
    assert queue is not None
    # long enough to hold the only slot while four keystrokes queue behind it (each queued
    # one is awaited below), short enough for a loaded 2-core machine
    holder = asyncio.create_task(post(served, "/infill", {**fim, "n_predict": 160,
                                                          "ignore_eos": True}))  # fmt: skip
    await until(lambda: queue.active == 1)
    finished: list[int] = []

    async def keystroke(number: int) -> None:
        await post(served, "/infill", {**fim, "n_predict": 2})
        finished.append(number)

    typed = []
    for number in range(4):  # a burst of completions, one per keystroke
        typed.append(asyncio.create_task(keystroke(number)))
        await until(lambda n=number: queue.waiting == n + 1)
    for abandoned in typed[:2]:  # the editor moved on: those two clients went away
        abandoned.cancel()
    await asyncio.gather(*typed[:2], return_exceptions=True)
    await until(lambda: queue.waiting == 2)  # they left the queue without reaching llama-server
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(holder, *typed[2:]), 300)
    assert finished == [3, 2], "newest first; the abandoned ones never answered"
    print(f"\nqueued infill answered {time.monotonic() - started:.1f} s after the burst")


@pytest.mark.parametrize("api", ["messages", "responses"])
async def test_a_disconnect_mid_stream_stops_the_generation(served: Fleet, api: str) -> None:
    endpoint = lambda: served.supervisor.servers["chat"].endpoint  # noqa: E731
    if api == "messages":
        stream = await anthropic_client(served).messages.create(
            model="chat", max_tokens=3000, stream=True,
            messages=[{"role": "user", "content": "Tell me a long story."}],
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    else:
        stream = await served.client().responses.create(  # type: ignore[assignment]
            model="chat", input="Tell me a long story.", max_output_tokens=3000, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    async for _ in stream:
        break
    assert await generating(endpoint())
    await stream.close()  # the client goes away mid-answer
    await until_async(lambda: _idle(served, "chat"), 30)
