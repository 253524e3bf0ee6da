"""serve.py: the OpenAI-compatible server, tested with the real openai client against servers on 127.0.0.1.

The servers run a tiny hybrid model (SSM + windowed attention blocks, random weights) saved to disk: most
in this process (uvicorn in a thread, built by serve.py's own build()), one as a real subprocess that
is killed with SIGKILL. Every greedy output is compared with StreamingGenerator, the single-stream
reference, fed the whole text from scratch (so: with the prefix cache == without it).
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from spikelm import SpikeLMConfig, SpikeLMForCausalLM, StreamingGenerator  # noqa: E402
from spikelm.data import CHAT_TEMPLATE, train_bpe_tokenizer  # noqa: E402
from spikelm.eval.loading import load_model  # noqa: E402
from spikelm.models import CACHE_NAME  # noqa: E402
from spikelm.serving import (ChatFormat, Engine, GenerationRequest, IncrementalDetokenizer, StateStore,  # noqa: E402
                             StopMatcher, model_fingerprint)
from spikelm.serving.text import encode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import serve  # noqa: E402

TEXT = ["the spiking neuron fires when its membrane crosses the threshold. " * 3,
        "a language model predicts the next token from the ones before it. " * 3] * 20
MODEL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, attention_window=6, ssm_expand=2, mlp_ratio=2,
             block_types=["ssm", "attention", "ssm", "attention"])
NAME = "tiny"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # serve.py --threads 1 sets it too; restored after


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_bpe_tokenizer(TEXT, vocab_size=300)
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(SpikeLMConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id, **MODEL))
    d = tmp_path_factory.mktemp("model") / NAME
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def reference(model_dir):
    model, tok = load_model(model_dir)
    return model, tok


def wait_for(url: str, timeout: float, proc=None) -> None:
    host, port = url.split("//")[1].split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no server at {url} after {timeout} s")


class InProcessServer:
    """serve.py's app (serve.build) under uvicorn in a thread of this process."""

    def __init__(self, model_dir, state_dir, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = serve.parse_args(["--model", str(model_dir), "--port", str(self.port), "--state_dir", str(state_dir),
                                 "--threads", "1", *extra])
        self.app, _ = serve.build(args)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(self.url, 60)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def killable(model_dir, tmp_path_factory):
    """A serve.py subprocess, started now so that its start-up overlaps the other tests."""
    port = free_port()
    state_dir = tmp_path_factory.mktemp("killable_states")
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--port", str(port),
                             "--state_dir", str(state_dir), "--threads", "1", "--log_level", "warning"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    yield proc, f"http://127.0.0.1:{port}", state_dir
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, killable):
    srv = InProcessServer(model_dir, tmp_path_factory.mktemp("states"), "--max_batch", "32")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


# -- references ---------------------------------------------------------------------------------------
def reference_text(reference, ids, max_tokens, seed=None, **sampling) -> tuple[str, int]:
    """(text, tokens generated) of StreamingGenerator from a fresh state: what the server must return."""
    model, tok = reference
    params = {"temperature": 0.0, **sampling}
    gen = StreamingGenerator(model, tok, seed=seed, **params)
    gen.feed_ids(ids)
    detok = IncrementalDetokenizer(tok)
    tokens = list(gen.generate(max_tokens))
    return "".join(detok.add(t) for t in tokens) + detok.flush(), len(tokens)


def chat_ids(reference, messages, generation_prompt: bool = True) -> list[int]:
    return ChatFormat(reference[1]).prompt(messages, generation_prompt).ids


def text_ids(reference, text) -> list[int]:
    return encode(reference[1], text)


def health(url) -> dict:
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def raw(url, method, path, body=None, headers=None) -> tuple[int, dict]:
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    try:
        return resp.status, json.loads(payload)
    except json.JSONDecodeError:
        return resp.status, {"raw": payload.decode(errors="replace")}


