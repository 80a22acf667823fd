"""adapt serve on the tiny base, driven by the real ``openai`` client (and raw HTTP for bad input).

One registry for the module: the tiny base, an NF4 + Wanda variant (the served target), a
LoRA trained on the base, its pack, its conversion to the variant (LoRA + recovery), a
second LoRA and their task-arithmetic merge, a soft prompt learned on the variant, and a
LoRA of another base. Greedy answers are compared with ``adapt generate``
(``workflows.evals.run_generate``) token for token.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")

from adapterhub_c.registry import Registry  # noqa: E402
from adapterhub_c.serve.server import BackgroundServer, ServeOptions  # noqa: E402
from adapterhub_c.workflows.evals import run_generate  # noqa: E402

TASK = "builtin:task/reverse-words"
FAST = dict(steps=4, lr=3e-3, batch_size=2, seq_len=48, max_eval_tokens=300, max_eval_examples=2)
TOKEN = "s3cret-token-42"
N = 16
PROMPTS = ["Reverse the words: red green blue\nAnswer:", "def add(a, b):", "The quick brown fox"]
K_PROMPT = 4


def _random_lora(reg, base, folder, seed):
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.training import peft_io

    model, _ = load_base_model(reg, base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    lora = peft_io.extract_lora(peft_model)
    lora.config["base_model_name_or_path"] = base.name
    return lora.to_folder(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapterhub_c.models.tiny import build_tiny_llama
    from adapterhub_c.registry.artifacts import register_artifact
    from adapterhub_c.workflows.bases import add_builtin_base, register_base_folder
    from adapterhub_c.workflows.merges import compose_artifacts, merge_artifacts
    from adapterhub_c.workflows.packs import pack_artifact
    from adapterhub_c.workflows.prompts import learn_prompt_artifact
    from adapterhub_c.workflows.training import convert_adapter, train_adapter
    from adapterhub_c.workflows.variants import create_variant

    home = tmp_path_factory.mktemp("serve_home")
    reg = Registry(home=home)
    base, _ = add_builtin_base(reg, "builtin:tiny-llama")
    nf4, _ = create_variant(reg, base.name, quant="nf4", prune="wanda", sparsity=0.5, calib_samples=4,
                            calib_seq_len=64, eval_tokens=0, name="tiny-nf4-wanda")
    train_adapter(reg, base.name, TASK, rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj", "down_proj"],
                  name="src", baseline=False, **FAST)
    pack_artifact(reg, "src", density=0.5, alpha=1.0, name="src-pack")
    pack_artifact(reg, "src", density=0.3, alpha=1.0, name="bad-pack")
    convert_adapter(reg, "src", nf4.name, data=TASK, recover_rank=4, name="conv", reference_rows=False, **FAST)
    other = register_artifact(reg, kind="lora", name="second", base_id=base.id,
                              folder=_random_lora(reg, base, home / "second", seed=3))
    assert other.kind == "lora"
    merge_artifacts(reg, ["src", "second"], method="task-arithmetic", name="merged")
    compose_artifacts(reg, ["src", "second"], examples=TASK, shots=2, budget=4, name="composed")
    pack_artifact(reg, "conv", density=0.5, alpha=1.0, name="conv-pack")  # a pack carrying recovery modules
    learn_prompt_artifact(reg, nf4.name, name="p", tokens=K_PROMPT, steps=2, seq_len=32, batch_size=2,
                          eval_tokens=300)
    # another base, and a LoRA of it
    folder = home / "other-base"
    model, tok = build_tiny_llama()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    other_base, _ = register_base_folder(reg, "other-base", folder, None, None, None, None)
    register_artifact(reg, kind="lora", name="other-lora", base_id=other_base.id,
                      folder=_random_lora(reg, other_base, home / "other-lora", seed=4))
    yield {"reg": reg, "home": home, "nf4": nf4.name, "base": base}
    reg.close()


@pytest.fixture(scope="module")
def server(world):
    opts = ServeOptions(all=True, token=TOKEN, batch_window_ms=50)
    with BackgroundServer(world["reg"], world["nf4"], opts) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=TOKEN, max_retries=0, timeout=120)


_REFS: dict = {}


class _Recorder:
    """A tokenizer stand-in that remembers the ids ``greedy_generate`` decoded last."""

    def __init__(self, tokenizer):
        self._tok, self.ids = tokenizer, []

    def __call__(self, *a, **kw):
        return self._tok(*a, **kw)

    def decode(self, ids, *a, **kw):
        self.ids = list(ids)
        return self._tok.decode(ids, *a, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def reference_ids(world, model: str, text: str, chat: bool = False, n: int = N) -> tuple[str, list[int]]:
    """(text, token ids) of ``adapt generate`` on the served variant with the model's adapter / prompt."""
    key = (model, text, chat, n)
    if key not in _REFS:
        import adapterhub_c.workflows.evals as evals

        adapter = prompt = None
        if model == "p":
            prompt = "p"
        elif "+" in model:
            adapter, prompt = model.split("+")
        elif model != world["nf4"]:
            adapter = model
        real = evals.greedy_generate
        seen = {}

        def recording(model_, tokenizer, *a, **kw):
            seen["rec"] = rec = _Recorder(tokenizer)
            return real(model_, rec, *a, **kw)

        evals.greedy_generate = recording
        try:
            out = run_generate(world["reg"], world["nf4"], text, max_new_tokens=n, chat=chat,
                               adapter=adapter, prompt=prompt)
        finally:
            evals.greedy_generate = real
        ids = seen["rec"].ids
        assert seen["rec"]._tok.decode(ids) == out
        _REFS[key] = (out, ids)
    return _REFS[key]


