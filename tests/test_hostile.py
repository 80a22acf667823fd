"""The hostile-input campaign, kept in the suite (issue 20): a few hundred seeded pack and
adapter mutations, hostile HTTP requests against a loopback Hub server, hostile names and
URLs with credentials (``tests/fuzzing.py``; ``benchmarks/fuzz.py`` runs ≥ 10,000).

Asserted: only the project's error types come out, nothing invalid is accepted, no case
allocates above the cap, every HTTP answer is 2xx/4xx, and the server still answers."""
from __future__ import annotations

import sys
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).parent))
from fuzzing import (  # noqa: E402
    Tally,
    loads,
    run_adapter_cases,
    run_card_cases,
    run_http_cases,
    run_name_cases,
    run_pack_cases,
    run_secret_cases,
    seed_adapter,
    seed_hub,
    warm_up,
)
from hubutil import running_hub  # noqa: E402


def _clean(tally: Tally) -> None:
    assert tally.bad() == {}, (tally.bad(), tally.examples)


def test_pack_mutations(tmp_path):
    warm_up(tmp_path)
    tally = Tally()
    run_pack_cases(tally, tmp_path, seed=1, n=300)
    _clean(tally)
    c = tally.counts["pack"]
    assert c["cases"] == 300 and c["refused"] > 150  # most mutations must be caught, not decoded


def test_adapter_mutations(tmp_path):
    loads(seed_adapter())  # peft and the tiny Llama (accepted folders are attached to it) before counting memory
    tally = Tally()
    run_adapter_cases(tally, tmp_path, seed=2, n=300)
    _clean(tally)
    c = tally.counts["adapter"]
    assert c["cases"] == 300 and c["refused"] > 150 and c["accepted"] > 0


def test_http_requests_never_5xx_and_the_server_keeps_answering(tmp_path):
    tally = Tally()
    with running_hub(tmp_path / "hub") as hub:
        seed_hub(hub.store)
        # a request the server never answers times out (10 s) and is tallied "dropped", which _clean refuses
        run_http_cases(tally, hub.endpoint, seed=3, n=150)
        assert httpx2.get(f"{hub.endpoint}/api/models", timeout=10).status_code == 200
    _clean(tally)
    assert tally.counts["http"]["refused"] > 0 and tally.counts["http"]["accepted"] > 0


def test_names_and_secrets():
    tally = Tally()
    run_name_cases(tally, seed=4, n=500)
    run_secret_cases(tally, seed=5, n=200)
    _clean(tally)
    assert tally.counts["name"]["refused"] > 0 and tally.counts["name"]["accepted"] > 0


def test_card_values_yaml_allows_and_json_does_not(tmp_path):
    """Issue 28 hole 5's class: model info / listings answer 200 with JSON cardData, commits 400 exactly
    when the card has no JSON metadata."""
    tally = Tally()
    with running_hub(tmp_path / "hub") as hub:
        run_card_cases(tally, hub.endpoint, hub.store, seed=6, n=60)
    _clean(tally)
    c = tally.counts["card"]
    assert c["cases"] == 60 and c["refused"] > 0 and c["accepted"] > 0


def test_random_openai_bodies_never_5xx_and_the_server_keeps_answering(tmp_path):
    """Serve fuzz: bodies built from the OpenAI schema's fields with every JSON type, 8 at a time (cohorts)."""
    import fuzzing

    from adapterhub_c.serve.server import BackgroundServer, ServeOptions

    reg, base, models = fuzzing.serve_world(tmp_path / "home")
    tally = Tally()
    opts = ServeOptions(all=True, token=fuzzing.SERVE_TOKEN, batch_window_ms=20)
    with BackgroundServer(reg, base, opts) as srv:
        fuzzing.run_serve_cases(tally, srv.endpoint, fuzzing.SERVE_TOKEN, models, seed=7, n=240)
        assert httpx2.get(f"{srv.endpoint}/health", timeout=10).status_code == 200
    reg.close()
    _clean(tally)
    c = tally.counts["serve"]
    assert c["refused"] > 0 and c["accepted"] > 0  # both sides of the validation were reached
