"""``kvcompact serve``: load a model, build the :class:`SessionManager` and the app, run uvicorn.

The CLI registers the command (kvcompact/cli.py) and hands its parsed options to :func:`serve`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

from kvcompact.formats import FORMAT_NAMES

__all__ = ["API_KEY_ENV", "KV_DTYPES", "load_model", "build_manager", "is_loopback", "serve"]

API_KEY_ENV = "KVCOMPACT_API_KEY"
KV_DTYPES = ("auto",) + FORMAT_NAMES  # auto: the model dtype, lossless
GiB = 1 << 30


def _require_web_stack():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ImportError(f"kvcompact serve needs fastapi and uvicorn ({err.name!r} is missing): "
                          'pip install "kvcompact[serve]"') from err


def load_model(model: str | None, device: str):
    """``(model, tokenizer, name)``: the embedded SmolLM2 for None, else a local folder or GGUF file.

    Nothing is downloaded: a path that does not exist raises ``ValueError`` naming it.
    """
    import torch

    if model is None:
        from kvcompact.models import load_default

        m, tok = load_default(device=device)
        return m, tok, "SmolLM2-135M-Instruct"
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"--model {model!r}: no such folder or file (a local Hugging Face model folder or a "
                         ".gguf file; nothing is downloaded)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict = {"local_files_only": True}
    folder = path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model {model!r}: a file must be a .gguf model (else pass its folder)")
        folder, kw["gguf_file"] = path.parent, path.name
    dtype = torch.float32 if device == "cpu" else "auto"
    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    return m, tok, path.stem if path.is_file() else path.name


def build_manager(model, tokenizer, *, kv_dtype: str = "auto", group_size: int | None = None,
                  max_device_gib: float | None = None, max_host_gib: float | None = None, reuse: str = "edits"):
    """A :class:`SessionManager` from the CLI's units (GiB) and names."""
    from kvcompact.serve import SessionManager

    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    cache_kwargs: dict = {}
    if kv_dtype != "auto":
        cache_kwargs["kv_dtype"] = kv_dtype
    if group_size is not None:
        if kv_dtype == "auto":
            raise ValueError("--group-size needs a quantized --kv-dtype (fp8_e4m3, fp8_e5m2, int8)")
        cache_kwargs["group_size"] = group_size
    return SessionManager(model, tokenizer, cache_kwargs=cache_kwargs, reuse=reuse,
                          max_device_bytes=None if max_device_gib is None else int(max_device_gib * GiB),
                          max_host_bytes=None if max_host_gib is None else int(max_host_gib * GiB))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def serve(args) -> int:
    """Run the server until interrupted; ``args`` are the options of ``kvcompact serve``."""
    _require_web_stack()
    import torch
    import uvicorn

    from kvcompact.serve.app import create_app

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and api_key is None:
        print(f"kvcompact serve: warning: listening on {args.host} without an API key: anyone who can reach "
              f"this address can read and edit every session (set --api-key or {API_KEY_ENV})",
              file=sys.stderr, flush=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    model, tokenizer, name = load_model(args.model, device)
    manager = build_manager(model, tokenizer, kv_dtype=args.kv_dtype, group_size=args.group_size,
                            max_device_gib=args.max_device_gib, max_host_gib=args.max_host_gib, reuse=args.reuse)
    app = create_app(manager, model_name=name, api_key=api_key, max_context=args.max_context,
                     max_body_bytes=args.max_body_bytes)
    print(f"kvcompact serve: {name} on {device} (kv {args.kv_dtype}, reuse {args.reuse}) at "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
