"""Crash-safe checkpoint directories: tensors in safetensors files plus a checksummed JSON manifest.

Layout of a checkpoint directory::

    manifest.json               format name + version, model identity, meta, and per file:
                                its sha256, size and the tensors it holds; plus its own sha256
    tensors-<group>.safetensors one file per tensor family (``keys``, ``values``, ``scales``...),
                                split into shards above ``max_file_bytes``

Written by several ranks (``write_checkpoint(..., world=(rank, world_size))``, world size > 1,
e.g. a tensor-parallel model whose ranks each hold some KV heads)::

    manifest.json               as above plus ``world_size`` and ``ranks`` (each part's manifest
                                sha256); no data files of its own
    rank-<r>/                   rank r's part: a checkpoint directory of the layout above (its
                                manifest also records ``rank`` and ``world_size``)

All parts are written into one staging directory and swapped in together, so the guarantees below
hold for the whole directory; :func:`read_checkpoint` refuses another world size.

Guarantees
----------
* **Atomic replace.** Everything is written into a fresh temporary directory beside the target
  (same file system), each file is fsynced, then the directory itself, and only then does the
  new directory take the target's name. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``
  call, so at every instant the target path holds either the complete old checkpoint or the
  complete new one, whenever the writer dies (``SIGKILL``, power loss after the fsyncs, a full
  disk). Where ``RENAME_EXCHANGE`` is missing (other OSes, some network file systems) the old
  directory is first renamed to a backup, the new one renamed into place, and the backup removed;
  a writer killed between those two renames leaves the backup, which :func:`read_checkpoint` reads
  instead and the next :func:`write_checkpoint` restores.
* **Nothing left behind on failure.** An exception while writing (``OSError`` for a full disk,
  an unserializable meta) removes the temporary directory and leaves the previous checkpoint
  untouched. Temporary directories of writers that were killed are removed by the next write.
* **Every byte is checked on read.** Each data file's sha256 is in the manifest; the manifest
  carries the sha256 of its own canonical serialization and must be byte-for-byte canonical, so
  a flipped byte anywhere, in any file, raises :class:`CheckpointError`. So does a format or
  version we do not know, a missing or truncated file, and a model identity that differs from the
  one the caller expects (each mismatched field is named).

One writer per path at a time (a second concurrent writer could remove the first's temporary
directory). This module imports only torch and safetensors, so it can be used on its own.

Example (needs a tokenizer/model, so not a doctest)::

    write_checkpoint("ckpt", {"keys.0": k0, "values.0": v0}, {"model": model_identity(model), "step": 12})
    tensors, meta = read_checkpoint("ckpt", expected_model_identity=model_identity(model))
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = ["write_checkpoint", "read_checkpoint", "CheckpointError", "model_identity", "FORMAT", "FORMAT_VERSION",
           "MANIFEST"]

FORMAT = "kvcompact-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_TMP = ".{name}.tmp-"
_OLD = ".{name}.old-"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, of an unknown format, or for another model."""


# --------------------------------------------------------------------------------------------- identity

