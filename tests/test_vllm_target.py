"""The vLLM deploy target's client against a local HTTP server speaking vLLM's LoRA routes.

This checks our side of the protocol (what is sent, how refusals read, where requests go);
`python -m mtllm_locally.bench scaleout` runs it against a real vLLM."""

import pytest

from mtllm_locally.errors import AdapterLoadError, InvalidRequestError
from mtllm_locally.serve.vllm_target import VLLMError, VLLMTarget
from vllm_fake import FakeVLLM


@pytest.fixture
def fake():
    with FakeVLLM(base="base") as f:
        yield f


@pytest.fixture
def peft_dir(tmp_path):
    d = tmp_path / "v3" / "peft"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_deploy_serve_unload_round_trip(fake, peft_dir, monkeypatch):
    server = fake.url
    monkeypatch.setenv("HTTP_PROXY", "http://198.51.100.1:9")  # must not be used
    monkeypatch.setenv("http_proxy", "http://198.51.100.1:9")
    target = VLLMTarget(server + "/v1/", api_key="k")  # the OpenAI route is accepted as the base
    assert target.api_base == server + "/v1" and target.litellm_model("route-v3") == "hosted_vllm/route-v3"
    target.deploy("route-v3", peft_dir)
    assert fake.requests[-1] == ("POST", "/v1/load_lora_adapter",
                                  {"lora_name": "route-v3", "lora_path": str(peft_dir.resolve())}, "Bearer k")
    assert target.served_models() == ["base", "route-v3"]
    target.unload("route-v3")
    assert target.served_models() == ["base"]
    assert target.healthy()


def test_refusals_name_the_server_and_the_cause(fake, peft_dir, tmp_path):
    target = VLLMTarget(fake.url)
    target.deploy("a", peft_dir)
    with pytest.raises(AdapterLoadError, match="already been loaded.*unload it first"):
        target.deploy("a", peft_dir)
    with pytest.raises(AdapterLoadError, match="not a PEFT adapter directory"):
        target.deploy("b", tmp_path)
    with pytest.raises(VLLMError, match="did not unload adapter 'zzz'.*HTTP 404"):
        target.unload("zzz")
    fake.runtime_lora = False
    with pytest.raises(AdapterLoadError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        target.deploy("c", peft_dir)


def test_unreachable_servers_redirects_and_bad_urls(fake):
    with pytest.raises(InvalidRequestError):
        VLLMTarget("ftp://127.0.0.1:1")
    dead = VLLMTarget("http://127.0.0.1:1", timeout=2)
    with pytest.raises(VLLMError, match="not reachable"):
        dead.served_models()
    assert not dead.healthy()
    # a redirect is not followed: the reply stays the 302 itself
    status, _ = VLLMTarget(fake.url)._request("GET", "/elsewhere")
    assert status == 302 and [c[1] for c in fake.requests] == ["/elsewhere"]
