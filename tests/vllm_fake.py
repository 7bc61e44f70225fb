"""An in-process HTTP server speaking the part of vLLM's OpenAI server we use: /v1/models,
runtime LoRA loading, /v1/chat/completions (JSON and SSE). Tests of the deploy path and of
routing run against it; `python -m mtllm_locally.bench scaleout` runs the real vLLM."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeVLLM:
    """`answer(model, body) -> str` decides each chat answer (default: names the model)."""

    def __init__(self, base: str = "base-f32", answer=None):
        self.base = base
        self.loaded: dict[str, str] = {}       # name -> the path it was loaded from
        self.requests: list[tuple[str, str, dict | None, str | None]] = []  # method, path, body, Authorization
        self.answer = answer or (lambda model, body: f"answer from {model}")
        self.fail_load = False                 # refuse every load (HTTP 400)
        self.fail_chat = False                 # every chat answers HTTP `fail_status`
        self.fail_status = 500
        self.fail_next = 0                     # only the next n chats fail
        self.finish_reason = "stop"            # what every answer says it ended with
        self.break_stream_after = None         # close a stream after this many chunks
        self.down = False                      # every request answers 503
        self.runtime_lora = True               # False: started without VLLM_ALLOW_RUNTIME_LORA_UPDATING (404)
        fake = self

        class Handler(BaseHTTPRequestHandler):
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
                fake.requests.append(("GET", self.path, None, self.headers.get("Authorization")))
                if fake.down:
                    return self._reply(503, {"error": {"message": "down"}})
                if self.path == "/v1/models":
                    return self._reply(200, {"data": [{"id": n, "root": fake.loaded.get(n, fake.base)}
                                                      for n in [fake.base, *fake.loaded]]})
                if self.path == "/health":
                    return self._reply(200, {})
                if self.path == "/elsewhere":  # a redirect our client must not follow
                    self.send_response(302)
                    self.send_header("Location", "http://198.51.100.1/stolen")
                    self.end_headers()
                    return
                self._reply(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                fake.requests.append(("POST", self.path, body, self.headers.get("Authorization")))
                if fake.down:
                    return self._reply(503, {"error": {"message": "down"}})
                if not fake.runtime_lora and self.path.endswith("_lora_adapter"):
                    return self._reply(404, {"detail": "Not Found"})
                if self.path == "/v1/load_lora_adapter":
                    if fake.fail_load:
                        return self._reply(400, {"error": {"message": "Loading lora failed: bad rank"}})
                    if body["lora_name"] in fake.loaded:
                        return self._reply(400, {"error": {"message": f"The lora adapter '{body['lora_name']}' "
                                                                      "has already been loaded."}})
                    fake.loaded[body["lora_name"]] = body["lora_path"]
                    return self._reply(200, {})
                if self.path == "/v1/unload_lora_adapter":
                    if fake.loaded.pop(body["lora_name"], None) is None:
                        return self._reply(404, {"error": {"message": "not found"}})
                    return self._reply(200, {})
                if self.path == "/v1/chat/completions":
                    return self._chat(body)
                self._reply(404, {"detail": "Not Found"})

            def _chat(self, body):
                model = body.get("model")
                if model != fake.base and model not in fake.loaded:
                    return self._reply(404, {"error": {"message": f"The model `{model}` does not exist."}})
                if fake.fail_chat or fake.fail_next > 0:
                    fake.fail_next -= 1
                    return self._reply(fake.fail_status, {"error": {"message": f"failed with {fake.fail_status}"}})
                text = fake.answer(model, body)
                usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
                if not body.get("stream"):
                    return self._reply(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                                             "model": model, "usage": usage,
                                             "choices": [{"index": 0, "finish_reason": fake.finish_reason,
                                                          "message": {"role": "assistant", "content": text}}]})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
                for i, piece in enumerate(pieces):
                    if fake.break_stream_after is not None and i >= fake.break_stream_after:
                        return  # the connection ends mid-answer
                    self._event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}, model)
                self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": fake.finish_reason}]}, model)
                self._event({"choices": [], "usage": usage}, model)
                self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, obj, model):
                obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": model, **obj}
                self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def chats(self, model: str | None = None) -> list[dict]:
        return [b for m, p, b, _ in self.requests
                if p == "/v1/chat/completions" and (model is None or b["model"] == model)]

    def forget(self) -> None:
        """What a restart does to runtime-loaded adapters."""
        self.loaded.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