def reference(world, model: str, text: str, chat: bool = False, n: int = N) -> str:
    return reference_ids(world, model, text, chat, n)[0]


IDS = {"return_token_ids": True}


def raw(server, method: str, path: str, body: bytes | dict | None = None, token: str | None = TOKEN):
    """(status, parsed JSON or text) of a raw HTTP request."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(server.endpoint + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode()


def metric(server, name: str, **labels) -> float:
    return server.server.metrics.get(name, **labels)


# ---- acceptance: answers equal adapt generate's -------------------------------------------
def test_models_lists_target_and_adapters_with_parents(client, world):
    models = {m.id: m for m in client.models.list().data}
    assert world["nf4"] in models
    for name in ("src", "src-pack", "conv", "conv-pack", "merged", "composed", "second", "p"):
        assert name in models, name
    assert "other-lora" not in models
    extra = {k: m.model_extra for k, m in models.items()}
    assert extra["src-pack"]["parent"] == "src" and extra["src-pack"]["kind"] == "pack"
    assert extra["conv"]["parent"] == "src" and extra["conv"]["kind"] == "recovered-lora"
    assert extra["src"]["parent"] == "builtin:tiny-llama"
    assert extra["p"]["kind"] == "prompt"


@pytest.mark.parametrize("model", ["src", "src-pack", "conv", "conv-pack", "merged", "composed", "p", "src+p",
                                   "conv+p", "target"])
def test_completions_match_adapt_generate(client, world, model):
    model = world["nf4"] if model == "target" else model
    for text in PROMPTS:
        out = client.completions.create(model=model, prompt=text, max_tokens=N, temperature=0, extra_body=IDS)
        want_text, want_ids = reference_ids(world, model, text)
        assert out.model_extra["x_adapterhub"]["token_ids"] == want_ids, (model, text)  # token for token
        assert out.choices[0].text == want_text
        assert out.model == model and out.usage.completion_tokens == len(want_ids)


@pytest.mark.parametrize("model", ["src", "src-pack", "conv"])
def test_chat_matches_adapt_generate_chat(client, world, model):
    text = PROMPTS[0]
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                         max_tokens=N, temperature=0, extra_body=IDS)
    want_text, want_ids = reference_ids(world, model, text, chat=True)
    assert out.model_extra["x_adapterhub"]["token_ids"] == want_ids
    assert out.choices[0].message.content == want_text
    assert out.choices[0].message.role == "assistant"


def test_switching_never_touches_the_base_weights(server, client):
    model = server.server.model
    before = {n: (p.data_ptr(), p.dtype, tuple(p.shape)) for n, p in model.named_parameters()}
    buffers = {n: b.data_ptr() for n, b in model.named_buffers()}
    for m in ("src", "conv", "conv-pack", "src+p", "merged"):
        client.completions.create(model=m, prompt="a", max_tokens=2, temperature=0)
    assert {n: (p.data_ptr(), p.dtype, tuple(p.shape)) for n, p in model.named_parameters()} == before
    assert {n: b.data_ptr() for n, b in model.named_buffers()} == buffers
    assert len(server.server.cache.resident_names()) >= 5  # the adapters live beside the model


def test_adapters_really_differ(world):
    answers = {m: reference(world, m, PROMPTS[1]) for m in ("src", "conv", "p", world["nf4"])}
    assert len(set(answers.values())) == len(answers), answers


@pytest.mark.parametrize("model", ["src-pack", "conv", "src+p"])
def test_streaming_returns_the_same_text(client, world, model):
    text = PROMPTS[2]
    stream = client.completions.create(model=model, prompt=text, max_tokens=N, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == reference(world, model, text)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                            max_tokens=N, temperature=0, stream=True)
    content = "".join(c.choices[0].delta.content or "" for c in stream)
    assert content == reference(world, model, text, chat=True)


def test_concurrent_requests_to_different_adapters(server, client, world):
    jobs = [(m, t) for m in ("src", "src-pack", "conv", "p", "merged", world["nf4"]) for t in PROMPTS[:2]]
    for m, t in jobs:
        reference(world, m, t)
    batches0, rows0 = metric(server, "batches_total"), metric(server, "batch_rows_total")
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def ask(m, t):
        try:
            barrier.wait()
            results[(m, t)] = client.completions.create(model=m, prompt=t, max_tokens=N, temperature=0,
                                                        extra_body=IDS)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    for (m, t), out in results.items():
        assert out.model_extra["x_adapterhub"]["token_ids"] == reference_ids(world, m, t)[1], (m, t)
    batches = metric(server, "batches_total") - batches0
    rows = metric(server, "batch_rows_total") - rows0
    assert rows == len(jobs) and batches < len(jobs)  # requests that arrived together ran together


def test_sampling_is_seeded(client):
    a = client.completions.create(model="src", prompt="x", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = client.completions.create(model="src", prompt="x", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text
    out = client.completions.create(model="src", prompt="x", max_tokens=8, temperature=0, stop=["\n"])
    assert "\n" not in out.choices[0].text


def test_stop_strings_cut_the_text(client, world):
    for model in ("conv", "src", "src-pack"):
        for text in PROMPTS:
            full = reference(world, model, text)
            for i in range(1, len(full) - 2):
                stop = full[i:i + 2]
                if "\ufffd" not in full[:i + 2] and full.find(stop) == i:
                    out = client.completions.create(model=model, prompt=text, max_tokens=N, temperature=0,
                                                    stop=[stop, "never-there"])
                    assert out.choices[0].text == full[:i] and out.choices[0].finish_reason == "stop"
                    stream = client.completions.create(model=model, prompt=text, max_tokens=N, temperature=0,
                                                       stop=stop, stream=True)
                    assert "".join(c.choices[0].text for c in stream) == full[:i]
                    return
    pytest.skip("no answer with a usable stop string")


def test_lru_eviction_and_reload_give_identical_outputs(world):
    opts = ServeOptions(adapters=["src-pack", "conv", "src"], max_resident=1, token="")
    with BackgroundServer(world["reg"], world["nf4"], opts) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        first = {}
        for m in ("src-pack", "conv", "src"):
            first[m] = c.completions.create(model=m, prompt=PROMPTS[0], max_tokens=N, temperature=0).choices[0].text
            assert srv.server.cache.resident_names() == [m]
        loads = srv.server.metrics.get("adapter_loads_total")
        assert srv.server.metrics.get("cache_evictions_total") >= 2
        for m in ("src-pack", "conv"):
            out = c.completions.create(model=m, prompt=PROMPTS[0], max_tokens=N, temperature=0)
            assert out.choices[0].text == first[m] == reference(world, m, PROMPTS[0])
            assert out.model_extra["x_adapterhub"]["cache"] == "miss"
        assert srv.server.metrics.get("adapter_loads_total") == loads + 2
        hit = c.completions.create(model="conv", prompt=PROMPTS[0], max_tokens=1, temperature=0)
        assert hit.model_extra["x_adapterhub"]["cache"] == "hit"
        assert srv.server.metrics.get("adapter_loads_total") == loads + 2  # a resident switch loads nothing


def test_memory_budget_in_mib(world):
    opts = ServeOptions(all=True, max_resident_mb=0.02, token="")  # ~20 KB: one tiny adapter at a time
    with BackgroundServer(world["reg"], world["nf4"], opts) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        for m in ("src", "second", "src"):
            c.completions.create(model=m, prompt="a", max_tokens=2, temperature=0)
        assert len(srv.server.cache.resident_names()) == 1
        assert srv.server.metrics.get("cache_evictions_total") == 2


def test_ffn_channels_variant_slices_a_base_lora(world):
    from adapterhub_c.workflows.variants import create_variant

    reg = world["reg"]
    ffn, _ = create_variant(reg, "builtin:tiny-llama", prune="ffn-channels", sparsity=0.5, calib_samples=4,
                            calib_seq_len=64, eval_tokens=0, name="tiny-ffn50")
    with BackgroundServer(reg, ffn.name, ServeOptions(adapters=["src"], token="")) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        out = c.completions.create(model="src", prompt=PROMPTS[1], max_tokens=N, temperature=0)
    assert out.choices[0].text == run_generate(reg, ffn.name, PROMPTS[1], max_new_tokens=N, adapter="src")


def test_load_and_unload_adapter(world):
    with BackgroundServer(world["reg"], world["nf4"], ServeOptions(adapters=["src"], token="")) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="conv", prompt="a", max_tokens=2)
        assert "load_adapter" in e.value.body["message"]
        status, body = raw(srv, "POST", "/v1/load_adapter", {"lora_name": "conv"}, token=None)
        assert status == 200 and body["model"] == "conv", body
        assert "conv" in srv.server.cache.resident_names()
        assert c.completions.create(model="conv", prompt="a", max_tokens=2, temperature=0).choices
        status, body = raw(srv, "POST", "/v1/unload_adapter", {"lora_name": "conv"}, token=None)
        assert status == 200
        assert "conv" not in srv.server.cache.resident_names()
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="conv", prompt="a", max_tokens=2)
        status, body = raw(srv, "POST", "/v1/load_adapter", {"lora_name": "nope/nothing"}, token=None)
        assert status == 404 and body["error"]["code"] == "model_not_found"


def test_log_requests_writes_runs_rows_only_when_asked(world, server, client):
    from sqlalchemy import select

    from adapterhub_c.registry.models import Run

    reg = world["reg"]

    def rows():
        with reg.session() as s:
            return list(s.scalars(select(Run).where(Run.command == "serve request")))

    client.completions.create(model="src", prompt="a", max_tokens=2, temperature=0)
    assert rows() == []  # off by default
    with BackgroundServer(reg, world["nf4"], ServeOptions(adapters=["src"], token="", log_requests=True)) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        out = c.completions.create(model="src", prompt="hello", max_tokens=3, temperature=0)
    logged = rows()
    assert len(logged) == 1 and logged[0].status == "succeeded"
    assert logged[0].parameters["model"] == "src" and logged[0].output["prompt"] == "hello"
    assert logged[0].output["completion"] == out.choices[0].text


def test_health_and_metrics(server):
    status, body = raw(server, "GET", "/health", token=None)
    assert status == 200 and body["status"] == "ok"
    status, text = raw(server, "GET", "/metrics")
    assert status == 200
    for name in ("requests_total", "completion_tokens_total", "adapter_loads_total", "cache_hits_total",
                 "adapter_load_seconds_sum", "resident_adapters"):
        assert f"adapterhub_serve_{name}" in text, name


def test_cli_registers_serve(cli):
    r = cli("serve", "--help")
    assert r.code == 0 and "--max-resident" in r.out and "--token" in r.out


# ---- bad input ------------------------------------------------------------------------------
def _error(body):
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_unknown_model_404_with_closest_names(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="src-pak", prompt="a", max_tokens=2)
    assert e.value.status_code == 404
    assert "src-pack" in e.value.body["message"] and e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body, param", [
    (b'{"model": "src", "prompt": "a", ', None),
    ({"model": "src", "prompt": "a", "max_tokens": "abc"}, "max_tokens"),
    ({"model": "src", "prompt": "a", "temperature": "hot"}, "temperature"),
    ({"model": "src", "prompt": 3}, "prompt"),
    ({"model": "src"}, "prompt"),
    ({"model": "src", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"model": "src", "prompt": "a", "top_p": 0}, "top_p"),
    ({"model": "src", "prompt": "a", "n": 2}, "n"),
    ({"model": "src", "prompt": "a", "stream": "yes"}, "stream"),
])
def test_bad_parameters_400_naming_the_field(server, body, param):
    status, resp = raw(server, "POST", "/v1/completions", body)
    assert status == 400, resp
    err = _error(resp)
    assert err["param"] == param
    if param:
        assert param in err["message"]


def test_bad_chat_messages_400(server):
    status, resp = raw(server, "POST", "/v1/chat/completions", {"model": "src", "messages": [{"role": 1}]})
    assert status == 400 and _error(resp)["param"] == "messages[0].role"
    status, resp = raw(server, "POST", "/v1/chat/completions", {"model": "src", "messages": []})
    assert status == 400 and _error(resp)["param"] == "messages"


def test_context_overflow_400_counting_soft_prompt_tokens(client, server, world):
    context = server.server.target.context
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="src", prompt="x" * (context + 5), max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="src", prompt="x" * 100, max_tokens=context)
    assert e.value.body["param"] == "max_tokens"
    fits = "x" * (context - K_PROMPT)  # byte-level tokenizer: one token a character
    assert client.completions.create(model="src", prompt=fits, max_tokens=1, temperature=0).choices
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="p", prompt=fits, max_tokens=1)
    assert "soft prompt" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="src+p", prompt=fits, max_tokens=1)


def test_adapter_of_another_base_400_naming_both(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="other-lora", prompt="a", max_tokens=2)
    msg = e.value.body["message"]
    assert "other-base" in msg and "builtin:tiny-llama" in msg


def test_corrupt_pack_500_for_that_request_only(client, world):
    reg = world["reg"]
    art = reg.get("bad-pack", "artifact")
    path = reg.blobs.path_for(art.files["pack.safetensors"])
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="bad-pack", prompt="a", max_tokens=2)
    assert e.value.status_code == 500 and "corrupt" in e.value.body["message"]
    out = client.completions.create(model="src-pack", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert out.choices[0].text == reference(world, "src-pack", PROMPTS[0])


def test_wrong_or_missing_token_401_without_echo(server):
    for token in (None, "wrong-token-9876"):
        status, body = raw(server, "GET", "/v1/models", token=token)
        assert status == 401
        assert _error(body)["code"] == "invalid_api_key"
        assert token is None or token not in json.dumps(body)
    status, body = raw(server, "POST", "/v1/completions", {"model": "src", "prompt": "a"}, token="nope-1234")
    assert status == 401 and "nope-1234" not in json.dumps(body)
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong-token-9876", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert raw(server, "GET", "/health", token=None)[0] == 200


def test_token_from_environment(world, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_SERVE_TOKEN", "env-token-1")
    with BackgroundServer(world["reg"], world["nf4"], ServeOptions(adapters=["src"])) as srv:
        assert raw(srv, "GET", "/v1/models", token=None)[0] == 401
        assert raw(srv, "GET", "/v1/models", token="env-token-1")[0] == 200


def test_client_disconnect_mid_stream_frees_its_slot(world):
    opts = ServeOptions(adapters=["src"], token="", max_batch=1)
    with BackgroundServer(world["reg"], world["nf4"], opts) as srv:
        req = urllib.request.Request(srv.endpoint + "/v1/completions", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "src", "prompt": "a", "max_tokens": 400,
                                                      "temperature": 0, "stream": True}).encode())
        resp = urllib.request.urlopen(req, timeout=30)
        assert resp.readline().startswith(b"data: ")
        resp.close()  # the client goes away mid-stream
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        out = c.completions.create(model="src", prompt="b", max_tokens=4, temperature=0)
        # the next request is served in full, and as adapt generate answers it alone
        assert out.choices[0].text == reference(world, "src", "b", n=4)
        assert 1 <= out.usage.completion_tokens <= 4 and out.choices[0].finish_reason in ("length", "stop")
        # The engine thread drops a finished cohort a moment after it emits the last event, so the
        # slot count is polled, not read once (reading it once raced the engine in CI).
        deadline = time.monotonic() + 10
        while ((srv.server.metrics.get("cancelled_total") < 1 or srv.server.engine.active)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert srv.server.metrics.get("cancelled_total") == 1
        assert srv.server.metrics.get("completion_tokens_total") < 400  # the first one stopped early
        assert srv.server.engine.active == 0


def test_demo_round(world, monkeypatch):
    from adapterhub_c.serve import demo_round
    from adapterhub_c.serve.loading import AdapterLoader

    loads: list[tuple[str, float]] = []  # (artefact, load seconds), in order
    real_load = AdapterLoader.load

    def counted(self, art):
        t0 = time.perf_counter()
        entry = real_load(self, art)
        loads.append((art.name, time.perf_counter() - t0))
        return entry

    monkeypatch.setattr(AdapterLoader, "load", counted)
    rows = demo_round(world["reg"], world["nf4"], ["src", "src-pack", "conv", "src+p"], prompts=PROMPTS[0],
                      max_tokens=N)
    assert [r["model"] for r in rows] == ["src", "src-pack", "conv", "src+p"]
    # each first request loaded its part from the registry, once (src+p: only the prompt was new);
    # the resident requests loaded nothing
    assert [name for name, _ in loads] == ["src", "src-pack", "conv", "p"]
    load_ms = {name: seconds * 1000 for name, seconds in loads}
    for r in rows:
        assert r["answer"] == reference(world, r["model"], PROMPTS[0])
        # the first switch includes the load it caused; that a resident switch is fast is the serve
        # benchmark's to show, here: it is a cache hit
        new_part = r["model"].split("+")[-1]
        assert r["first_switch_ms"] >= load_ms[new_part] - 1e-3
        assert isinstance(r["resident_switch_ms"], float) and r["resident_switch_ms"] >= 0
        assert (r["first_cache"], r["resident_cache"]) == ("miss", "hit")
    assert rows[1]["kind"] == "pack" and rows[3]["kind"] == "lora+prompt"



def test_load_adapter_pulls_from_the_hub_only_with_allow_pull(world, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hubutil import running_hub

    from adapterhub_c.hub.client import push_folder

    folder = _random_lora(world["reg"], world["base"], tmp_path / "hub-lora", seed=11)
    with running_hub(tmp_path / "hubroot") as hub:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        push_folder(folder, "alice/served-lora", token=hub.token, endpoint=hub.endpoint)
        with BackgroundServer(world["reg"], world["nf4"], ServeOptions(token="")) as srv:
            status, body = raw(srv, "POST", "/v1/load_adapter", {"lora_name": "alice/served-lora"}, token=None)
            assert status == 404, body  # no --allow-pull
        with BackgroundServer(world["reg"], world["nf4"], ServeOptions(token="", allow_pull=True)) as srv:
            status, body = raw(srv, "POST", "/v1/load_adapter", {"lora_name": "alice/served-lora"}, token=None)
            assert status == 200, body
            name = body["model"]
            c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
            out = c.completions.create(model=name, prompt="a", max_tokens=3, temperature=0)
            assert out.model == name and name in {m.id for m in c.models.list().data}


# ---- issue 28: one bad request fails only itself; bodies bounded -------------------------------
class _OneCohort:
    """``engine.submit`` that hands the engine its jobs only once ``n`` have arrived, all at once
    (under the engine's lock): they form one cohort by construction, not by timing."""

    def __init__(self, engine, n: int):
        self.engine, self.n, self.real = engine, n, engine.submit
        self.held, self.lock = [], threading.Lock()

    def __call__(self, job) -> None:
        with self.lock:
            self.held.append(job)
            if len(self.held) < self.n:
                return
            jobs, self.held = self.held, []
        with self.engine._cond:  # a re-entrant lock: the real submit takes it again
            for j in jobs:
                self.real(j)


def _together(server, monkeypatch, bodies: list[dict]) -> list[tuple[int, dict]]:
    """The answers to ``bodies`` sent at once and run as one cohort (checked on the batch counters)."""
    from concurrent.futures import ThreadPoolExecutor

    engine = server.server.engine
    monkeypatch.setattr(engine, "submit", _OneCohort(engine, len(bodies)))
    batches0, rows0 = metric(server, "batches_total"), metric(server, "batch_rows_total")
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: raw(server, "POST", "/v1/completions", b), bodies))
    monkeypatch.undo()
    assert metric(server, "batches_total") - batches0 >= 1
    assert metric(server, "batch_rows_total") - rows0 >= len(bodies)
    return answers


