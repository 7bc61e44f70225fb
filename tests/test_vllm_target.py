"""The vLLM deploy target's client against a local HTTP server speaking vLLM's LoRA routes.

This checks our side of the protocol (what is sent, how refusals read, where requests go);
`python -m mtllm_locally.bench scaleout` runs it against a real vLLM."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mtllm_locally.errors import AdapterLoadError, InvalidRequestError
from mtllm_locally.serve.vllm_target import VLLMError, VLLMTarget


class FakeVLLM(BaseHTTPRequestHandler):
    loaded: dict = {}
    calls: list = []
    runtime_lora = True

    def log_message(self, *args):
        pass

    def _reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.calls.append(("GET", self.path, None, self.headers.get("Authorization")))
        if self.path == "/v1/models":
            return self._reply(200, {"data": [{"id": "base"}] + [{"id": n} for n in self.loaded]})
        if self.path == "/health":
            return self._reply(200, {})
        if self.path == "/elsewhere":
            self.send_response(302)
            self.send_header("Location", "http://198.51.100.1/stolen")
            self.end_headers()
            return
        self._reply(404, {"detail": "Not Found"})

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(("POST", self.path, payload, self.headers.get("Authorization")))
        if not self.runtime_lora:
            return self._reply(404, {"detail": "Not Found"})
        if self.path == "/v1/load_lora_adapter":
            if payload["lora_name"] in self.loaded:
                return self._reply(400, {"error": {"message": f"The lora adapter '{payload['lora_name']}' has already been loaded."}})
            self.loaded[payload["lora_name"]] = payload["lora_path"]
            return self._reply(200, {})
        if self.path == "/v1/unload_lora_adapter":
            if self.loaded.pop(payload["lora_name"], None) is None:
                return self._reply(404, {"message": "not found"})
            return self._reply(200, {})
        self._reply(404, {"detail": "Not Found"})


@pytest.fixture
def server():
    FakeVLLM.loaded, FakeVLLM.calls, FakeVLLM.runtime_lora = {}, [], True
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def peft_dir(tmp_path):
    d = tmp_path / "v3" / "peft"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_deploy_serve_unload_round_trip(server, peft_dir, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://198.51.100.1:9")  # must not be used
    monkeypatch.setenv("http_proxy", "http://198.51.100.1:9")
    target = VLLMTarget(server + "/v1/", api_key="k")  # the OpenAI route is accepted as the base
    assert target.api_base == server + "/v1" and target.litellm_model("route-v3") == "hosted_vllm/route-v3"
    target.deploy("route-v3", peft_dir)
    assert FakeVLLM.calls[-1] == ("POST", "/v1/load_lora_adapter",
                                  {"lora_name": "route-v3", "lora_path": str(peft_dir.resolve())}, "Bearer k")
    assert target.served_models() == ["base", "route-v3"]
    target.unload("route-v3")
    assert target.served_models() == ["base"]
    assert target.healthy()


def test_refusals_name_the_server_and_the_cause(server, peft_dir, tmp_path):
    target = VLLMTarget(server)
    target.deploy("a", peft_dir)
    with pytest.raises(AdapterLoadError, match="already been loaded.*unload it first"):
        target.deploy("a", peft_dir)
    with pytest.raises(AdapterLoadError, match="not a PEFT adapter directory"):
        target.deploy("b", tmp_path)
    with pytest.raises(VLLMError, match="did not unload adapter 'zzz'.*HTTP 404"):
        target.unload("zzz")
    FakeVLLM.runtime_lora = False
    with pytest.raises(AdapterLoadError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        target.deploy("c", peft_dir)


def test_unreachable_servers_redirects_and_bad_urls(server):
    with pytest.raises(InvalidRequestError):
        VLLMTarget("ftp://127.0.0.1:1")
    dead = VLLMTarget("http://127.0.0.1:1", timeout=2)
    with pytest.raises(VLLMError, match="not reachable"):
        dead.served_models()
    assert not dead.healthy()
    # a redirect is not followed: the reply stays the 302 itself
    status, _ = VLLMTarget(server)._request("GET", "/elsewhere")
    assert status == 302 and [c[1] for c in FakeVLLM.calls] == ["/elsewhere"]