# -- the API ------------------------------------------------------------------------------------------
def test_models_health_and_playground_page(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    h = health(server.url)
    assert h["status"] == "ok" and h["model"] == NAME
    status, page = raw(server.url, "GET", "/")
    assert status == 200 and "SpikeLM playground" in page["raw"] and "http" not in page["raw"].split("<script>")[0]


def test_completion_stream_and_not_equal_the_streaming_generator(client, reference):
    prompt = "the spiking neuron"
    want, n = reference_text(reference, text_ids(reference, prompt), 24)
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert out.choices[0].text == want
    assert out.choices[0].finish_reason == ("length" if n == 24 else "stop")
    assert out.usage.prompt_tokens == len(text_ids(reference, prompt)) and out.usage.completion_tokens == n
    assert out.model_extra["state_bytes"] > 0 and out.model_extra["state_saved"] is True
    pieces = []
    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        pieces += [c.text for c in chunk.choices]
    assert "".join(pieces) == want and usage.completion_tokens == n
    # a repeated prompt resumes one token before its end
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_chat_stream_and_not_and_cached_tokens_on_the_second_turn(client, reference):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "the threshold"}]
    want, _ = reference_text(reference, chat_ids(reference, messages), 16)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(chat_ids(reference, messages))
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    # turn 2 resends the history: it resumes from the state kept at the end of the reply
    history = messages + [{"role": "assistant", "content": want}, {"role": "user", "content": "and then?"}]
    want2, _ = reference_text(reference, chat_ids(reference, history), 16)
    stream = client.chat.completions.create(model=NAME, messages=history, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage, roles = [], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles.append(c.delta.role)
            pieces.append(c.delta.content or "")
    assert "".join(pieces) == want2, "greedy output with the prefix cache differs from the output without it"
    assert roles[0] == "assistant"
    turn1 = len(chat_ids(reference, messages + [{"role": "assistant", "content": want}], False))
    assert usage.prompt_tokens == len(chat_ids(reference, history))
    assert usage.prompt_tokens_details.cached_tokens == turn1 - 1


def test_stop_sequences_and_seeded_sampling(client, reference):
    prompt = "a language model"
    full, _ = reference_text(reference, text_ids(reference, prompt), 16)
    stop = full[8:10]
    cut = full.index(stop)
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "\x00zz"])
    assert out.choices[0].text == full[:cut] and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == full[:cut]
    # sampling: a seed gives the StreamingGenerator's draws, whatever else runs in the batch
    want, _ = reference_text(reference, text_ids(reference, prompt), 12, seed=7, temperature=0.9, top_p=0.9, top_k=40)
    for _ in range(2):
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.9, seed=7,
                                        extra_body={"top_k": 40})
        assert out.choices[0].text == want


def test_16_concurrent_streams_each_equal_its_solo_run(server, client, reference):
    prompts = [f"the {w} neuron fires" for w in ("spiking", "dynamic", "decay", "model", "token", "membrane", "next",
                                                  "language", "threshold", "ones", "before", "it", "when", "a",
                                                  "crosses", "predicts")]
    lengths = [6 + i for i in range(16)]
    wants = [reference_text(reference, text_ids(reference, p), n)[0] for p, n in zip(prompts, lengths)]
    before = health(server.url)["engine"]
    got = [None] * 16

    def run(i):
        stream = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                           stream=True)
        got[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == wants
    after = health(server.url)["engine"]
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    assert steps < tokens / 3, f"{tokens} tokens took {steps} decode steps: the streams were not batched"


BAD = [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "seed": "s"}, 400, "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "seed": 2**63}, 400, "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "spike " * 200}, 400, "prompt"),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "session_id": "../etc/passwd"}, 400, "session_id"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400,
     "tools"),
]


@pytest.fixture(scope="module")
def strict_server(model_dir, tmp_path_factory):
    """A server with an API key, one slot and a short prompt limit."""
    srv = InProcessServer(model_dir, tmp_path_factory.mktemp("strict_states"), "--api_key", "sekrit", "--max_batch",
                          "1", "--max_prompt_tokens", "100")
    yield srv
    srv.stop()


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_a_4xx_in_openais_shape(strict_server, path, body, status, param):
    code, out = raw(strict_server.url, "POST", path, body, {"Authorization": "Bearer sekrit"})
    assert code == status, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert err["param"] == param