def _normal(i: int) -> dict:
    return {"model": ["src", "conv", "src-pack"][i % 3], "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": 8, "temperature": 0}


def test_an_underflowing_temperature_is_greedy_and_spares_its_cohort(server, monkeypatch):
    """Issue 28, hole 3: temperature 1e-300 (logits / T overflow, softmax NaN) sent with 8 normal requests
    in one cohort. Chosen behaviour: a temperature below serve.engine.GREEDY_BELOW is greedy decoding (the
    limit of sampling as T → 0), so the poisoned request answers 200 with the greedy text; an empty prompt
    is the tokenizer's BOS. The normal ones answer 200 with the text each gets alone."""
    alone = [raw(server, "POST", "/v1/completions", _normal(i)) for i in range(8)]
    assert all(status == 200 for status, _ in alone), alone
    greedy = raw(server, "POST", "/v1/completions", {"model": "src", "prompt": "hi", "max_tokens": 8,
                                                     "temperature": 0})
    bodies = [{"model": "src", "prompt": "hi", "max_tokens": 8, "temperature": 1e-300},
              {"model": "src", "prompt": "", "max_tokens": 8, "temperature": 0}] + [_normal(i) for i in range(8)]
    answers = _together(server, monkeypatch, bodies)
    assert [status for status, _ in answers] == [200] * len(bodies), answers
    assert answers[0][1]["choices"][0]["text"] == greedy[1]["choices"][0]["text"]
    for (_, got), (_, want) in zip(answers[2:], alone, strict=True):
        assert got["choices"][0]["text"] == want["choices"][0]["text"]


