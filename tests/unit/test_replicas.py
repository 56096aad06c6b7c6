"""Replica sets without a network: config checks, the pickers, the ring, ejection rules.

The requests themselves (two real ``llamactl serve`` replicas, failover, prefix
affinity against llama-server's cache counters) are in
``tests/integration/test_replicas.py``.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from procman.config import parse_config
from procman.distributed.remote import Pick, RemoteSection, parse_replica_url, replica_key
from procman.errors import ConfigError
from procman.router._pick import Picker, Ring, prefix_key, session_key
from procman.router.replicas import ReplicaSet, ReplicaSets

URLS = [f"http://10.0.0.{i}:8080" for i in range(2, 6)]


@dataclass
class Fake:
    url: str
    available: bool = True
    load: int = 0
    weight: float = 1.0


def config(text: str) -> dict[str, RemoteSection]:
    return dict(parse_config(tomllib.loads(text)).remote)


def test_a_remote_model_parses_with_its_defaults() -> None:
    remote = config('[remote.chat]\nreplicas = ["http://127.0.0.2:8080", "http://127.0.0.3:8080/"]')
    section = remote["chat"]
    assert section.replicas == ("http://127.0.0.2:8080", "http://127.0.0.3:8080")
    assert section.pick is Pick.LEAST_LOADED
    assert replica_key("chat", section, {}) is None  # loopback: no key needed


def test_remote_only_configs_need_no_local_model() -> None:
    parsed = parse_config(tomllib.loads('[remote.a]\nreplicas = ["http://127.0.0.1:9"]'))
    assert not parsed.models
    assert list(parsed.remote) == ["a"]


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ('[remote.c]\nreplicas = ["http://10.0.0.2:8080"]', "beyond this machine"),
        ('[remote.c]\nreplicas = ["https://127.0.0.1:8080"]', "https replicas"),
        ('[remote.c]\nreplicas = ["127.0.0.1:8080"]', "not a replica URL"),
        ('[remote.c]\nreplicas = ["http://127.0.0.1:8080/v1"]', "root URL"),
        ('[remote.c]\nreplicas = ["http://127.0.0.1:1", "http://127.0.0.1:1"]', "listed twice"),
        ("[remote.c]\npick = 'prefix'", "replicas: missing"),
        ('[remote.c]\nreplicas = ["http://127.0.0.1:1"]\npick = "fastest"', "least_loaded"),
        ('[remote.c]\nreplicas = ["http://127.0.0.1:1"]\nreplica = 1', "did you mean"),
        (
            '[remote.c]\nreplicas = ["http://127.0.0.1:1"]\n[models.c]\npath = "demo"',
            "taken by remote.c",
        ),
        (
            '[remote.c]\nreplicas = ["http://10.0.0.2:1"]\n'
            'replica_api_key_env = "LLAMACTL_TEST_UNSET_KEY"',
            "is not set",
        ),
    ],
)
def test_bad_remote_tables_are_clear_errors(toml: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(toml))
    assert fragment in f"{caught.value.message} {caught.value.hint}"


def test_a_key_from_the_environment_admits_a_remote_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLAMACTL_TEST_REPLICA_KEY", "s3cret")
    toml = (
        '[remote.c]\nreplicas = ["http://10.0.0.2:1"]\n'
        'replica_api_key_env = "LLAMACTL_TEST_REPLICA_KEY"'
    )
    section = config(toml)["c"]
    assert replica_key("c", section) == "s3cret"
    remote = ReplicaSet("c", section, api_key="s3cret")
    assert remote.replicas[0].endpoint.auth() == [("Authorization", "Bearer s3cret")]


def test_replica_urls() -> None:
    assert str(parse_replica_url("http://[::1]:81")) == "http://[::1]:81"
    assert parse_replica_url("http://h").port == 80


def test_round_robin_skips_the_ejected() -> None:
    replicas = [Fake(u) for u in URLS[:3]]
    replicas[1].available = False
    picker = Picker([r.url for r in replicas])
    assert [picker.round_robin(replicas) for _ in range(4)] == [0, 2, 0, 2]


def test_least_loaded_spreads_ties_and_prefers_the_idle() -> None:
    replicas = [Fake(u) for u in URLS[:2]]
    picker = Picker([r.url for r in replicas])
    assert Counter(picker.least_loaded(replicas) for _ in range(100)) == {0: 50, 1: 50}
    replicas[0].load = 3
    assert picker.least_loaded(replicas) == 1
    replicas[1].load, replicas[1].weight = 1, 0.1  # ramping up: worth a tenth
    assert picker.least_loaded(replicas) == 0
    for each in replicas:
        each.available = False
    assert picker.least_loaded(replicas) is None


def test_the_ring_is_the_same_in_two_routers_and_balanced() -> None:
    one, two = Ring(URLS), Ring(list(URLS))
    replicas = [Fake(u) for u in URLS]
    keys = [f"system prompt {i}".encode() for i in range(1000)]
    firsts = [one.first(k, replicas, float("inf")) for k in keys]
    assert firsts == [two.first(k, replicas, float("inf")) for k in keys]
    shares = Counter(firsts)
    assert len(shares) == 4
    assert all(150 <= n <= 350 for n in shares.values()), shares


def test_losing_a_replica_moves_only_its_keys() -> None:
    ring = Ring(URLS)
    replicas = [Fake(u) for u in URLS]
    keys = [f"k{i}".encode() for i in range(500)]
    before = [ring.first(k, replicas, float("inf")) for k in keys]
    replicas[2].available = False
    after = [ring.first(k, replicas, float("inf")) for k in keys]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert moved
    assert all(b == 2 for b, _ in moved)


def test_bounded_load_sends_a_hot_key_on_to_the_next_replica() -> None:
    ring = Ring(URLS)
    replicas = [Fake(u) for u in URLS]
    key = b"the same long system prompt"
    home = ring.first(key, replicas, 1.25)
    assert home is not None
    replicas[home].load = 10  # far above 1.25 x the average of (10 + 1) / 4
    other = ring.first(key, replicas, 1.25)
    assert other is not None
    assert other != home
    assert ring.first(key, replicas, float("inf")) == home  # strict affinity ignores load


def test_prefix_key_is_the_start_of_the_conversation() -> None:
    system = {"role": "system", "content": "You are a helpful assistant.  \n Be brief."}
    first = {"role": "user", "content": "hello"}
    turn1 = {"messages": [system, first]}
    turn3 = {"messages": [system, first, {"role": "assistant", "content": "hi"},
                          {"role": "user", "content": "more"}]}  # fmt: skip
    assert prefix_key(turn1, 2048) == prefix_key(turn3, 2048)
    folded = {"messages": [{**system, "content": "\n" + str(system["content"]) + "  \r\n"}, first]}
    assert prefix_key(folded, 2048) == prefix_key(turn1, 2048)
    other = {"messages": [system, {"role": "user", "content": "bye"}]}
    assert prefix_key(other, 2048) != prefix_key(turn1, 2048)
    assert prefix_key(other, 16) == prefix_key(turn1, 16)  # cut before they differ
    assert len(prefix_key({"prompt": "x" * 10_000}, 2048) or b"") == 2048
    assert prefix_key({"input": ["abc"]}, 100) == b"abc"
    assert prefix_key({"model": "m"}, 100) is None
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prefix_key(parts, 100) == b"user\x00hi\x00"


def test_session_key_from_the_header_or_user() -> None:
    assert session_key([("X-Session-Id", "abc")], "x-session-id", {}) == b"abc"
    assert session_key([], "x-session-id", {"user": "u1"}) == b"u1"
    assert session_key([], "x-session-id", {"user": 5}) is None


def test_a_set_picks_by_its_setting_and_counts_the_cost() -> None:
    section = RemoteSection(replicas=tuple(URLS[:2]), pick=Pick.SESSION)
    remote = ReplicaSet("chat", section)
    picked = {remote.pick({"user": "alice"}, []) for _ in range(10)}
    assert len(picked) == 1
    assert remote.picks == 10
    assert remote.pick_seconds > 0
    only = remote.pick({"user": "alice"}, [], exclude=picked)
    assert only is not None
    assert only not in picked


def test_ejection_and_the_ramp() -> None:
    remote = ReplicaSet("chat", RemoteSection(replicas=tuple(URLS[:2]), ramp=10))
    first = remote.replicas[0]
    first.eject("refused")
    first.eject("refused again")
    assert (first.up, first.ejections, first.last_error) == (False, 1, "refused again")
    assert remote.pick(None, []) is remote.replicas[1]
    first.up, first.readmitted_at = True, 0.0  # readmitted long ago: full weight
    assert first.weight == 1.0


def test_sets_find_by_alias_and_export_metrics() -> None:
    section = RemoteSection(replicas=(URLS[0],), aliases=("default",))
    sets = ReplicaSets([ReplicaSet("chat", section)])
    found = sets.find("default")
    assert found is not None
    assert found.name == "chat"
    assert sets.find("other") is None
    found.replicas[0].prompt_tokens, found.replicas[0].prompt_tokens_cached = 25.0, 75.0
    assert found.replicas[0].hit_rate == 0.75  # llama.cpp counts evaluated and cached apart
    text = sets.metrics()
    assert f'llamactl_replica_up{{model="chat",replica="{URLS[0]}"}} 1' in text
    assert "llamactl_replica_prompt_tokens_cached_total" in text
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(text)}
    assert "llamactl_replica_ejections" in names


# -- DNS discovery (a real DNS server on loopback UDP, in this process) ----------------------------
@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ('discovery = { kind = "consul", name = "x" }', "'kubernetes'"),
        ('discovery = { kind = "kubernetes", name = "x" }', "unknown keys"),
        ('discovery = { kind = "kubernetes", namespace = "n" }', "selector are needed"),
        (
            'discovery = { kind = "kubernetes", namespace = "n", selector = "a=b", '
            'api = "http://10.0.0.1:6443" }',
            "https",
        ),
        ('discovery = { kind = "dns" }', "name"),
        ('discovery = { name = "x", nameserver = "dns.example" }', "not an IP"),
        ('discovery = { name = "x", colour = 1 }', "unknown keys"),
        ('discovery = { name = "x" }', "a key is required"),
        ('discovery = { name = "x" }\nreplicas = ["http://127.0.0.1:1"]', "not both"),
    ],
)
def test_bad_discovery_tables(table: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(f"[remote.c]\n{table}"))
    assert fragment in f"{caught.value.message} {caught.value.hint}"


async def test_dns_discovery_follows_the_records(monkeypatch: pytest.MonkeyPatch) -> None:
    from procman.distributed.discovery import Discovery, resolve_replicas
    from tests.dns_server import start_dns

    server = await start_dns()
    try:
        server.records["chat-pods.llm.test"] = ["127.0.0.3", "127.0.0.2", "::1"]
        found = Discovery(name="chat-pods.llm.test", port=8081, nameserver=server.nameserver)
        assert await resolve_replicas(found) == [
            "http://127.0.0.2:8081", "http://127.0.0.3:8081", "http://[::1]:8081"]  # fmt: skip
        gone = Discovery(name="gone.llm.test", nameserver=server.nameserver)
        assert await resolve_replicas(gone) == []  # NXDOMAIN: no pod
        server.silent = True
        assert await resolve_replicas(found, lifetime=0.3) is None  # a failure keeps the list
        server.silent = False
        monkeypatch.setenv("K", "k")
        toml = (
            f'[remote.chat]\nreplica_api_key_env = "K"\ndiscovery = {{ name = '
            f'"chat-pods.llm.test", port = 8081, nameserver = "{server.nameserver}" }}'
        )
        section = parse_config(tomllib.loads(toml)).remote["chat"]
        remote = ReplicaSet("chat", section, api_key="k")
        assert remote.replicas == []
        await remote.discover()
        first = remote.replicas[0]
        assert [r.url for r in remote.replicas][:2] == ["http://127.0.0.2:8081",
                                                        "http://127.0.0.3:8081"]  # fmt: skip
        assert first.weight < 1  # new replicas ramp up
        first.requests = 7
        server.records["chat-pods.llm.test"] = ["127.0.0.2"]
        await remote.discover()
        assert [r.url for r in remote.replicas] == ["http://127.0.0.2:8081"]
        assert remote.replicas[0] is first  # kept, with its counts
        server.silent = True
        await remote.discover()  # the server times out: the list stays
        assert [r.url for r in remote.replicas] == ["http://127.0.0.2:8081"]
    finally:
        assert server.transport is not None
        server.transport.close()


# -- Kubernetes discovery: a stub API server with recorded EndpointSlices ------------------------
def endpoint_slice(name: str, addresses: list[str], *, ready: bool = True) -> dict[str, object]:
    """An EndpointSlice as the API server returns it (fields as recorded from Kubernetes 1.30)."""
    return {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "addressType": "IPv4",
        "metadata": {"name": name, "namespace": "llm", "resourceVersion": "100",
                     "labels": {"kubernetes.io/service-name": "chat"}},
        "endpoints": [{"addresses": [a], "conditions": {"ready": ready, "serving": ready,
                                                        "terminating": False}}
                      for a in addresses],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    }  # fmt: skip


class StubApi:
    """The two GETs of the Kubernetes API discovery makes: a list, and a watch that streams
    the events a test puts, or answers 410 for an expired version."""

    def __init__(self) -> None:
        self.lists = 0
        self.watches: list[str] = []
        self.events: asyncio.Queue[dict[str, object] | None] = asyncio.Queue()
        self.items = [endpoint_slice("chat-a", ["10.0.0.2"])]
        self.version = "100"

    async def slices(self, request: web.Request) -> web.StreamResponse:
        assert request.match_info["ns"] == "llm"
        assert request.query["labelSelector"] == "kubernetes.io/service-name=chat"
        if "watch" not in request.query:
            self.lists += 1
            body = {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                    "metadata": {"resourceVersion": self.version}, "items": self.items}  # fmt: skip
            return web.json_response(body)
        self.watches.append(request.query["resourceVersion"])
        if request.query["resourceVersion"] == "gone":
            return web.json_response({"kind": "Status", "code": 410}, status=410)
        response = web.StreamResponse()
        await response.prepare(request)
        while (event := await self.events.get()) is not None:
            await response.write(json.dumps(event).encode() + b"\n")
        return response

    async def start(self) -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", self.slices)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def until(check: object) -> None:
    for _ in range(500):
        if callable(check) and check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


async def test_kubernetes_discovery_lists_watches_and_relists_after_410() -> None:
    from procman.distributed.discovery import Discovery
    from procman.distributed.kube import KubeWatcher

    stub = StubApi()
    runner, api = await stub.start()
    seen: list[list[str]] = []
    selector = "kubernetes.io/service-name=chat"
    found = Discovery(kind="kubernetes", namespace="llm", selector=selector, api=api)
    watcher = KubeWatcher(found, seen.append, root=Path("/nonexistent"), env={})
    task = asyncio.create_task(watcher.run())
    events = stub.events
    try:
        await until(lambda: seen == [["http://10.0.0.2:8080"]] and stub.watches == ["100"])
        # a second slice, a pod not ready yet, then ready; a slice deleted
        unready = endpoint_slice("chat-b", ["10.0.0.3"], ready=False)
        await events.put({"type": "ADDED", "object": unready})
        await events.put({"type": "MODIFIED", "object": endpoint_slice("chat-b", ["10.0.0.3"])})
        await until(lambda: seen[-1] == ["http://10.0.0.2:8080", "http://10.0.0.3:8080"])
        assert ["http://10.0.0.2:8080"] in seen[1:]  # the not-ready pod was left out
        await events.put({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}})
        await events.put({"type": "DELETED", "object": endpoint_slice("chat-a", ["10.0.0.2"])})
        await until(lambda: seen[-1] == ["http://10.0.0.3:8080"])
        # the watch's version expired: an ERROR event with 410, then a 410 status; relisted
        stub.items, stub.version = [endpoint_slice("chat-c", ["10.0.0.4"])], "gone"
        expired = {"kind": "Status", "code": 410, "message": "too old resource version"}
        await events.put({"type": "ERROR", "object": expired})
        await until(lambda: watcher.lists >= 3)  # relisted after the event and after the 410
        assert seen[-1] == ["http://10.0.0.4:8080"]
        assert "gone" in stub.watches
        assert stub.lists == watcher.lists
    finally:
        task.cancel()
        await events.put(None)
        await runner.cleanup()
