"""The OpenAI-compatible server, exercised with the official openai client."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from glm5conv.runtime import load_model
from glm5conv.runtime.tokenizer import ByteTokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from glm5conv.server import create_app  # noqa: E402


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, bundled: Path) -> Path:
    """The bundled checkpoint plus a byte-level tokenizer (ids 0..255 are the bytes)."""
    path = tmp_path_factory.mktemp("served") / "tiny"
    shutil.copytree(bundled, path)
    ByteTokenizer(0, {}).save(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    loaded = load_model(checkpoint, device="cpu")
    port = free_port()
    config = uvicorn.Config(
        create_app(loaded, speculative_num_steps=2), host="127.0.0.1", port=port, log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield loaded, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused"), port
    srv.should_exit = True
    thread.join(timeout=10)


def test_models_and_health(server) -> None:
    _, client, port = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert json.loads(http_get(f"http://127.0.0.1:{port}/health")) == {"status": "ok"}


def test_completion_equals_the_library(server) -> None:
    loaded, client, _ = server
    prompt = [5, 17, 200, 33, 9]
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    expected = loaded.generate(prompt, 20, speculative_num_steps=2)
    extra = response.model_extra["glm5conv"]
    assert extra["token_ids"] == expected.token_ids
    assert response.choices[0].text == loaded.tokenizer.decode(expected.token_ids)
    assert response.usage.prompt_tokens == 5 and response.usage.completion_tokens == len(expected.token_ids)
    assert extra["accept_lengths"] and extra["mean_accept_length"] >= 1


def test_text_prompt_and_streaming(server) -> None:
    loaded, client, _ = server
    full = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=24, temperature=0)
    chunks = list(
        client.completions.create(model="tiny", prompt="def f(x):", max_tokens=24, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and len(chunks) > 2


def test_chat_completion_and_streaming(server) -> None:
    _, client, _ = server
    messages = [{"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == full.choices[0].message.content


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server) -> None:
    _, client, _ = server
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=[1, 2], max_tokens=0)
    assert "max_tokens" in str(info.value)
    with pytest.raises(openai.BadRequestError, match="token ids must be in"):
        client.completions.create(model="tiny", prompt=[1, 99999], max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt=[1, 2], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    assert client.completions.create(model="tiny", prompt=[1, 2], max_tokens=3, temperature=0).choices[0].finish_reason


def test_concurrent_requests_are_never_mixed(server) -> None:
    loaded, client, _ = server
    prompts = [[3 + i, 40 + 7 * i, 99, 2 * i + 1] for i in range(8)]

    def ask(i: int) -> list[int]:
        r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=16, temperature=0.8, seed=100 + i)
        return r.model_extra["glm5conv"]["token_ids"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    for i, tokens in enumerate(got):
        assert tokens == loaded.generate(prompts[i], 16, 0.8, 2, seed=100 + i).token_ids


def test_metrics(server) -> None:
    _, client, port = server
    client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=8, temperature=0)
    text = http_get(f"http://127.0.0.1:{port}/metrics")
    values = dict(line.split() for line in text.splitlines() if line and not line.startswith("#"))
    assert float(values["glm5conv_requests_total"]) >= 1
    assert float(values["glm5conv_tokens_per_second"]) > 0
    assert float(values["glm5conv_mean_accept_length"]) >= 1


def test_serve_binds_loopback_by_default(checkpoint: Path) -> None:
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "glm5conv", "serve", str(checkpoint), "--port", str(port), "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                http_get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("server did not start")
        listening = [line for line in Path("/proc/net/tcp").read_text().splitlines()[1:] if f":{port:04X} " in line]
        assert listening and all(line.split()[1].startswith("0100007F:") for line in listening)  # 127.0.0.1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_trained_checkpoint_serves_with_mtp() -> None:
    """bundled:tiny-glm5-trained (MXFP4 by amd-quark, a real MTP layer) through the openai client."""
    from glm5conv.bundled import bundled_path

    loaded = load_model(bundled_path("tiny-glm5-trained"), device="cpu")
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(loaded, speculative_num_steps=3), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        response = client.completions.create(
            model="tiny-glm5-trained", prompt="import os\n\n\ndef main(", max_tokens=64, temperature=0
        )
        assert response.choices[0].text and response.model_extra["glm5conv"]["mean_accept_length"] > 1.5
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