def test_a_row_that_fails_to_sample_fails_only_its_request(server, monkeypatch):
    """Issue 28, hole 3: whatever goes wrong choosing one row's token (here: a sampler that raises for one
    request's temperature) ends that request only; the rest of its cohort completes as when alone."""
    import adapterhub_c.serve.engine as engine_mod

    alone = [raw(server, "POST", "/v1/completions", _normal(i)) for i in range(4)]
    real = engine_mod.choose

    def poisoned(logits, params, generator):
        if params.temperature == 0.777:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_mod, "choose", poisoned)
    bad = {"model": "src", "prompt": "hi", "max_tokens": 8, "temperature": 0.777}
    answers = _together(server, monkeypatch, [bad] + [_normal(i) for i in range(4)])
    assert answers[0][0] == 500 and "probability tensor" in _error(answers[0][1])["message"]
    assert [status for status, _ in answers[1:]] == [200] * 4, answers
    for (_, got), (_, want) in zip(answers[1:], alone, strict=True):
        assert got["choices"][0]["text"] == want["choices"][0]["text"]


@pytest.fixture()
def limited(world):
    """A server with a 4 KiB body limit and a short body deadline, logging errors into a list."""
    import logging

    opts = ServeOptions(adapters=["src"], token="", max_body_bytes=4096, body_timeout_s=0.5)
    srv = BackgroundServer(world["reg"], world["nf4"], opts, log_level="error")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")  # uvicorn configures its loggers when the server is made
    logger.addHandler(handler)
    with srv:
        yield srv, records
    logger.removeHandler(handler)