_IDENTITY_FIELDS = ("model_type", "architectures", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "hidden_size", "intermediate_size", "vocab_size", "rope_theta", "rope_parameters",
                    "max_position_embeddings", "tie_word_embeddings")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def model_identity(model_or_config: Any) -> dict:
    """Fields that must match for a saved KV cache to be valid for a model.

    From the config: architecture and every shape that the cache layout depends on (layers, KV
    heads, head_dim...) and RoPE. From a model (not a bare config) also ``dtype`` and
    ``weights_sha256``, a hash of the first 64 KiB of the input embedding and of the last
    parameter: two checkpoints of one architecture (base vs instruct) have identical configs but
    different weights, and the KV of one is garbage for the other.
    """
    config = getattr(model_or_config, "config", model_or_config)
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    raw = raw.get("text_config", raw) if isinstance(raw.get("text_config"), dict) else raw
    identity = {k: raw[k] for k in _IDENTITY_FIELDS if raw.get(k) is not None}
    if identity.get("head_dim") is None and raw.get("hidden_size") and raw.get("num_attention_heads"):
        identity["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
    if hasattr(model_or_config, "parameters") and hasattr(model_or_config, "get_input_embeddings"):
        digest = hashlib.sha256()
        emb = model_or_config.get_input_embeddings().weight.detach()
        last = list(model_or_config.parameters())[-1].detach()
        for t, count in ((emb, 65536 // emb.element_size()), (last, 16384)):
            # Under tensor parallelism parameters are DTensor shards (collective: every rank calls
            # this); hashing the gathered tensor keeps the identity equal on every rank and to the
            # unsharded model's.
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            digest.update(t.reshape(-1)[:count].to("cpu", torch.float32).contiguous().numpy().tobytes())
        identity["weights_sha256"] = digest.hexdigest()
        identity["dtype"] = str(emb.dtype).replace("torch.", "")
    return _jsonable(identity)


# --------------------------------------------------------------------------------------------- fs helpers

def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def _siblings(path: Path, pattern: str) -> list[Path]:
    prefix = pattern.format(name=path.name)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix))


def _safe_group(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "tensors"


def _save_file(tensors: dict, path: Path) -> None:
    """Write one safetensors file and fsync it (the hook tests patch to simulate a full disk)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    _fsync_path(path)


def _canonical(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode()


# --------------------------------------------------------------------------------------------- write

def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping | None = None, *,
                     group: Callable[[str], str] | None = None, max_file_bytes: int = 1 << 30,
                     world: tuple[int, int] | None = None) -> Path:
    """Write ``tensors`` and ``meta`` to the directory ``path``, atomically replacing what is there.

    Parameters
    ----------
    path : path-like
        The checkpoint directory (created or replaced; its parent is created if needed).
    tensors : dict of str -> Tensor
        Any dtypes safetensors supports (fp8 included), any device (copied to CPU), any strides.
        With ``world``, this rank's tensors.
    meta : dict, optional
        JSON-serializable. ``meta["model"]`` (a dict, e.g. :func:`model_identity`) is the model
        identity that :func:`read_checkpoint` can check. With ``world``, this rank's meta (rank 0's
        is also the checkpoint's shared meta).
    group : callable(name) -> str, optional
        Which file a tensor goes to. Default: the name up to the first ``"."`` (``"keys.3"`` ->
        ``keys``), i.e. one file per tensor family.
    max_file_bytes : int
        Groups bigger than this are split into several shards.
    world : (rank, world_size), optional
        With ``world_size > 1`` a collective over the default ``torch.distributed`` process group
        (every rank must call it, with the same ``path`` on a file system they all see): each rank's
        part goes to ``rank-<r>/`` (a checkpoint directory of its own) and rank 0 writes the top
        manifest, which records the world size and the checksum of every part's manifest, then
        installs the whole directory with the same atomic swap. None or ``world_size == 1``: one
        process, the layout above.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OSError
        Writing failed (the previous checkpoint, if any, is intact; no temporary files remain).
        With ``world``, every rank raises when any rank failed.
    TypeError
        ``meta`` is not JSON-serializable or a value in ``tensors`` is not a tensor.
    ValueError
        ``world`` is not ``(rank, world_size)`` with ``0 <= rank < world_size``.
    """
    path = Path(path)
    rank, size = _check_world(world)
    meta = dict(meta or {})
    try:
        meta_json = _jsonable_strict(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"write_checkpoint: meta must be JSON-serializable: {err}") from None
    identity = meta_json.get("model") if isinstance(meta_json.get("model"), dict) else None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"write_checkpoint: tensors[{name!r}] is a {type(t).__name__}, not a Tensor")

    group = group or (lambda name: name.split(".", 1)[0])
    groups: dict[str, list[str]] = {}
    for name in tensors:
        groups.setdefault(_safe_group(str(group(name))), []).append(name)
    if size > 1:
        return _write_sharded(path, tensors, groups, max_file_bytes, identity, meta_json, rank, size)

    tmp = _staging_dir(path)
    try:
        files = _write_files(tmp, tensors, groups, max_file_bytes)
        _write_manifest(tmp, _manifest(identity, meta_json, files))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
        _fsync_path(tmp, directory=True)
        _install(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_world(world) -> tuple[int, int]:
    if world is None:
        return 0, 1
    ok = isinstance(world, (tuple, list)) and len(world) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in world)
    if not ok or not 0 <= world[0] < world[1]:
        raise ValueError(f"world must be (rank, world_size) with 0 <= rank < world_size, got {world!r}")
    return int(world[0]), int(world[1])


def _rank_dir(rank: int) -> str:
    return f"rank-{rank:05d}"


def _staging_dir(path: Path) -> Path:
    """A fresh temporary directory beside ``path`` (same file system), after cleaning up killed writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    for stale in _siblings(path, _TMP):  # left by writers that were killed
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=_TMP.format(name=path.name), dir=path.parent))


