"""A gradio demo in front of any OpenAI-compatible endpoint: chat, image upload, streaming (lesson 07).

Binds 127.0.0.1 with ``share=False`` unless you ask otherwise; optional login from the environment
(``DEMO_USER`` / ``DEMO_PASSWORD``) — never from the code or the notebook.
"""

from __future__ import annotations

import os

TITLE = "Receipts extractor — local demo"


def to_messages(message: dict | str, history: list, system: str | None = None) -> list[dict]:
    """Gradio's multimodal message + history (``messages`` format) → course chat messages.

    Files in the current message become image parts (paths; the client sends them as data URIs).
    Earlier turns keep their text.
    """
    out = [{"role": "system", "content": system}] if system else []
    for turn in history or []:
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, list):
            content = "\n\n".join(
                c.get("text", "") if isinstance(c, dict) else str(c)
                for c in content
                if not isinstance(c, dict) or c.get("type", "text") == "text"
            )
        if isinstance(content, str) and content and turn.get("role") in ("user", "assistant"):
            if out and out[-1]["role"] == turn["role"]:  # gradio splits a file and its text into two turns
                out[-1]["content"] += "\n\n" + content
            else:
                out.append({"role": turn["role"], "content": content})
    if isinstance(message, str):
        message = {"text": message, "files": []}
    files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
    parts = [{"type": "image", "image": f} for f in files if f]
    text = message.get("text") or ""
    out.append({"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text})
    return out


def responder(
    base_url: str,
    model: str = "receipts",
    api_key: str | None = None,
    system: str | None = None,
    max_tokens: int = 256,
):
    """The chat function behind the demo: streams the reply from the endpoint in the box.

    The box is editable, so ``api_key`` (a gateway's master key) goes only to ``base_url`` itself; any
    other endpoint a visitor types is called without it — the key never leaves for a URL you did not set.
    """
    from course_utils import serve

    def respond(message, history, endpoint, temp):
        own = endpoint.rstrip("/") == base_url.rstrip("/")
        api = serve.client(endpoint, api_key if own else None)
        reply = ""
        for piece in serve.stream_chat(
            api, model, to_messages(message, history, system), temperature=float(temp), max_tokens=max_tokens
        ):
            reply += piece
            yield reply

    return respond


def build_demo(
    base_url: str,
    model: str = "receipts",
    api_key: str | None = None,
    temperature: float = 0.15,
    system: str | None = None,
    max_tokens: int = 256,
    title: str = TITLE,
):
    """The gradio Blocks app (not launched); ``api_key`` is sent to ``base_url`` only (:func:`responder`)."""
    import gradio as gr

    respond = responder(base_url, model, api_key, system, max_tokens)

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nUpload a receipt (or paste its text) and get JSON back. Model: `{model}`.")
        with gr.Row():
            endpoint = gr.Textbox(base_url, label="Endpoint (OpenAI-compatible, …/v1)", scale=3)
            temp = gr.Slider(0.0, 1.0, value=temperature, step=0.05, label="Temperature", scale=1)
        gr.ChatInterface(respond, multimodal=True, additional_inputs=[endpoint, temp], api_name="chat")
    return demo


def launch(demo, host: str = "127.0.0.1", port: int | None = None, share: bool = False):
    """Launch without blocking; login required when ``DEMO_USER`` and ``DEMO_PASSWORD`` are set."""
    user, password = os.environ.get("DEMO_USER"), os.environ.get("DEMO_PASSWORD")
    auth = (user, password) if user and password else None
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
    )
    return demo.local_url if hasattr(demo, "local_url") else f"http://{host}:{port}/"


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def screenshot(
    url: str,
    out_png: str,
    width: int = 1200,
    height: int = 900,
    wait_ms: int = 8000,
    chromium: str = "chromium",
) -> tuple[str, str]:
    """Render ``url`` in headless Chromium: a PNG screenshot and the DOM after scripts ran.

    Returns (png path, rendered DOM). Needs Debian's ``chromium`` package (``/usr/bin/chromium``).
    """
    import shutil
    import subprocess
    import tempfile

    exe = shutil.which(chromium)
    if exe is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        common = [
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={wait_ms}",
            f"--window-size={width},{height}",
        ]
        subprocess.run(
            [*common, f"--screenshot={out_png}", url], check=True, capture_output=True, timeout=120
        )
        dom = subprocess.run(
            [*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120
        ).stdout
    return out_png, dom
