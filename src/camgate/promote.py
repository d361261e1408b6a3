"""Promotion of a model that passed its heatmap gate.

The model card, the weights and the gate's test record are copied to a promotion location (an
``s3://`` prefix or a local folder), optionally registered in the Kubeflow Model Registry::

    PROMOTE_TO/<model name>/<weights sha256[:12]>/
        card.json       the card, resolved; ``weights`` names the file beside it
        <weights file>  the weights, byte for byte
        record.json     the test record, byte for byte
        PROMOTED.json   written last: every file above with its sha256

A folder counts as promoted only when PROMOTED.json exists and every file it lists has the listed
hash (:func:`promoted`). S3 has no rename: a crash mid-copy leaves files without a valid marker,
which the next promotion of the same model overwrites. A local folder is staged beside the
destination and renamed into place, so there no half copy appears under the final name.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from datetime import datetime, timezone

from . import __version__
from .errors import ConfigError
from .io import storage

__all__ = ["PromoteError", "RegistryError", "promote", "promoted", "CARD", "RECORD", "MARKER"]

CARD, RECORD, MARKER = "card.json", "record.json", "PROMOTED.json"
SCHEMA = "camgate.promoted/1"
_FORMATS = {".safetensors": "safetensors", ".onnx": "onnx", ".pt": "pytorch", ".pth": "pytorch",
            ".bin": "pytorch"}
_REGISTRY_PORT = 8080  # the Model Registry's REST port in a Kubeflow install


class PromoteError(ConfigError):
    """The model cannot be promoted as asked (no record, another model in the way, ...)."""


class RegistryError(PromoteError):
    """Registering in the Model Registry failed; the files may already be promoted (the message says)."""


# --------------------------------------------------------------------------- hashes and the marker


def _digest(uri: str) -> str | None:
    """sha256 of the file or object at ``uri``; None when it is missing."""
    path = storage.local_path(uri)
    if path is not None and os.path.isdir(path):  # a folder where a file should be: nothing promoted there
        return None
    try:
        return storage.sha256(uri)
    except storage.NotFound:
        return None


def promoted(destination: str) -> dict | None:
    """The marker of a complete promotion at ``destination``; None when there is no marker or a file
    it lists is missing or differs from its hash (a half copy counts as nothing)."""
    try:
        marker = json.loads(storage.read_bytes(storage.join(destination, MARKER)))
    except (storage.NotFound, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    for name, sha in files.items():
        if _digest(storage.join(destination, name)) != sha:
            return None
    return marker


# --------------------------------------------------------------------------- inputs


def _read_record(uri: str) -> tuple[bytes, dict]:
    raw = storage.read_bytes(uri)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise PromoteError(f"test record {uri} is not JSON: {e}") from None
    verdict = doc.get("verdict") if isinstance(doc, dict) else None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("passed"), bool):
        raise PromoteError(f"test record {uri} has no boolean verdict.passed (is it a camgate record.json?)")
    return raw, doc


def _verdict(doc: dict) -> dict:
    """passed, policy name, trusted and the tested card's and weights' sha256 from a record
    (camgate.report.record)."""
    policy = doc.get("policy") if isinstance(doc.get("policy"), dict) else {}
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    return {"passed": doc["verdict"]["passed"], "policy": policy.get("name"),
            "trusted": doc["verdict"].get("trusted"), "card_sha256": model.get("card_sha256"),
            "weights_sha256": model.get("weights_sha256")}


def _check_tested(doc: dict, record: str, name: str, card_sha256: str, weights_sha256: str | None) -> None:
    """A passed gate promotes only the model it tested: the record must name the model card and weights
    sha256 it tested (``model.card_sha256``, ``model.weights_sha256``), and they must be the card and the
    weights being promoted. A card without a weights file (``kind: callable``) has none to name."""
    tested = _verdict(doc)
    for key, mine, what in (("card_sha256", card_sha256, "model card"), ("weights_sha256", weights_sha256, "weights")):
        theirs = tested[key]
        if not mine and not theirs:
            continue
        if not isinstance(theirs, str) or not theirs:
            raise PromoteError(f"test record {record} does not name the {what} sha256 it tested (model.{key}): "
                               f"a passed gate promotes only the {what} it tested")
        if theirs != mine:
            raise PromoteError(f"test record {record} is for {what} sha256 {theirs[:12]}…, not model '{name}' "
                               f"({(mine or 'none')[:12]}…): a passed gate promotes only the {what} it tested")


def _safe_name(name: str) -> str:
    # one path segment on both backends, whatever the card's name holds
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "model"


def _result(message: str, promoted: bool = False, destination: str | None = None, files: dict | None = None,
            already: bool = False, registered: str | None = None) -> dict:
    return {"promoted": promoted, "destination": destination, "files": dict(files or {}),
            "already_promoted": already, "registered_model_id": registered, "message": message}


# --------------------------------------------------------------------------- copying


def _write_all(folder: str, small: dict[str, bytes], weights: tuple[str, str] | None, files: dict,
               marker: dict) -> None:
    """Write the files, check each against its hash, then the marker: the marker only ever
    describes files that are there."""
    for name, data in small.items():
        storage.write_bytes(storage.join(folder, name), data)
    if weights:
        storage.upload(weights[0], storage.join(folder, weights[1]))
    bad = sorted(n for n, sha in files.items() if _digest(storage.join(folder, n)) != sha)
    if bad:
        raise PromoteError(f"the copy under {folder} does not match its sources ({', '.join(bad)}); "
                           "nothing was marked promoted, try again")
    storage.write_bytes(storage.join(folder, MARKER), (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())


def _copy(dest: str, small: dict[str, bytes], weights: tuple[str, str] | None, files: dict, marker: dict) -> None:
    local = storage.local_path(dest)
    if local is None:
        # a stale marker (its files no longer match) must not come back to life over a half copy
        storage.delete(storage.join(dest, MARKER))
        _write_all(dest, small, weights, files, marker)
        return
    parent = os.path.dirname(os.path.abspath(local))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(local)}.camgate-tmp-")
    try:
        _write_all(stage, small, weights, files, marker)
        if os.path.lexists(local):  # not promoted (checked by the caller): a leftover to replace
            trash = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(local)}.camgate-tmp-old-")
            os.rename(local, os.path.join(trash, "old"))
            os.rename(stage, local)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(stage, local)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --------------------------------------------------------------------------- the registry


def _registry_target(address: str, port: int | None) -> tuple[str, int | None, bool | None]:
    """``host:port`` (plain HTTP, as the in-cluster service) or ``http(s)://host[:port]`` (the
    client takes port and TLS from the URL) -> (address, port, is_secure)."""
    if "://" in address:
        return address, port or None, None
    host, sep, p = address.rpartition(":")
    if not (sep and p.isdigit()):
        host, p = address, ""
    # the client builds its URLs from the address as given: without a scheme they are not HTTP
    return f"http://{host}", int(p) if p else (port or _REGISTRY_PORT), False


def _registry_class():
    try:
        from model_registry import ModelRegistry
    except ImportError:
        raise RegistryError("registering needs the Kubeflow Model Registry client: "
                            "pip install 'camgate[registry]' (package model-registry)") from None
    return ModelRegistry


def _register(cls, address: str, port: int | None, author: str, name: str, version: str, uri: str,
              dest: str, metadata: dict) -> tuple[str, bool]:
    """-> (registered model id, whether this version was registered before)."""
    host, port, secure = _registry_target(address, port)
    fmt = _FORMATS.get(os.path.splitext(uri)[1].lower(), "camgate-card")
    where = f"{host}:{port}" if port else host
    try:
        client = cls(host, port, author=author, is_secure=secure)
        existing = client.get_registered_model(name)
        if existing is not None and client.get_model_version(name, version) is not None:
            return str(existing.id), True
        rm = client.register_model(name, uri, version=version, model_format_name=fmt, model_format_version="1",
                                   version_description=f"promoted by camgate after a passed heatmap gate: {dest}",
                                   metadata=metadata)
    except Exception as e:  # noqa: BLE001 - the client raises its own StoreError, aiohttp's and others alike
        raise RegistryError(f"model '{name}' is promoted to {dest}, but registering it in the Model Registry at "
                            f"{where} failed: {type(e).__name__}: {e}") from e
    return str(rm.id), False


def _registry_metadata(dest: str, files: dict, weights_name: str | None) -> dict:
    decision = _verdict(json.loads(storage.read_bytes(storage.join(dest, RECORD))))  # the one promoted
    md = {"camgate_version": __version__, "card_uri": storage.join(dest, CARD), "card_sha256": files[CARD],
          "record_uri": storage.join(dest, RECORD), "record_sha256": files[RECORD],
          "gate_passed": bool(decision.get("passed"))}
    if weights_name:
        md["weights_sha256"] = files[weights_name]
    if isinstance(decision.get("policy"), str):
        md["gate_policy"] = decision["policy"]
    if isinstance(decision.get("trusted"), bool):
        md["gate_trusted"] = decision["trusted"]
    return md


# --------------------------------------------------------------------------- promote


def promote(model_card: str, record: str | None = None, promote_to: str | None = None, passed: bool | None = None,
            registry: str | None = None, registry_port: int | None = None, author: str = "camgate",
            device: str = "cpu", card_sha256: str | None = None) -> dict:
    """Copy a model that passed its gate, with its test record, to ``promote_to``; register it when
    ``registry`` (``host:port`` or ``http(s)://host[:port]``) is given.

    Nothing is copied when ``passed`` is False or the record says the gate failed, nor when
    ``promote_to`` is empty (the message then says what would be promoted). Promoting the same
    model (same weights and card) again is a no-op that succeeds; another model in the destination
    folder raises :class:`PromoteError` and is left untouched. A record that does not name the model
    card and weights sha256 it tested, or names others than ``model_card``'s, raises
    :class:`PromoteError` before anything is copied. ``card_sha256``: the sha256 of the card that
    ``model_card`` was resolved from (the pipeline promotes load_model's resolved card); by default
    ``model_card``'s own.

    Returns ``promoted``, ``destination``, ``files`` (name -> sha256), ``already_promoted``,
    ``registered_model_id`` and ``message``.
    """
    from .model.card import ModelCard
    from .model.load import load_model, resolved_card

    card = ModelCard.load(model_card)
    card_sha = card_sha256 or storage.sha256(model_card)
    raw_record, doc = _read_record(record) if record else (None, None)
    if passed is False:
        return _result(f"not promoting model '{card.name}': the heatmap gate did not pass; nothing copied")
    if doc is not None and not _verdict(doc)["passed"]:
        policy = _verdict(doc)["policy"]
        return _result(f"not promoting model '{card.name}': test record {record} says the gate failed"
                       f"{f' (policy {policy!r})' if isinstance(policy, str) else ''}; nothing copied")
    if not promote_to:
        wuri = card.weights_uri()
        sha = storage.sha256(wuri) if wuri else ""
        if doc is not None:
            _check_tested(doc, record, card.name, card_sha, sha)
        sha = sha or "n/a"
        return _result(f"would promote model '{card.name}' ({card.arch}), weights {wuri} sha256 {sha}: "
                       "no promotion location given, nothing copied")
    if raw_record is None:
        raise PromoteError(f"promoting model '{card.name}' needs the gate's test record (record.json): none given")
    cls = _registry_class() if registry else None  # a missing client fails before anything is copied

    lm = load_model(card, device=device)  # only a card that loads is promoted
    # the weights loaded are the ones tested; below, the copy promoted must be the weights loaded
    _check_tested(doc, record, card.name, card_sha, lm.weights_sha256)
    body = resolved_card(lm)
    wuri = body["weights"]
    wname = posixpath.basename(wuri) if wuri else None
    if wname in (CARD, RECORD, MARKER):
        raise PromoteError(f"weights file name {wname!r} clashes with the promoted {wname}; rename the weights")
    if wname:
        body["weights"] = wname  # beside the card: the promoted folder loads on its own
    card_bytes = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    files = {CARD: hashlib.sha256(card_bytes).hexdigest(), RECORD: hashlib.sha256(raw_record).hexdigest()}
    version = (lm.weights_sha256 or files[CARD])[:12]
    dest = storage.join(promote_to, _safe_name(card.name), version)

    with tempfile.TemporaryDirectory(prefix="camgate-promote-") as tmp:
        weights = None
        if wname:
            local = os.path.join(tmp, wname)
            storage.download(wuri, local)
            files[wname] = storage.sha256(local)
            if files[wname] != lm.weights_sha256:
                raise PromoteError(f"weights {wuri} changed while model '{card.name}' was being promoted; try again")
            weights = (local, wname)
        existing = promoted(dest)
        if existing is None:
            marker = {"schema": SCHEMA, "model": card.name, "weights": wname, "weights_sha256": lm.weights_sha256,
                      "files": files, "camgate_version": __version__,
                      "source": {"card": str(model_card), "weights": wuri, "record": str(record)},
                      "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            _copy(dest, {CARD: card_bytes, RECORD: raw_record}, weights, files, marker)
            message = f"promoted model '{card.name}' to {dest} (weights sha256 {lm.weights_sha256 or 'n/a'})"
        else:
            theirs = existing["files"]
            if theirs.get(CARD) != files[CARD] or existing.get("weights_sha256") != lm.weights_sha256:
                what = "weights" if existing.get("weights_sha256") != lm.weights_sha256 else "model card"
                raise PromoteError(f"{dest} already holds promoted model '{existing.get('model')}' with a different "
                                   f"{what}; refusing to overwrite it (promote to another location, or remove "
                                   "that folder first)")
            kept = "" if theirs.get(RECORD) == files[RECORD] else "; its own test record is kept (this one differs)"
            files = dict(theirs)
            message = f"model '{card.name}' is already promoted at {dest}: nothing copied{kept}"

    registered = None
    if cls is not None:
        uri = storage.join(dest, wname) if wname else storage.join(dest, CARD)
        if storage.local_path(uri) is not None:
            uri = os.path.abspath(uri)
        registered, before = _register(cls, registry, registry_port, author, card.name, version, uri, dest,
                                       _registry_metadata(dest, files, wname))
        message += (f"; {'already ' if before else ''}registered in the Model Registry as model id {registered}, "
                    f"version {version}")
    return _result(message, promoted=True, destination=dest, files=files, already=existing is not None,
                   registered=registered)