def test_the_server_stays_up_after_bad_input_and_the_client_sees_errors(strict_server):
    client = strict_server.client(api_key="sekrit")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert client.completions.create(model=NAME, prompt="x", max_tokens=3).usage.completion_tokens == 3


def test_int8_flag_sets_the_model_or_names_the_conflict(model_dir, tmp_path, capsys, monkeypatch):
    assert serve.main(["--model", str(model_dir), "--state_dir", str(tmp_path), "--sparse", "off", "--int8"]) == 2
    err = capsys.readouterr().err
    assert "--int8" in err and "--sparse" in err
    calls = []
    real = SpikeLMForCausalLM.set_sparse_inference
    monkeypatch.setattr(SpikeLMForCausalLM, "set_sparse_inference",
                        lambda self, mode="auto", int8=False: calls.append((mode, int8)) or real(self, mode, int8))
    serve.build(serve.parse_args(["--model", str(model_dir), "--state_dir", str(tmp_path), "--sparse", "on",
                                  "--int8"]))  # the app only: its engine starts with the server
    assert calls == [("on", True)]
    model, _ = load_model(str(model_dir), "cpu", None)  # int8 states differ from float ones: never the same key
    before = model_fingerprint(model)
    model.set_sparse_inference("on")
    assert model_fingerprint(model) == before
    model.set_sparse_inference("on", int8=True)
    assert model_fingerprint(model) != before


def test_api_key_guards_every_endpoint_but_health(strict_server):
    url = strict_server.url
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions", {"model": NAME, "prompt": "x"}),
                               ("POST", "/v1/chat/completions", {"model": NAME, "messages": []}),
                               ("GET", "/v1/sessions/abc", None), ("DELETE", "/v1/sessions/abc", None)]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            code, out = raw(url, method, path, body, headers)
            assert code == 401 and out["error"]["code"] == "invalid_api_key", (method, path, headers)
    assert raw(url, "GET", "/health")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        strict_server.client(api_key="wrong").models.list()
    assert strict_server.client(api_key="sekrit").models.list().data[0].id == NAME


