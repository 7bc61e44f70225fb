"""A vLLM server as a deploy target: our PEFT adapters, loaded into it at run time.

    target = VLLMTarget("http://127.0.0.1:8000")
    target.deploy("route-v3", ".mtllm_locally/adapters/route-1a2b/v3/peft")
    litellm.completion(model=target.litellm_model("route-v3"), api_base=target.api_base, messages=...)

The server must serve the base the adapter was trained on (`mtllm-locally export-hf`), run
with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, and read `peft_dir` from its
own file system: vLLM loads adapters by path, not by upload.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

from ..errors import AdapterLoadError, InvalidRequestError, MtllmError


class VLLMError(MtllmError):
    """The vLLM server could not be reached, or refused a request."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would send the request (and the API key) to wherever the server points;
    # this client talks to the configured base_url only.
    def redirect_request(self, *args, **kwargs):
        return None


def server_root(base_url: str) -> str:
    """The server's root URL: the key a target is known by (in the store, in routing)."""
    url = urllib.parse.urlsplit(str(base_url).strip())
    if url.scheme not in ("http", "https") or not url.hostname:
        raise InvalidRequestError(f"vLLM base_url must be http(s)://host[:port], not {base_url!r}")
    if url.username or url.password:  # it would be stored, logged and shown as the server's name
        raise InvalidRequestError("vLLM base_url must not carry credentials; name the variable holding the API "
                                  "key in vllm.api_key_env")
    # Accept the server root or its OpenAI route: both are what people copy from vLLM's docs.
    path = url.path.rstrip("/").removesuffix("/v1")
    return urllib.parse.urlunsplit((url.scheme, url.netloc, path, "", ""))


class VLLMTarget:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0):
        self.base_url = server_root(base_url)
        self.api_key = api_key
        self.timeout = timeout
        # No proxies from the environment (HTTP_PROXY and the like): adapter paths and the key
        # stay between us and the server, and a local server stays reachable behind a proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    @property
    def api_base(self) -> str:
        """What LiteLLM's `api_base` must be for `hosted_vllm/...` models."""
        return self.base_url + "/v1"

    def litellm_model(self, name: str) -> str:
        return f"hosted_vllm/{name}"

    def deploy(self, name: str, peft_dir: str | os.PathLike, server_path: str | None = None) -> None:
        """Load the PEFT adapter at `peft_dir` under `name`; it serves as model `name` once this
        returns. `server_path`: where the server sees that directory, if not at the same path."""
        local = os.path.abspath(os.fspath(peft_dir))
        if not os.path.isfile(os.path.join(local, "adapter_config.json")):
            raise AdapterLoadError(f"{local} is not a PEFT adapter directory (no adapter_config.json)")
        path = server_path or local
        status, body = self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status != 200:
            hint = ""
            if status == 404:
                hint = " (is the server running with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True?)"
            elif "already been loaded" in body:
                hint = " (a name serves one adapter: unload it first, or deploy under a new name)"
            raise AdapterLoadError(f"vLLM at {self.base_url} refused adapter {name!r} from {path}: "
                                   f"HTTP {status}: {_short(body)}{hint}")

    def unload(self, name: str) -> None:
        status, body = self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status != 200:
            raise VLLMError(f"vLLM at {self.base_url} did not unload adapter {name!r}: HTTP {status}: {_short(body)}")

    def served_models(self) -> list[str]:
        """The base model and every adapter the server serves now, by the names requests use."""
        status, body = self._request("GET", "/v1/models")
        if status != 200:
            raise VLLMError(f"vLLM at {self.base_url}: GET /v1/models: HTTP {status}: {_short(body)}")
        try:
            return [m["id"] for m in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError):
            raise VLLMError(f"vLLM at {self.base_url}: GET /v1/models: not a model list: {_short(body)}") from None

    def chat_prompt_ids(self, name: str, messages: list[dict]) -> list[int]:
        """The prompt ids the server makes of `messages` (its chat template and tokenizer): where
        they differ from the engine's, an adapter trained on our prompts sees other prompts there."""
        status, body = self._request("POST", "/tokenize", {"model": name, "messages": messages,
                                                            "add_generation_prompt": True})
        if status != 200:
            raise VLLMError(f"vLLM at {self.base_url}: POST /tokenize: HTTP {status}: {_short(body)}")
        try:
            return [int(t) for t in json.loads(body)["tokens"]]
        except (ValueError, KeyError, TypeError):
            raise VLLMError(f"vLLM at {self.base_url}: POST /tokenize: not a token list: {_short(body)}") from None

    def healthy(self) -> bool:
        try:
            return self._request("GET", "/health", timeout=5.0)[0] == 200
        except VLLMError:
            return False

    def _request(self, method: str, path: str, payload: dict | None = None,
                 timeout: float | None = None) -> tuple[int, str]:
        headers = {"Accept": "application/json"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:  # the server answered: its reply is the error's substance
            return e.code, e.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise VLLMError(f"vLLM at {self.base_url} is not reachable ({method} {path}): {reason}") from None


def _short(body: str, limit: int = 500) -> str:
    """The server's message: vLLM wraps it as {"error": {"message": ...}} or {"message": ...}."""
    try:
        obj = json.loads(body)
        msg = obj.get("error", obj) if isinstance(obj, dict) else obj
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        body = msg if isinstance(msg, str) else json.dumps(msg)
    except ValueError:
        pass
    body = " ".join(body.split())
    return body if len(body) <= limit else body[:limit] + "..."