def _write_files(directory: Path, tensors: Mapping[str, torch.Tensor], groups: dict, max_file_bytes: int) -> dict:
    """Write every group's safetensors file(s) into ``directory``; the manifest's ``files`` entry."""
    files = {}
    for gname in sorted(groups):
        shard, size, shards = {}, 0, []
        for name in groups[gname]:
            t = tensors[name].detach().to("cpu")
            # A view of a bigger storage (or one sharing it) is copied: safetensors stores whole
            # tensors and refuses shared storage.
            if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.contiguous().clone()
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > max_file_bytes:
                shards.append(shard)
                shard, size = {}, 0
            shard[name] = t
            size += nbytes
        shards.append(shard)
        for k, shard in enumerate(shards):
            fname = f"tensors-{gname}.safetensors" if len(shards) == 1 else \
                f"tensors-{gname}-{k + 1:03d}-of-{len(shards):03d}.safetensors"
            _save_file(shard, directory / fname)
            files[fname] = {"sha256": _sha256_file(directory / fname), "bytes": (directory / fname).stat().st_size,
                            "tensors": sorted(shard)}
    return files


def _manifest(identity, meta_json: dict, files: dict, **extra) -> dict:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": identity, "meta": meta_json,
                "files": files, **extra}
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    return manifest


def _write_manifest(directory: Path, manifest: dict) -> None:
    with open(directory / MANIFEST, "wb") as f:
        f.write(_canonical(manifest))
        f.flush()
        os.fsync(f.fileno())


def _write_sharded(path: Path, tensors, groups, max_file_bytes, identity, meta_json, rank: int, size: int) -> Path:
    """The ``world_size > 1`` collective of :func:`write_checkpoint`.

    Crash argument: every rank writes inside ONE staging directory that rank 0 made beside
    ``path``; only after all ranks report success (an all-gather) does rank 0 write the top
    manifest and swap the staging directory in, so a writer killed at any point leaves ``path``
    holding the previous complete checkpoint and a staging directory the next write removes.
    """
    import torch.distributed as dist

    staged: list = [None, None]
    if rank == 0:
        try:
            staged[0] = str(_staging_dir(path))
        except OSError as err:
            staged[1] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(staged, src=0)
    if staged[0] is None:
        raise OSError(f"write_checkpoint: rank 0 could not create a staging directory beside {path}: {staged[1]}")
    tmp = Path(staged[0])
    part, local_err, status = tmp / _rank_dir(rank), None, None
    try:
        part.mkdir()
        manifest = _manifest(identity, meta_json, _write_files(part, tensors, groups, max_file_bytes), rank=rank,
                             world_size=size)
        _write_manifest(part, manifest)
        _fsync_path(part, directory=True)
        status = (True, manifest["manifest_sha256"], "")
    except Exception as err:  # noqa: BLE001 - reported to every rank below, then re-raised here
        local_err, status = err, (False, None, f"{type(err).__name__}: {err}")
    statuses: list = [None] * size
    dist.all_gather_object(statuses, status)
    failed = [(r, s[2]) for r, s in enumerate(statuses) if not s[0]]
    outcome: list = [None]
    if failed:
        outcome[0] = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    elif rank == 0:
        try:
            ranks = {_rank_dir(r): s[1] for r, s in enumerate(statuses)}
            _write_manifest(tmp, _manifest(identity, meta_json, {}, world_size=size, ranks=ranks))
            os.chmod(tmp, 0o755)
            _fsync_path(tmp, directory=True)
            _install(tmp, path)
        except Exception as err:  # noqa: BLE001 - broadcast first so no rank waits forever
            shutil.rmtree(tmp, ignore_errors=True)
            local_err, outcome[0] = err, f"rank 0: {type(err).__name__}: {err}"
    dist.broadcast_object_list(outcome, src=0)
    if local_err is not None:
        raise local_err
    if outcome[0]:
        raise OSError(f"write_checkpoint: {outcome[0]}; {path} was left as it was")
    return path