def test_a_disconnected_stream_frees_its_slot(strict_server):
    """One slot (--max_batch 1): a client that walks away mid-stream must not keep it."""
    host, port = "127.0.0.1", strict_server.port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "the", "max_tokens": 1_000_000,
                                                        "stream": True, "ignore_eos": True}),
                 {"Content-Type": "application/json", "Authorization": "Bearer sekrit"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event: it is generating

    def holding():  # decoding, or parked (this client reads no more, so its backlog grows)
        engine = health(strict_server.url)["engine"]
        return engine["running"] + engine["parked"]

    deadline = time.monotonic() + 20
    while holding() != 1 and time.monotonic() < deadline:  # stats are as of the engine's last iteration
        time.sleep(0.05)
    assert holding() == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 20
    while holding() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert holding() == 0
    out = strict_server.client(api_key="sekrit").completions.create(model=NAME, prompt="x", max_tokens=4, timeout=30)
    assert out.usage.completion_tokens == 4


# -- sessions -----------------------------------------------------------------------------------------------
def session_reference(reference, turns, max_tokens) -> list[str]:
    """One StreamingGenerator carried across turns: feed each turn's ids, generate (every token is fed back)."""
    model, tok = reference
    gen = StreamingGenerator(model, tok, temperature=0.0)
    out = []
    for ids in turns:
        gen.feed_ids(ids)
        detok = IncrementalDetokenizer(tok)
        out.append("".join(detok.add(t) for t in gen.generate(max_tokens)) + detok.flush())
    return out


def test_sessions_append_without_resending_history(server, client, reference):
    turns = ["the spiking neuron", " fires when", " its membrane"]
    wants = session_reference(reference, [text_ids(reference, t) for t in turns], 10)
    seen = 0
    for turn, want in zip(turns, wants):
        out = client.completions.create(model=NAME, prompt=turn, max_tokens=10, temperature=0,
                                        extra_body={"session_id": "sess-1"})
        assert out.choices[0].text == want
        assert out.usage.prompt_tokens_details.cached_tokens == max(0, seen - 1)
        assert out.model_extra["session_id"] == "sess-1"
        seen = out.usage.prompt_tokens + out.usage.completion_tokens
    code, info = raw(server.url, "GET", "/v1/sessions/sess-1")
    assert code == 200 and info["tokens"] == seen and info["state_bytes"] > 0
    # chat messages append to a session too (each request sends only its new messages)
    msgs = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "more"}]]
    wants = session_reference(reference, [chat_ids(reference, m) for m in msgs], 8)
    for m, want in zip(msgs, wants):
        out = client.chat.completions.create(model=NAME, messages=m, max_tokens=8, temperature=0,
                                             extra_body={"session_id": "chat_2"})
        assert out.choices[0].message.content == want
    assert raw(server.url, "DELETE", "/v1/sessions/sess-1") == (200, {"id": "sess-1", "object": "session",
                                                                      "deleted": True})
    assert raw(server.url, "GET", "/v1/sessions/sess-1")[0] == 404
    assert raw(server.url, "DELETE", "/v1/sessions/sess-1")[0] == 404
    assert raw(server.url, "DELETE", "/v1/sessions/a.b")[0] == 400
    # the deleted session starts afresh
    out = client.completions.create(model=NAME, prompt=turns[0], max_tokens=10, temperature=0,
                                    extra_body={"session_id": "sess-1"})
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_a_busy_session_is_a_409(server, client):
    stream = client.completions.create(model=NAME, prompt="the", max_tokens=100_000, temperature=0, stream=True,
                                       extra_body={"session_id": "busy", "ignore_eos": True})
    next(iter(stream))
    with pytest.raises(openai.ConflictError):
        client.completions.create(model=NAME, prompt="x", max_tokens=2, extra_body={"session_id": "busy"})
    assert raw(server.url, "DELETE", "/v1/sessions/busy")[0] == 409
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if raw(server.url, "DELETE", "/v1/sessions/busy")[0] == 200:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the session stayed busy after its client left")


def test_a_bad_seed_is_a_400_and_the_running_stream_completes(server, client, reference):
    prompt = "the spiking neuron"
    want = reference_text_no_eos(reference, text_ids(reference, prompt), 64)
    stream = iter(client.completions.create(model=NAME, prompt=prompt, max_tokens=64, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    pieces = [next(stream).choices[0].text]
    code, out = raw(server.url, "POST", "/v1/completions", {"model": NAME, "prompt": "x", "seed": 2**70,
                                                             "session_id": "bad-seed"})
    assert code == 400 and out["error"]["param"] == "seed", out
    pieces += [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces) == want
    out = client.completions.create(model=NAME, prompt="x", max_tokens=2, extra_body={"session_id": "bad-seed"})
    assert out.usage.completion_tokens == 2  # the session was never reserved


# -- persistence ----------------------------------------------------------------------------------------------
def test_kill_9_loses_no_conversation(killable, model_dir, reference):
    proc, url, state_dir = killable
    wait_for(url, 180, proc)
    first = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "the spiking neuron"}]
    reply = first.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    reply = reply.choices[0].message.content
    s1 = first.completions.create(model=NAME, prompt="a language", max_tokens=6, temperature=0,
                                  extra_body={"session_id": "kept"})
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = InProcessServer(model_dir, state_dir)  # a fresh start on the same state folder
    try:
        client = again.client()
        history = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "go on"}]
        out = client.chat.completions.create(model=NAME, messages=history, max_tokens=12, temperature=0)
        turn1 = len(chat_ids(reference, messages + [{"role": "assistant", "content": reply}], False))
        assert out.usage.prompt_tokens_details.cached_tokens == turn1 - 1
        assert out.choices[0].message.content == reference_text(reference, chat_ids(reference, history), 12)[0]
        s2 = client.completions.create(model=NAME, prompt=" model", max_tokens=6, temperature=0,
                                       extra_body={"session_id": "kept"})
        want = session_reference(reference, [text_ids(reference, "a language"), text_ids(reference, " model")], 6)
        assert [s1.choices[0].text, s2.choices[0].text] == want
    finally:
        again.stop()