def _http(srv, head: bytes, body: bytes = b"", then_close: bool = False) -> tuple[bytes, bool]:
    """Send ``head`` + ``body`` on a raw socket; (the answer's head, whether the server then closed
    the connection). ``then_close``: the client disconnects right after sending (no answer read)."""
    import re
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(srv.endpoint)
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(head + body)
        if then_close:
            return b"", True
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return data, True
            data += chunk
        answer, rest = data.split(b"\r\n\r\n", 1)
        n = int(re.search(rb"content-length: *(\d+)", answer, re.I).group(1))
        while len(rest) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        # only an answer that says Connection: close is waited on for the end of the connection
        closed = b"connection: close" in answer.lower() and s.recv(1) == b""
        return answer + b"\r\n\r\n" + rest, closed


def _head(length: int | str) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_a_body_over_the_limit_is_413_without_reading_it(limited):
    """Issue 28, hole 4: a declared 300 MB body is refused at once (only the head was sent), and a
    chunked body that grows past the limit is refused as it passes it; a body within the limit answers."""
    srv, records = limited
    answer, closed = _http(srv, _head(300 << 20), b'{"model": "src", ')
    assert answer.startswith(b"HTTP/1.1 413") and closed
    assert b"4096" in answer
    chunk = b'{"model": "src", "prompt": "' + b"x" * 5000 + b'"}'
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
    answer, _ = _http(srv, chunked)
    assert answer.startswith(b"HTTP/1.1 413")
    status, body = raw(srv, "POST", "/v1/completions", {"model": "src", "prompt": "a", "max_tokens": 2}, token=None)
    assert status == 200, body
    assert not [r for r in records if r.levelno >= 40]


