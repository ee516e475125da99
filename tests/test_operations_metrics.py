"""GET /metrics: parsed with prometheus_client's own parser; counters move with traffic.

Two API processes share one PROMETHEUS_MULTIPROC_DIR (the library's
multiprocess mode), so a scrape of either shows the whole server's counts;
worker figures come from the workers' heartbeats through the broker.
"""
from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOY
from tests.helpers import sse_events, text_of, user, wait_until
from tests.ops_processes import Parts


@pytest.fixture(scope="module")
def two_apis(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("metrics")
    (root / "prom").mkdir()
    (root / "logs").mkdir()
    p = Parts(root / "logs")
    p.broker()
    p.worker("worker", [str(model_dir / TOY)])
    env = {"PROMETHEUS_MULTIPROC_DIR": str(root / "prom")}
    urls = [p.api("api-a", ["--require-model", TOY], env=env), p.api("api-b", env=env)]
    wait_until(lambda: httpx.get(f"{urls[0]}/health", timeout=5).status_code == 200, 120, 0.2, "the model to load")
    yield urls
    p.stop_all()


def scrape(url: str) -> dict[str, list]:
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(families: dict[str, list], sample: str, **labels: str) -> float:
    family = next((n for n in families if sample.startswith(n)), None)  # absent until a first labelled value
    return sum(s.value for s in families.get(family, []) if s.name == sample
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_counters_follow_traffic_across_api_processes(two_apis):
    a, b = two_apis
    before = scrape(a)
    tokens = answered = 0  # answered: requests whose text is not empty, so they had a first token
    for url, n in ((a, 3), (b, 2)):
        for _ in range(n):
            r = httpx.post(f"{url}/generate", json={"model": TOY, "prompt": "hi", "max_tokens": 5, "temperature": 0},
                           timeout=60)
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["completion_tokens"]
            answered += bool(r.json()["text"])
    with httpx.Client(base_url=b, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json={"model": TOY, "messages": user("hi"),
                                                                 "max_tokens": 4, "stream": True}) as r:
            events = list(sse_events(r))
        tokens += events[-1].data["usage"]["completion_tokens"]
        answered += bool(text_of(events))
        assert client.post("/generate", json={"model": "no-such-model", "prompt": "hi"}).status_code == 404
    after = scrape(b)  # the other process: the figures are the whole server's

    def moved(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    assert moved("loom_http_requests_total", endpoint="/generate", method="POST", status="200") == 5
    assert moved("loom_http_requests_total", endpoint="/generate", method="POST", status="404") == 1
    assert moved("loom_http_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert moved("loom_request_duration_seconds_count", endpoint="/generate") == 6
    assert moved("loom_generated_tokens_total", model=TOY) == tokens
    assert moved("loom_time_to_first_token_seconds_count") == answered
    # One per token after the first, less tokens that end inside a UTF-8 character (sent with the next).
    assert 0 < moved("loom_inter_token_latency_seconds_count") <= tokens - answered
    assert moved("loom_time_to_first_token_seconds_sum") > 0


def test_worker_figures_come_from_heartbeats(two_apis, model_dir):
    a, _ = two_apis
    families = scrape(a)
    assert value(families, "loom_broker_up") == 1
    [up] = [s for s in families["loom_worker_up"]]
    assert up.value == 1 and up.labels["device"] == "cpu"
    worker = {"worker_id": up.labels["worker_id"]}
    assert value(families, "loom_worker_models_loaded", **worker) == 1
    assert value(families, "loom_worker_model_loaded", model_id=TOY, **worker) == 1
    # While a long answer runs (the toy model never ends its turn before max_tokens),
    # the batch has a row and the KV cache holds bytes.
    seen: dict[str, float] = {}
    stop = threading.Event()

    def long_stream() -> None:
        with httpx.Client(base_url=a, timeout=120) as client:
            with client.stream("POST", "/v1/chat/completions", json={
                    "model": TOY, "messages": user("Tell a long story"), "max_tokens": 8000, "temperature": 0,
                    "stream": True}) as r:
                for _ in r.iter_raw():
                    if stop.is_set():
                        return  # leaving the stream cancels the request

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        def busy() -> bool:
            f = scrape(a)
            seen.update(batch=value(f, "loom_worker_batch_size", **worker),
                        kv=value(f, "loom_worker_kv_cache_bytes", **worker), running=value(f, "loom_requests_running"))
            return seen["batch"] >= 1 and seen["kv"] > 0
        wait_until(busy, 60, 0.1, "the worker to report a running batch")
        assert seen["running"] >= 1
    finally:
        stop.set()
        t.join(timeout=60)
    # The cancelled stream leaves the batch; the heartbeats say so.
    wait_until(lambda: value(scrape(a), "loom_worker_batch_size", **worker) == 0, 60, 0.2, "the batch to empty")