def make_states(model, tok, directory, prompts):
    store = StateStore(directory, model_fingerprint(model))
    engine = Engine(model, tok, store)
    engine.start()
    for p in prompts:
        ids = encode(tok, p)
        read_all(engine.submit(GenerationRequest(ids, 4, boundaries=[(len(ids), False)])))
    engine.stop()
    store.close()


def test_corrupt_or_foreign_state_files_are_skipped_with_a_warning(reference, tmp_path, caplog):
    model, tok = reference
    prompts = ["the spiking neuron fires", "a language model predicts", "the threshold crosses"]
    make_states(model, tok, tmp_path, prompts)
    files = sorted((tmp_path / "prefix").glob("*.safetensors"))
    assert len(files) == 3
    flipped, truncated, foreign = files
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF  # a tensor byte: the checksum catches it when the state is read
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-9])
    foreign.write_bytes(foreign.read_bytes().replace(model_fingerprint(model).encode(), b"0" * 32))
    (tmp_path / "prefix" / "junk.safetensors").write_bytes(b"not a state")
    caplog.set_level("WARNING", logger="spikelm.serving")
    store = StateStore(tmp_path, model_fingerprint(model))
    assert store.skipped == {"foreign": 1, "corrupt": 2}  # the truncated file and the junk, at start-up
    hits = [store.longest_prefix(encode(tok, p), 100)[0] for p in prompts]
    assert hits == [0, 0, 0], "a damaged or foreign state was used"
    assert store.skipped["corrupt"] == 3  # the flipped byte, when it was read
    text = caplog.text
    assert "another model" in text and "checksum mismatch" in text and text.count("is corrupt") == 3
    store.close()


def test_states_spill_to_disk_and_chains_keep_o1_states(reference, tmp_path):
    model, tok = reference
    store = StateStore(tmp_path, model_fingerprint(model), memory_budget=1)  # nothing stays in memory
    ids = encode(tok, "the spiking neuron fires when its membrane crosses the threshold")
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True)[CACHE_NAME]
    store.put_prefix(ids, cache.select([0]))[1].result()
    store.flush()
    assert store.stats()["memory_bytes"] == 0
    n, back, _ = store.longest_prefix(ids + [5], 100)
    assert n == len(ids)
    for a, b in zip(back.state_dict()[0].values(), cache.state_dict()[0].values()):
        assert torch.equal(a, b)
    # a chain of 8 states, each computed from the one before: only the last three are kept
    parent = None
    for k in range(1, 9):
        parent, fut = store.put_prefix(ids[:k], cache.select([0]), parent)
        fut.result()
    store.flush()
    kept = sorted(e.tokens for e in store._prefix.values())
    assert kept == [6, 7, 8, len(ids)]
    assert len(list((tmp_path / "prefix").glob("*.safetensors"))) == 4
    store.close()


def one_state(reference, text):
    model, tok = reference
    ids = encode(tok, text)
    with torch.no_grad():
        return ids, model(torch.tensor([ids]), use_cache=True)[CACHE_NAME]


def test_disk_bytes_count_each_file_once_across_session_commits(reference, tmp_path):
    model, _ = reference
    ids, cache = one_state(reference, "the spiking neuron fires")
    store = StateStore(tmp_path, model_fingerprint(model))
    store.put_prefix(ids, cache)[1].result()
    for k in range(5):
        assert store.commit_session("s", cache, k).result()
        store.flush()
        on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*.safetensors"))
        assert store.stats()["disk_bytes"] == on_disk, f"after commit {k + 1}"
    store.close()


def test_a_deleted_branch_no_longer_keeps_its_parent(reference, tmp_path):
    """Two conversations branch from R. Once one branch's state is deleted (its chain moved on), R has one child
    left, and the other chain prunes it like any other link."""
    model, _ = reference
    ids, cache = one_state(reference, "the spiking neuron fires when its membrane crosses the threshold")
    store = StateStore(tmp_path, model_fingerprint(model))

    def put(n, parent):
        key, fut = store.put_prefix(ids[:n], cache, parent)
        fut.result()
        return key

    root = put(1, None)
    x1, x2 = put(2, root), put(3, root)
    put(6, put(5, put(4, x2)))  # x2's chain: x2 is deleted, 3 links back
    assert x2 not in store._prefix and store._prefix[root].children == 1
    put(8, put(7, x1))  # x1's chain reaches root, 3 links back
    assert root not in store._prefix
    store.close()