def _jsonable_strict(meta: dict) -> dict:
    return json.loads(json.dumps(meta, sort_keys=True, allow_nan=False))


def _install(tmp: Path, path: Path) -> None:
    """Make ``tmp`` the checkpoint at ``path`` (see the module docstring for the crash argument)."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif not _exchange(tmp, path):  # (on success tmp now holds the previous checkpoint)
        old = Path(tempfile.mkdtemp(prefix=_OLD.format(name=path.name), dir=path.parent))
        os.rmdir(old)
        os.rename(path, old)
        os.rename(tmp, path)
        tmp = old
    _fsync_path(path.parent, directory=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _recover(path: Path) -> None:
    """Non-exchange swap interrupted between its renames: put the backup back."""
    if not os.path.lexists(path):
        backups = [p for p in _siblings(path, _OLD) if (p / MANIFEST).exists()]
        if backups:
            os.rename(backups[-1], path)
    for old in _siblings(path, _OLD):
        if os.path.lexists(path):
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- read

_INFO_KEYS = {"sha256": str, "bytes": int, "tensors": list}


def _data_file(path: Path, fname, info) -> Path:
    """``path / fname`` once ``fname`` is checked to name a plain file directly inside ``path``.

    The manifest is checksummed, but a checksum only proves the manifest is the one that was
    written, not that whoever wrote it was honest: a crafted manifest must not make the reader
    open ``../x``, an absolute path, a nested path, or a link to a file elsewhere.
    """
    where = f"{path / MANIFEST}: manifest entry {fname!r}"
    if not isinstance(fname, str) or not fname or fname in (".", "..") or "/" in fname or "\\" in fname \
            or os.sep in fname or (os.altsep and os.altsep in fname) or "\0" in fname or os.path.isabs(fname):
        raise CheckpointError(f"{where} is not a plain file name inside the checkpoint (no separators, '..' or "
                              "absolute paths)")
    if not isinstance(info, dict) or any(not isinstance(info.get(k), t) for k, t in _INFO_KEYS.items()):
        raise CheckpointError(f"{where} must be an object with sha256 (str), bytes (int) and tensors (list), "
                              f"got {info!r}")
    fpath = path / fname
    if fpath.is_symlink():
        target = fpath.resolve()
        if target.parent != path.resolve():
            raise CheckpointError(f"{where} is a symlink to {target}, outside the checkpoint")
    if os.path.lexists(fpath) and not fpath.is_file():
        raise CheckpointError(f"{where} is not a regular file (a directory?)")
    return fpath


def read_checkpoint(path: str | os.PathLike, expected_model_identity: Mapping | None = None, *,
                    device: str | torch.device = "cpu", world: tuple[int, int] | None = None) -> tuple[dict, dict]:
    """Read and verify a checkpoint written by :func:`write_checkpoint`.

    Parameters
    ----------
    path : path-like
        The checkpoint directory.
    expected_model_identity : dict, optional
        Every key given must be present in the checkpoint's model identity with an equal value.
    device : str or torch.device
        Where to put the tensors.
    world : (rank, world_size), optional
        The reader's place; None is ``(0, 1)``. It must match the world size the checkpoint was
        written at; this rank's part is read. Not a collective (each rank reads on its own).

    Returns
    -------
    (dict of str -> Tensor, dict)
        The tensors and the ``meta`` given to :func:`write_checkpoint` (with ``world``: this rank's).

    Raises
    ------
    CheckpointError
        Missing directory/manifest/file, a checksum or size mismatch, an unknown format or version,
        a model identity mismatch, or another world size; the message names what.
    ValueError
        ``world`` is not ``(rank, world_size)`` with ``0 <= rank < world_size``.
    """
    rank, size = _check_world(world)
    path = Path(path)
    if not (path / MANIFEST).exists() and not os.path.lexists(path):
        backups = [p for p in _siblings(path, _OLD) if (p / MANIFEST).exists()]
        if backups:  # a non-atomic swap was interrupted; the backup is the last complete checkpoint
            path = backups[-1]
    manifest = _read_manifest(path)
    saved = manifest.get("world_size", 1)
    if isinstance(saved, bool) or not isinstance(saved, int) or saved < 1:
        raise CheckpointError(f"{path / MANIFEST}: world_size must be an int >= 1, got {saved!r}")
    if saved != size:
        raise CheckpointError(
            f"{path} was saved at world size {saved}, loading at world size {size}: under tensor parallelism each "
            "rank's cache holds only its own KV heads, so a checkpoint loads only at the world size it was saved at")

    identity = manifest.get("model")
    if expected_model_identity:
        if not isinstance(identity, dict):
            raise CheckpointError(
                f"{path}: the checkpoint records no model identity; cannot check it is for this model")
        expected = _jsonable(dict(expected_model_identity))
        bad = [f"{k}: checkpoint has {identity.get(k, '<missing>')!r}, expected {v!r}"
               for k, v in sorted(expected.items()) if identity.get(k, object()) != v]
        if bad:
            raise CheckpointError(f"{path} was written for a different model: " + "; ".join(bad))
    if saved == 1:
        return _read_files(path, manifest, device), manifest["meta"]

    ranks = manifest.get("ranks")
    name = _rank_dir(rank)
    if not isinstance(ranks, dict) or sorted(ranks) != [_rank_dir(r) for r in range(saved)]:
        raise CheckpointError(f"{path / MANIFEST}: 'ranks' must list {saved} parts rank-00000 ..., got {ranks!r}")
    part = path / name
    if part.is_symlink() or not part.is_dir():
        raise CheckpointError(f"{path}: this rank's part {name} is missing, a symlink or not a directory")
    part_manifest = _read_manifest(part)
    if part_manifest["manifest_sha256"] != ranks[name]:
        raise CheckpointError(f"{part / MANIFEST} is not the part this checkpoint's manifest records (its checksum "
                              "differs): parts of different saves were mixed")
    if part_manifest.get("rank") != rank or part_manifest.get("world_size") != saved:
        raise CheckpointError(f"{part / MANIFEST}: records rank {part_manifest.get('rank')!r} of world size "
                              f"{part_manifest.get('world_size')!r}, expected rank {rank} of {saved}")
    return _read_files(part, part_manifest, device), part_manifest["meta"]


def _read_manifest(path: Path) -> dict:
    """The verified manifest of the checkpoint directory ``path`` (format, version, checksum, canonical bytes)."""
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{path} is not a kvcompact checkpoint: {MANIFEST} is missing")
    if mpath.is_symlink() or not mpath.is_file():
        raise CheckpointError(f"{mpath} is a symlink or not a regular file; a checkpoint's manifest is a plain file "
                              "inside it")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{mpath} is corrupt (not valid JSON: {err})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath} is corrupt (not a JSON object)")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format_version is {version!r}; this kvcompact reads version {FORMAT_VERSION}")
    stored = manifest.pop("manifest_sha256", None)
    if stored != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise CheckpointError(f"{mpath} is corrupt: its checksum (manifest_sha256) does not match its contents")
    manifest["manifest_sha256"] = stored
    if raw != _canonical(manifest):
        raise CheckpointError(f"{mpath} is corrupt: its bytes differ from the canonical form the checksum covers")
    return manifest


def _read_files(path: Path, manifest: dict, device) -> dict:
    """Every tensor of the data files ``manifest`` lists, each checked against its size and sha256."""
    from safetensors.torch import load

    mpath = path / MANIFEST
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{mpath}: 'files' must map file names to their sha256/bytes/tensors, "
                              f"got {type(files).__name__}")
    tensors: dict = {}
    for fname, info in sorted(files.items()):
        fpath = _data_file(path, fname, info)
        if not fpath.exists():
            raise CheckpointError(f"{path}: file {fname} listed in the manifest is missing")
        data = fpath.read_bytes()
        if len(data) != info["bytes"]:
            raise CheckpointError(f"{fpath}: size {len(data)} bytes, manifest says {info['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise CheckpointError(f"{fpath} is corrupt: sha256 does not match the manifest")
        try:
            loaded = load(data)
        except Exception as err:  # noqa: BLE001 - a checksum-valid but unreadable file is still corrupt
            raise CheckpointError(f"{fpath} cannot be read as safetensors: {err}") from None
        if sorted(loaded) != info["tensors"]:
            raise CheckpointError(f"{fpath}: holds tensors {sorted(loaded)}, manifest lists {info['tensors']}")
        for name, t in loaded.items():
            tensors[name] = t.to(device)
    return tensors