def test_a_body_that_never_arrives_is_closed_after_the_body_timeout(limited):
    """Issue 28, hole 4: Content-Length 100, ten bytes sent, nothing more: 408 and the connection closed
    once the server's body deadline (0.5 s here) passes, instead of held forever."""
    srv, records = limited
    answer, closed = _http(srv, _head(100), b'{"model": ')
    assert answer.startswith(b"HTTP/1.1 408") and closed
    assert not [r for r in records if r.levelno >= 40]


def test_a_client_gone_mid_upload_leaves_no_traceback(limited):
    """Issue 28, hole 4: the client sends half its body and disconnects; the server logs no
    'Exception in ASGI application', and serves the next request."""
    srv, records = limited
    errors0 = srv.server.metrics.get("errors_total")
    _http(srv, _head(1000), b'{"model": "src", "prompt": "', then_close=True)
    deadline = time.monotonic() + 30  # waits for the server to see the disconnect (an event, not a timing)
    while srv.server.metrics.get("errors_total") == errors0 and time.monotonic() < deadline:
        time.sleep(0.02)
    status, body = raw(srv, "POST", "/v1/completions", {"model": "src", "prompt": "a", "max_tokens": 2}, token=None)
    assert status == 200, body
    assert not [r for r in records if r.levelno >= 40], [r.getMessage() for r in records]