def test_a_state_file_deleted_meanwhile_is_a_plain_miss(reference, tmp_path, caplog):
    model, _ = reference
    ids, cache = one_state(reference, "the spiking neuron fires")
    store = StateStore(tmp_path, model_fingerprint(model), memory_budget=1)  # states are read from their files
    key = store.put_prefix(ids, cache)[0]
    store.flush()
    caplog.set_level("WARNING", logger="spikelm.serving")
    entry = store._prefix[key]
    with store._lock:
        store._delete(entry)  # what _trim_disk does between a lookup and its load
    store.flush()
    assert store._load(entry) is None
    store.put_prefix(ids, cache)[1].result()
    (tmp_path / "prefix" / f"{key}.safetensors").unlink()
    assert store.longest_prefix(ids + [5], 100)[0] == 0
    assert key not in store._prefix and store.skipped["corrupt"] == 0 and "corrupt" not in caplog.text
    assert not list(tmp_path.rglob("*.corrupt"))
    store.close()


def test_a_damaged_session_is_removed_and_starts_again_empty(reference, tmp_path):
    model, tok = reference
    store = StateStore(tmp_path, model_fingerprint(model), memory_budget=1)  # the session is read from its file
    engine = Engine(model, tok, store)
    engine.start()
    try:
        ids = encode(tok, "the spiking")
        store.acquire_session("s")
        assert read_to_end(engine.submit(GenerationRequest(ids, 4, session_id="s")))[1][0] == "done"
        path = tmp_path / "sessions" / "s.safetensors"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        store.acquire_session("s")
        _, end = read_to_end(engine.submit(GenerationRequest(ids, 4, session_id="s")))
        assert end[0] == "error" and "has been removed" in end[1][1] and "starts again empty" in end[1][1]
        assert store.session_info("s") is None  # what the message says: the session is gone
        assert store.acquire_session("s") == 0
        _, end = read_to_end(engine.submit(GenerationRequest(ids, 4, session_id="s")))
        assert end[0] == "done" and end[1]["cached_tokens"] == 0
    finally:
        engine.stop()
        store.close()


# -- the engine's scheduling --------------------------------------------------------------------------------
def test_a_client_that_stops_reading_is_parked_not_waited_for(reference):
    model, tok = reference
    engine = Engine(model, tok, None, max_backlog=4)
    engine.start()
    try:
        slow_ids, fast_ids = encode(tok, "the spiking"), encode(tok, "a language")
        slow = engine.submit(GenerationRequest(slow_ids, 40, ignore_eos=True))
        fast = engine.submit(GenerationRequest(fast_ids, 40, ignore_eos=True))
        text = read_all(fast)  # the fast client reads everything, the slow one nothing
        deadline = time.monotonic() + 10
        while engine.stats()["parked"] != 1 and time.monotonic() < deadline:  # as of the engine's last iteration
            time.sleep(0.05)
        assert engine.stats()["parked"] == 1 and slow.backlog <= 5
        slow_text = read_all(slow)
        assert slow_text == reference_text_no_eos(reference, slow_ids, 40)
        assert text == reference_text_no_eos(reference, fast_ids, 40)
    finally:
        engine.stop()


