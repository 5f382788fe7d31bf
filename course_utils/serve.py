"""Serving the exported model: a local OpenAI-compatible server, clients, a gateway, vLLM commands,
and a bounded load test (lesson 07).

Every server here binds 127.0.0.1 unless told otherwise, is started with an argument list (never a
shell string), and is stopped by its process id — :class:`Server` is a context manager, so it stops
even when the code using it fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LOCALHOST = "127.0.0.1"


class ServeError(RuntimeError):
    """A server did not start, or a request failed; the message says which and why."""


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A child process serving HTTP on ``host:port``; ``with`` it to be sure it stops."""

    name: str
    command: list[str]
    host: str
    port: int
    health_path: str
    env: dict = field(default_factory=dict, repr=False)  # may hold a key: never printed
    health_headers: dict = field(default_factory=dict, repr=False)
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 120.0) -> Server:
        """Start the process and poll ``health_path`` until it answers 200 (or fail with its log).

        Refused while this server's process runs (a second one could not bind the port, while the first
        answered the health check for it and was then never stopped). Anything that interrupts the wait
        (an error, Ctrl-C) stops the new process before it propagates."""
        if self.process is not None and self.process.poll() is None:
            raise ServeError(f"{self.name} is already running (pid {self.process.pid}): stop() it first")
        log = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".log", delete=False)
        self.log_path = Path(log.name)
        self.process = subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        log.close()
        import atexit

        atexit.register(self.stop)  # a crashed notebook or test run leaves no server behind
        try:
            if self._wait_healthy(timeout):
                return self
        except BaseException:  # an error or Ctrl-C while waiting: the new process goes too
            self.stop(keep_log=True)
            raise
        tail = self.log_tail()
        self.stop(keep_log=True)
        raise ServeError(
            f"{self.name} did not answer {self.health_path} within {timeout:.0f} s (log: {self.log_path}):\n"
            f"{tail}"
        )

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeError(
                    f"{self.name} exited with code {self.process.returncode} before answering:\n"
                    f"{self.log_tail()}"
                )
            try:
                request = urllib.request.Request(self.url + self.health_path, headers=self.health_headers)
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200 and self.process.poll() is None:  # ours answered, not another
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.3)
        return False

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0, keep_log: bool = False) -> None:
        """SIGTERM the process group by pid, then SIGKILL if it does not exit in ``timeout`` s.

        A server that was running when stopped leaves no log file behind (``keep_log=True`` keeps it);
        one that had already died keeps its log for the post-mortem.
        """
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)
        except ProcessLookupError:
            pass
        if not keep_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self if self.process else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def llama_server(
    model: str | os.PathLike,
    mmproj: str | os.PathLike | None = None,
    alias: str = "receipts",
    host: str = LOCALHOST,
    port: int | None = None,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    api_key_env: str | None = None,
    n_gpu_layers: int = 0,
) -> Server:
    """llama-cpp-python's OpenAI-compatible server for an exported GGUF (not started yet).

    One model, one request at a time: concurrent requests wait in line (``--interrupt_requests False``;
    the default would end a stream early whenever another request arrives). With ``mmproj`` images
    work (data URIs) and are formatted with the model's own template. With ``api_key_env`` the server
    requires that environment variable's value as bearer token (the key itself never appears in the
    command line or in logs).
    """
    threads = n_threads or max(1, (os.cpu_count() or 2) - 1)
    port = port or free_port(host)
    command = [
        sys.executable,
        "-m",
        "course_utils.llama_server",
        "--model",
        str(model),
        "--model_alias",
        alias,
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        # llama_cpp.server's default lets a new request cut off the one streaming: queue instead
        "--interrupt_requests",
        "False",
    ]
    if mmproj:
        command += ["--clip_model_path", str(mmproj)]
    if n_gpu_layers:  # -1: every layer on the GPU (a llama-cpp-python built with CUDA)
        command += ["--n_gpu_layers", str(n_gpu_layers)]
    env, headers = {}, {}
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ServeError(f"${api_key_env} is empty; set it (or pass api_key_env=None for no key)")
        env["API_KEY"] = (
            key  # llama_cpp.server reads its settings from the environment: no key on the command line
        )
        headers["Authorization"] = f"Bearer {key}"
    return Server("llama.cpp-server", command, host, port, "/v1/models", env, headers)