def test_a_request_that_cannot_start_fails_alone_and_frees_its_session(reference, tmp_path):
    """A seed torch.Generator refuses (the API refuses it first; the engine must not depend on that)."""
    model, tok = reference
    store = StateStore(tmp_path, model_fingerprint(model))
    engine = Engine(model, tok, store)
    ids = encode(tok, "the spiking")
    good = engine.submit(GenerationRequest(ids, 20, ignore_eos=True))
    store.acquire_session("s")
    bad = engine.submit(GenerationRequest(ids, 20, seed=2**70, session_id="s"))
    engine.start()  # both are admitted in one iteration, the good one first
    try:
        text, end = read_to_end(good, 30)
        assert end[0] == "done" and text == reference_text_no_eos(reference, ids, 20)
        _, end = read_to_end(bad, 30)
        assert end[0] == "error" and end[1][0] == 500 and "ValueError" in end[1][1]
        assert store.acquire_session("s") == 0  # released, not left busy
    finally:
        engine.stop()
        store.close()


def test_an_engine_failure_completes_replies_whose_end_state_is_pending(reference, tmp_path):
    """The reply was sent, the state at its end is still being read (the client's text is not the model's
    tokens): when the engine fails then, the reply completes without that state instead of hanging."""
    model, tok = reference
    store = StateStore(tmp_path, model_fingerprint(model))
    engine = Engine(model, tok, store)
    other = encode(tok, "a language model predicts the next token")
    ch = engine.submit(GenerationRequest(encode(tok, "the spiking"), 4, end_ids=lambda text: other))
    prefill = engine._prefill

    def failing_prefill(budget):
        if any(t.end for t in engine._prefills):
            raise RuntimeError("injected engine failure")
        prefill(budget)

    engine._prefill = failing_prefill
    engine.start()
    try:
        _, end = read_to_end(ch, 20)
        assert end[0] == "done" and end[1]["completion_tokens"] == 4 and end[1]["state_saved"] is False
        assert not store.has_prefix(other[:-1])
    finally:
        engine.stop()
        store.close()