# --- Clients -------------------------------------------------------------------------------------


def client(base_url: str, api_key: str | None = None, timeout: float = 120.0):
    """An ``openai.OpenAI`` client for any OpenAI-compatible endpoint (``…/v1``)."""
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout, max_retries=0)


def chat(api, model: str, messages: list[dict], **kwargs) -> str:
    """One chat completion; image parts may hold paths or PIL images (sent as data URIs)."""
    from course_utils.chat import openai_messages

    response = api.chat.completions.create(model=model, messages=openai_messages(messages), **kwargs)
    return response.choices[0].message.content or ""


def stream_chat(api, model: str, messages: list[dict], reasoning: bool = False, **kwargs):
    """Yield the reply's text pieces as the server sends them. With ``reasoning``, a reasoning model's
    trace pieces (``reasoning_content``; ``reasoning`` on newer vLLM) are yielded too, as they come."""
    from course_utils.chat import openai_messages

    stream = api.chat.completions.create(
        model=model, messages=openai_messages(messages), stream=True, **kwargs
    )
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if reasoning:
            trace = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
            if trace:
                yield trace
        if delta.content:
            yield delta.content


def ollama_running(base_url: str = "http://127.0.0.1:11434") -> bool:
    try:
        with urllib.request.urlopen(base_url + "/api/version", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ollama_chat_payload(model: str, messages: list[dict], temperature: float = 0.15) -> dict:
    """Ollama's native ``/api/chat`` body: images as base64 strings on the message, not data URIs.

    Image parts may be the course's (``image``/``path``: a path, URL or PIL image) or OpenAI's
    (``image_url``); a part of another kind is an error that names it, never dropped."""
    import base64
    import io

    from course_utils.chat import load_image

    out = []
    for i, m in enumerate(messages):
        content, images = m["content"], []
        if isinstance(content, list):
            texts = []
            for j, p in enumerate(content):
                kind = p.get("type")
                if kind == "text":
                    texts.append(p["text"])
                elif kind in ("image", "image_url"):
                    source = p.get("image") or p.get("path") or p.get("url") or p.get("image_url")
                    source = source.get("url") if isinstance(source, dict) else source
                    buffer = io.BytesIO()
                    load_image(source).save(buffer, format="PNG")
                    images.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
                else:
                    raise ValueError(
                        f"messages[{i}].content[{j}]: a {kind!r} part cannot be sent to Ollama's /api/chat "
                        "(text and images only)"
                    )
            content = "\n\n".join(texts)
        out.append({"role": m["role"], "content": content, **({"images": images} if images else {})})
    return {"model": model, "messages": out, "stream": False, "options": {"temperature": temperature}}


def ollama_chat(
    model: str, messages: list[dict], base_url: str = "http://127.0.0.1:11434", timeout: float = 300
) -> str:
    """Chat through Ollama's native API (only where an Ollama server runs). An error reply (a model not
    pulled: 404) raises :class:`ServeError` with Ollama's own message."""
    data = json.dumps(ollama_chat_payload(model, messages)).encode()
    request = urllib.request.Request(
        base_url + "/api/chat", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["message"]["content"]
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", "replace")
        try:
            said = json.loads(body).get("error", body)
        except (json.JSONDecodeError, AttributeError):
            said = body
        raise ServeError(f"Ollama answered {error.code} for model {model!r}: {str(said)[:300]}") from None


# --- vLLM ----------------------------------------------------------------------------------------

VLLM_FORMATS = ("mistral", "hf", "adapter")


def vllm_command(
    model_key: str,
    weights: str = "mistral",
    model_path: str | None = None,
    adapter_path: str | None = None,
    adapter_name: str = "receipts",
    tensor_parallel: int = 1,
    max_model_len: int = 32768,
    host: str = LOCALHOST,
    port: int = 8000,
    lora_rank: int | None = None,
    max_images: int = 4,
) -> list[str]:
    """A ``vllm serve`` argument list.

    ``weights``: ``"mistral"`` — official weights in Mistral's own format (``consolidated.safetensors``,
    ``params.json``, ``tekken.json``): tokenizer/config/load format ``mistral``, as Mistral's model cards
    say; ``"hf"`` — a merged fine-tune saved by transformers (``model_path``); ``"adapter"`` — the official
    base plus your LoRA adapter, hot-loaded with ``--enable-lora --lora-modules``; ``--max-lora-rank`` is
    the adapter's own ``r`` (from its ``adapter_config.json``, or ``lora_rank``) rounded up to a rank vLLM
    accepts. Small 4 gets ``--reasoning-parser mistral`` so its ``[THINK]`` part comes back apart
    (``reasoning_content``), not inside the answer.
    """
    from course_utils.profiles import MODELS

    if weights not in VLLM_FORMATS:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(VLLM_FORMATS)}")
    spec = MODELS[model_key]
    _check_tensor_parallel(spec, tensor_parallel)
    if max_model_len > spec.context_length:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds {spec.display_name}'s context of {spec.context_length}"
        )
    if weights == "hf":
        if not model_path:
            raise ValueError("weights='hf' needs model_path (the merged folder from lesson 06)")
        cmd = ["vllm", "serve", model_path]
    else:
        cmd = [
            "vllm",
            "serve",
            spec.hf_id,
            "--tokenizer-mode",
            "mistral",
            "--config-format",
            "mistral",
            "--load-format",
            "mistral",
        ]
    if weights == "adapter":
        if not adapter_path:
            raise ValueError("weights='adapter' needs adapter_path (lesson 04's adapter folder)")
        cmd += [
            "--enable-lora",
            "--lora-modules",
            f"{adapter_name}={adapter_path}",
            "--max-lora-rank",
            str(_vllm_lora_rank(adapter_path, lora_rank)),
        ]
    cmd += [
        "--served-model-name",
        adapter_name if weights == "hf" else spec.key,
        "--max-model-len",
        str(max_model_len),
        "--tensor-parallel-size",
        str(tensor_parallel),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if spec.vision:
        cmd += ["--limit-mm-per-prompt", json.dumps({"image": max_images})]
    cmd += ["--tool-call-parser", "mistral", "--enable-auto-tool-choice"] if weights != "hf" else []
    if spec.text_model_type == "mistral4":
        cmd += ["--reasoning-parser", "mistral"]
    return cmd


def _check_tensor_parallel(spec, tensor_parallel: int) -> None:
    """vLLM splits the attention heads across the GPUs: their count must divide evenly."""
    if tensor_parallel < 1 or spec.num_attention_heads % tensor_parallel:
        raise ValueError(
            f"tensor_parallel={tensor_parallel} must divide {spec.display_name}'s "
            f"{spec.num_attention_heads} attention heads"
        )


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts


def _vllm_lora_rank(adapter_path: str, lora_rank: int | None) -> int:
    if lora_rank is None:
        config = Path(adapter_path) / "adapter_config.json"
        if not config.is_file():
            raise ValueError(
                f"{config} not found: is {adapter_path} a peft adapter folder? (or pass lora_rank)"
            )
        rank = json.loads(config.read_text()).get("r")
        if not isinstance(rank, int):
            raise ValueError(f"{config} has no integer 'r' (the LoRA rank): pass lora_rank")
        lora_rank = rank
    fitting = [r for r in VLLM_LORA_RANKS if r >= lora_rank]
    if not fitting:
        raise ValueError(
            f"LoRA rank {lora_rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})"
        )
    return fitting[0]


def vllm_memory(
    model_key: str,
    max_model_len: int = 32768,
    tensor_parallel: int = 1,
    bytes_per_weight: float | None = None,
    concurrent_sequences: int = 1,
) -> dict:
    """Per-GPU GiB for weights and a full KV cache (from the config), and the GPU class that fits.

    Tensor parallelism splits the weights, and GQA's KV heads down to one head per GPU (a GPU beyond the
    head count holds a copy); MLA caches one latent per token that every rank keeps whole (vLLM's MLA
    cache has a single "head"), so Small 4's cache does not shrink with more GPUs.
    """
    import math

    from course_utils.profiles import MODELS

    spec = MODELS[model_key]
    _check_tensor_parallel(spec, tensor_parallel)
    bytes_per_weight = spec.served_bytes_per_weight if bytes_per_weight is None else bytes_per_weight
    weights = spec.total_params_b * 1e9 * bytes_per_weight / 2**30 / tensor_parallel
    if spec.attention == "MLA":
        kv_share = 1.0
    else:
        kv_share = math.ceil(spec.num_key_value_heads / tensor_parallel) / spec.num_key_value_heads
    kv = spec.kv_cache_bytes_per_token() * max_model_len * concurrent_sequences / 2**30 * kv_share
    total = (weights + kv) / 0.9  # vLLM's default gpu_memory_utilization is 0.9
    fits = next((f"{g} GB" for g in (24, 48, 80, 141) if total <= g * 0.93), "more than one 141 GB GPU")
    return {
        "weights_gib": round(weights, 1),
        "kv_cache_gib": round(kv, 1),
        "per_gpu_gib": round(total, 1),
        "fits": fits,
    }


# --- LiteLLM gateway -----------------------------------------------------------------------------


def litellm_config(
    backends: list[dict], master_key_env: str = "LITELLM_MASTER_KEY", log_requests: bool = True
) -> dict:
    """A LiteLLM proxy config: one public model name per backend, keys from the environment, rate limits.

    ``backends``: ``{"name", "kind": "openai"|"ollama", "api_base", "model", "rpm"?, "api_key_env"?}``.
    Keys are written as ``os.environ/NAME`` references, never as values.
    """
    model_list = []
    for b in backends:
        if b["kind"] == "openai":
            params = {
                "model": f"openai/{b['model']}",
                "api_base": b["api_base"],
                "api_key": f"os.environ/{b['api_key_env']}" if b.get("api_key_env") else "not-needed",
            }
        elif b["kind"] == "ollama":
            params = {"model": f"ollama_chat/{b['model']}", "api_base": b["api_base"]}
        else:
            raise ValueError(
                f"backend {b.get('name')!r}: kind must be 'openai' or 'ollama', got {b['kind']!r}"
            )
        params["rpm"] = int(b.get("rpm", 60))
        params["timeout"] = int(b.get("timeout", 120))
        model_list.append({"model_name": b["name"], "litellm_params": params})
    return {
        "model_list": model_list,
        "router_settings": {"num_retries": 1, "timeout": 120},
        "litellm_settings": {"drop_params": True, "set_verbose": False, "json_logs": log_requests},
        "general_settings": {"master_key": f"os.environ/{master_key_env}"},
    }


def litellm_proxy(
    config_path: str | os.PathLike, master_key: str, host: str = LOCALHOST, port: int | None = None
) -> Server:
    """A real ``litellm`` proxy in front of the configured backends (not started yet).

    ``master_key`` is exported under the name the config's ``general_settings.master_key:
    os.environ/NAME`` reads (:func:`litellm_config` writes it); a config without one would serve every
    request unauthenticated and is refused, as is a key written into the file itself.
    """
    import yaml

    config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    if not master_key or not master_key.strip():
        raise ValueError("master_key is empty: the proxy would accept every request (pass a key, e.g. sk-…)")
    reference = str((config.get("general_settings") or {}).get("master_key") or "")
    where = f"{Path(config_path).name}: general_settings.master_key"
    if not reference:
        raise ValueError(f"{where} is not set: the proxy would accept every request (use litellm_config)")
    if not reference.startswith("os.environ/"):
        raise ValueError(f"{where} holds a key in the file: write os.environ/NAME and pass the key here")
    port = port or free_port(host)
    command = [
        str(Path(sys.executable).with_name("litellm")),
        "--config",
        str(config_path),
        "--host",
        host,
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {
        reference.removeprefix("os.environ/"): master_key,
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "DISABLE_SCHEMA_UPDATE": "True",
        "LITELLM_TELEMETRY": "False",
    }
    return Server("litellm-proxy", command, host, port, "/health/liveliness", env)


# --- Load test -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    latencies: list[float]
    ttfts: list[float]
    tokens: list[int]
    errors: list[str]
    wall_seconds: float

    def summary(self) -> dict:
        """Counts, error rate, latency and time-to-first-token percentiles, tokens/s. The percentiles are
        over the requests that succeeded: read them with ``error_rate`` (an overloaded server that times
        out its slowest requests shows a *lower* p95). Tokens and the first token include a reasoning
        model's trace (``reasoning_content``): the server generated them."""
        import numpy as np

        n = len(self.latencies) + len(self.errors)
        lat = np.array(self.latencies) if self.latencies else np.array([float("nan")])
        ttft = np.array(self.ttfts) if self.ttfts else np.array([float("nan")])
        return {
            "requests": n,
            "errors": len(self.errors),
            "error_rate": round(len(self.errors) / max(1, n), 3),
            "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
            "p95_latency_s": round(float(np.percentile(lat, 95)), 3),
            "p50_ttft_s": round(float(np.percentile(ttft, 50)), 3),
            "p95_ttft_s": round(float(np.percentile(ttft, 95)), 3),
            "tokens_per_s": round(sum(self.tokens) / self.wall_seconds, 1),
            "wall_s": round(self.wall_seconds, 2),
        }

    def plot(self):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        axes[0].hist(self.latencies, bins=20, color="C0")
        axes[0].set_title("latency per request (s)")
        axes[1].hist(self.ttfts, bins=20, color="C1")
        axes[1].set_title("time to first token (s)")
        for ax, values in zip(axes, (self.latencies, self.ttfts)):
            if values:
                import numpy as np

                for q, style in ((50, "--"), (95, ":")):
                    ax.axvline(np.percentile(values, q), color="k", linestyle=style, label=f"p{q}")
                ax.legend()
        fig.tight_layout()
        return fig


def load_test(
    base_url: str,
    model: str,
    prompts: list[list[dict]],
    concurrency: int = 8,
    requests: int = 64,
    max_tokens: int = 64,
    api_key: str | None = None,
    timeout: float = 120.0,
    progress: bool = True,
) -> LoadResult:
    """``requests`` streamed chat completions from ``concurrency`` threads, cycling through ``prompts``.

    Bounded: it stops after ``requests`` requests whatever happens; each failure is recorded, not raised.
    Tokens are counted as streamed chunks of content or reasoning trace (one token per chunk on
    llama.cpp and vLLM).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("load_test needs at least one prompt (a list of chat messages)")
    if requests < 1 or concurrency < 1:
        raise ValueError(f"requests and concurrency must be at least 1, got {requests} and {concurrency}")
    api = client(base_url, api_key, timeout)
    latencies, ttfts, tokens, errors = [], [], [], []
    lock = threading.Lock()

    def one(i: int) -> None:
        started = time.perf_counter()
        first, count = None, 0
        try:
            for _ in stream_chat(
                api, model, prompts[i % len(prompts)], reasoning=True, max_tokens=max_tokens, temperature=0.0
            ):
                count += 1
                if first is None:
                    first = time.perf_counter() - started
            with lock:
                latencies.append(time.perf_counter() - started)
                ttfts.append(first if first is not None else time.perf_counter() - started)
                tokens.append(count)
        except Exception as error:  # noqa: BLE001 — a load test records failures
            with lock:
                errors.append(f"request {i}: {type(error).__name__}: {str(error)[:120]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(tqdm(pool.map(one, range(requests)), total=requests, desc="load test", disable=not progress))
    return LoadResult(latencies, ttfts, tokens, errors, time.perf_counter() - started)


# --- Structured output and tool calling (lesson 08) ------------------------------------------------

TOOL_CHAT_FORMAT = "mistral-tools"  # course_utils.llama_server registers the handler under this name
_SCHEMA_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"


def llama_tool_server(model: str | os.PathLike, alias: str = "tools", **kwargs) -> Server:
    """:func:`llama_server` with the course's Mistral tool-calling chat format: requests take OpenAI
    ``tools``, replies carry OpenAI ``tool_calls`` parsed from the model's ``[TOOL_CALLS]`` output."""
    server = llama_server(model, alias=alias, **kwargs)
    server.command += ["--chat_format", TOOL_CHAT_FORMAT]
    return server


REASONING_CHAT_FORMAT = "mistral-reasoning"  # course_utils.llama_server registers it (Small 4)


def llama_reasoning_server(
    model: str | os.PathLike, reasoning_effort: str | None = "high", alias: str = "reasoning", **kwargs
) -> Server:
    """:func:`llama_server` for Small 4 with its reasoning switch set server-wide (as llama.cpp's own
    server does with ``--chat-template-kwargs``): replies carry the ``[THINK]`` trace apart as
    ``reasoning_content`` and the answer as ``content`` — what vLLM's ``--reasoning-parser mistral``
    returns. ``reasoning_effort``: ``"none"``, ``"high"`` or ``None`` (the template's default)."""
    if reasoning_effort not in (None, "none", "high"):
        raise ValueError(f"reasoning_effort must be 'none', 'high' or None, got {reasoning_effort!r}")
    server = llama_server(model, alias=alias, **kwargs)
    server.command += ["--chat_format", REASONING_CHAT_FORMAT]
    if reasoning_effort is not None:
        server.command += ["--reasoning_effort", reasoning_effort]
    return server


def llama_cpp_response_format(schema: dict) -> dict:
    """llama-cpp-python's JSON-schema mode: the schema becomes a grammar that constrains sampling.
    Source: https://llama-cpp-python.readthedocs.io/en/latest/#json-and-json-schema-mode (2026-11-29);
    its server takes ``type: "json_object"`` plus ``schema``
    (``llama_types.ChatCompletionRequestResponseFormat``).
    """
    return {"type": "json_object", "schema": schema}


def vllm_structured_request(
    model: str, messages: list[dict], schema: dict, name: str = "receipt", max_tokens: int = 256
) -> dict:
    """A ``/v1/chat/completions`` body for vLLM with OpenAI's ``response_format: json_schema``, which
    vLLM enforces with its structured-output backend. Source: https://docs.vllm.ai/en/latest/features/
    structured_outputs.html (2026-11-29)."""
    if not name or len(name) > 64 or any(c not in _SCHEMA_NAME_CHARS for c in name):
        raise ValueError(f"schema name {name!r}: use 1–64 of a-z, A-Z, 0-9, _ and - (OpenAI's rule)")
    return {
        "model": model,
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
    }


def ollama_structured_request(model: str, messages: list[dict], schema: dict) -> dict:
    """Ollama's native ``/api/chat`` body with ``format`` set to a JSON schema (structured outputs).
    Source: https://github.com/ollama/ollama/blob/main/docs/api.md#chat-request-structured-outputs
    (2026-11-29)."""
    return {
        "model": model,
        "messages": messages,
        "stream": False,
        "format": schema,
        "options": {"temperature": 0},
    }


def check_openai_structured_request(body: dict) -> list[str]:
    """Problems with a chat body's ``response_format`` against the ``openai`` package's own types
    (the documented shape vLLM follows); empty if it conforms."""
    import jsonschema
    from openai.types.shared_params import ResponseFormatJSONSchema
    from pydantic import TypeAdapter, ValidationError

    problems = []
    for key in ("model", "messages"):
        if key not in body:
            problems.append(f"missing {key!r}")
    response_format = body.get("response_format")
    if response_format is None:
        return [*problems, "missing 'response_format'"]
    try:
        TypeAdapter(ResponseFormatJSONSchema).validate_python(response_format)
    except ValidationError as error:
        problems += [f"response_format.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
        return problems
    schema = response_format["json_schema"].get("schema")
    try:
        jsonschema.Draft202012Validator.check_schema(schema or {})
    except jsonschema.SchemaError as error:
        problems.append(f"response_format.json_schema.schema is not a JSON schema: {error.message}")
    return problems


def check_ollama_structured_request(body: dict) -> list[str]:
    """Problems with an Ollama ``/api/chat`` body against its documented fields; empty if it conforms."""
    import jsonschema

    problems = [f"missing {k!r}" for k in ("model", "messages") if k not in body]
    known = {"model", "messages", "tools", "format", "options", "stream", "keep_alive", "think"}
    problems += [f"unknown field {k!r} (Ollama ignores it)" for k in body if k not in known]
    for i, message in enumerate(body.get("messages", [])):
        if message.get("role") not in ("system", "user", "assistant", "tool"):
            problems.append(f"messages[{i}].role {message.get('role')!r} is not system/user/assistant/tool")
        if not isinstance(message.get("content"), str):
            problems.append(f"messages[{i}].content must be a string (images go in 'images')")
    fmt = body.get("format")
    if fmt is None:
        problems.append("missing 'format'")
    elif fmt != "json":
        if not isinstance(fmt, dict):
            problems.append("format must be 'json' or a JSON schema object")
        else:
            try:
                jsonschema.Draft202012Validator.check_schema(fmt)
            except jsonschema.SchemaError as error:
                problems.append(f"format is not a JSON schema: {error.message}")
    return problems