def test_a_state_that_cannot_be_written_is_reported_and_kept_in_memory(reference, tmp_path, monkeypatch, caplog):
    model, tok = reference
    store = StateStore(tmp_path, model_fingerprint(model), memory_budget=1)  # only unsaved states stay in memory
    engine = Engine(model, tok, store)
    engine.start()
    turns = [encode(tok, t) for t in ("the spiking", " neuron fires", " when")]

    def turn(ids):
        store.acquire_session("s")
        return read_to_end(engine.submit(GenerationRequest(ids, 4, session_id="s")))[1]

    try:
        assert turn(turns[0])[1]["state_saved"] is True
        caplog.set_level("WARNING", logger="spikelm.serving")
        with monkeypatch.context() as m:
            m.setattr("safetensors.torch.save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
            info = turn(turns[1])[1]
        assert info["state_saved"] is False and "state_saved: false" in caplog.text
        assert not (tmp_path / "sessions" / "s.safetensors").exists()  # the previous state's file is not kept
        assert store.stats()["disk_bytes"] == sum(f.stat().st_size for f in tmp_path.rglob("*.safetensors"))
        seen = info["prompt_tokens"] + info["completion_tokens"]
        info = turn(turns[2])[1]  # resumes from the state in memory
        assert info["state_saved"] is True and info["cached_tokens"] == seen - 1 and store.skipped["corrupt"] == 0
    finally:
        engine.stop()
        store.close()


def test_fresh_prompts_are_read_together_and_keep_their_states(reference, tmp_path):
    """Prompts that start fresh share one left-padded prefill, cut where a row keeps a state; each row's output
    and kept states are its own."""
    model, tok = reference
    store = StateStore(tmp_path, model_fingerprint(model))
    engine = Engine(model, tok, store)
    texts = ["the spiking neuron fires when", "a model", "its membrane crosses the threshold, then fires again"]
    prompts = [encode(tok, t) for t in texts]
    reqs = [GenerationRequest(ids, 8, boundaries=[(len(ids) // 2, True), (len(ids), False)]) for ids in prompts]
    channels = [engine.submit(r) for r in reqs]  # queued before the engine starts: one group
    engine.start()
    try:
        got = [read_all(ch) for ch in channels]
        assert engine.counters["prompt_tokens"] == sum(map(len, prompts)) and engine.counters["grouped_prefills"] == 1
        assert got == [reference_text(reference, ids, 8)[0] for ids in prompts]
        for ids in prompts:
            for b in (len(ids) // 2, len(ids)):
                n, cache, _ = store.longest_prefix(ids[:b - 1] + [0], b - 1)
                assert n == b - 1 and int(cache.positions[0]) == b - 1
        # a kept state is the row's own: resuming from it continues exactly
        longer = prompts[2] + encode(tok, " and again")
        again = GenerationRequest(longer, 8)
        ch = engine.submit(again)
        assert read_all(ch) == reference_text(reference, longer, 8)[0]
        assert engine.counters["cached_tokens"] == len(prompts[2]) - 1
    finally:
        engine.stop()
        store.close()


def read_all(channel, timeout=60) -> str:
    return read_to_end(channel, timeout)[0]


def read_to_end(channel, timeout=60) -> tuple[str, tuple]:
    """(the text, the last event: ("done", info) or ("error", (status, message)))."""
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        t, events = channel.get_sync(1)
        text += t
        end = next((e for e in events if e[0] in ("done", "error")), None)
        if end is not None:
            return text, end
    raise TimeoutError("the request did not finish")


def reference_text_no_eos(reference, ids, n) -> str:
    model, tok = reference
    gen = StreamingGenerator(model, tok, temperature=0.0, stop_at_eos=False)
    gen.feed_ids(ids)
    detok = IncrementalDetokenizer(tok)
    return "".join(detok.add(t) for t in gen.generate(n)) + detok.flush()


# -- text handling --------------------------------------------------------------------------------------------
def test_chat_template_is_saved_with_trained_tokenizers_and_renders_incrementally(model_dir, reference):
    tok = reference[1]
    assert tok.chat_template == CHAT_TEMPLATE  # saved by save_pretrained, loaded back
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    eos = tok.eos_token
    assert text == f"System:\nBe brief.{eos}User:\nHello{eos}Assistant:\nHi there{eos}User:\nBye{eos}Assistant:\n"
    chat = ChatFormat(tok)
    full = chat.prompt(messages)
    assert full.ids[:full.boundaries[1]] == chat.prompt(messages[:2], add_generation_prompt=False).ids
    assert full.system_end == full.boundaries[0] and len(full.boundaries) == 4
    assert tok.decode(full.ids) == text


def test_incremental_detokenizer_and_stop_matcher(reference):
    tok = reference[1]
    text = "the spiking neuron — fires when its membrane crosses ünïcödé thresholds."
    ids = encode(tok, text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 5
    stopper = StopMatcher(["STOP", "xy"])
    out = [stopper.add(p) for p in ["ab", "cS", "TO", "Pzz"]]
    assert "".join(out) == "abc" and stopper.stopped
    stopper = StopMatcher(["END"])  # holds back the last 2 characters: they may start "END"
    assert [stopper.add("aE"), stopper.add("N"), stopper.add("x"), stopper.flush()] == ["", "a", "E", "Nx"]
    assert not stopper.stopped


# -- the playground, in a real browser -------------------------------------------------------------------------
def test_playground_chats_through_the_api_in_headless_chromium(server, reference, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from playground_screenshot import CHROMIUM, launch, open_playground, send

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = open_playground(browser, server.url, max_tokens=12, temperature=0)
            assert page.text_content("#model") == NAME
            history = [{"role": "user", "content": "the spiking neuron"}]
            first = send(page, history[0]["content"])
            assert first["reply"] == reference_text(reference, chat_ids(reference, history), 12)[0]
            assert first["cached"] == "0" and first["state"].endswith("KiB") and first["tps"] != "–"
            history += [{"role": "assistant", "content": first["reply"]}, {"role": "user", "content": "and then"}]
            second = send(page, "and then")  # the page resends the history: the server resumes its state
            assert second["reply"] == reference_text(reference, chat_ids(reference, history), 12)[0]
            assert int(second["cached"]) == len(chat_ids(reference, history[:2], False)) - 1
            assert int(second["prompt_tokens"]) == len(chat_ids(reference, history))
            page.check("#session")  # a new chat whose state the server keeps under a session id
            send(page, "hello")
            third = send(page, "more")
            assert int(third["cached"]) > 0 and third["state"] == first["state"]
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        finally:
            browser.close()
