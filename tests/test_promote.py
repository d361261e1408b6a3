"""Promotion after a passed gate: copies, refusals, crash safety, the Model Registry boundary, the CLI."""
import hashlib
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from camgate.cli import main
from camgate.io import storage
from camgate.model.load import load_model
from camgate.promote import PromoteError, RegistryError, promote, promoted

RECORD = {"schema": "camgate.test-record/1", "verdict": {"passed": True, "trusted": True}, "policy": {"name": "strict"}}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_model(folder: Path, nudge: float = 0.0, classes=("a", "b", "c")) -> dict:
    """A zoo:tiny_cnn card next to its safetensors weights (relative path), and a passing record."""
    from safetensors.torch import save
    from zoo import tiny_cnn

    model = tiny_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(nudge)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    weights = save(model.state_dict())
    (folder / "models" / "w.safetensors").write_bytes(weights)
    card = {"name": "tiny", "arch": "zoo:tiny_cnn", "num_classes": 3, "classes": list(classes),
            "weights": "models/w.safetensors", "input": {"size": [32, 32]}}
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    src = {"card": str(folder / "card.yaml"), "weights": weights}
    return {**src, "record": write_record(folder / "record.json", True, src=src)}


def write_record(path: Path, passed: bool, policy: str = "strict", weights_sha256: str | None = None,
                 src: dict | None = None, card_sha256: str | None = None) -> str:
    """A record of the gate; ``src``: the model it tested (its card's and weights' sha256, unless given)."""
    if src is not None:
        card_sha256 = card_sha256 or sha(Path(src["card"]).read_bytes())
        weights_sha256 = weights_sha256 or sha(src["weights"])
    path.write_text(json.dumps({**RECORD, "verdict": {**RECORD["verdict"], "passed": passed},
                                "policy": {"name": policy},
                                "model": {"card_sha256": card_sha256, "weights_sha256": weights_sha256}}))
    return str(path)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_promoted(out: dict, src: dict, record_bytes: bytes):
    dest = out["destination"]
    assert out["promoted"] and out["registered_model_id"] is None
    assert out["files"]["w.safetensors"] == sha(src["weights"])
    assert out["files"]["record.json"] == sha(record_bytes)
    assert sorted(out["files"]) == ["card.json", "record.json", "w.safetensors"]
    for name, digest in out["files"].items():  # what is there is what the marker lists
        assert sha(storage.read_bytes(storage.join(dest, name))) == digest
    assert storage.read_bytes(storage.join(dest, "w.safetensors")) == src["weights"]
    assert storage.read_bytes(storage.join(dest, "record.json")) == record_bytes
    assert promoted(dest)["files"] == out["files"]
    card = json.loads(storage.read_bytes(storage.join(dest, "card.json")))
    assert card["weights"] == "w.safetensors"  # beside the card: the folder stands on its own
    lm = load_model(storage.join(dest, "card.json"), device="cpu")
    assert lm.weights_sha256 == sha(src["weights"]) and lm.card.name == "tiny"


# --------------------------------------------------------------------------- copies


def test_passed_gate_copies_card_weights_and_record_locally(tmp_path):
    src = make_model(tmp_path / "src")
    out = promote(src["card"], src["record"], str(tmp_path / "promoted"))
    assert out["destination"] == str(tmp_path / "promoted" / "tiny" / sha(src["weights"])[:12])
    check_promoted(out, src, Path(src["record"]).read_bytes())
    assert sorted(os.listdir(out["destination"])) == ["PROMOTED.json", "card.json", "record.json", "w.safetensors"]
    assert os.listdir(tmp_path / "promoted" / "tiny") == [sha(src["weights"])[:12]]  # no staging left behind
    assert "promoted model 'tiny'" in out["message"]


def test_passed_gate_copies_from_s3_to_s3(tmp_path, s3_bucket):
    src = make_model(tmp_path / "src")
    for name in ("card.yaml", "models/w.safetensors", "record.json"):
        storage.upload(tmp_path / "src" / name, f"{s3_bucket}/in/{name}")
    src["card"] = f"{s3_bucket}/in/card.yaml"
    out = promote(src["card"], f"{s3_bucket}/in/record.json", f"{s3_bucket}/promoted/")
    assert out["destination"] == f"{s3_bucket}/promoted/tiny/{sha(src['weights'])[:12]}"
    check_promoted(out, src, Path(src["record"]).read_bytes())


def test_failed_gate_copies_nothing(tmp_path):
    src = make_model(tmp_path / "src")
    failed = write_record(tmp_path / "failed.json", False)
    out = promote(src["card"], failed, str(tmp_path / "promoted"))
    assert not out["promoted"] and out["destination"] is None and out["files"] == {}
    assert "says the gate failed (policy 'strict')" in out["message"] and "nothing copied" in out["message"]
    # the gate's own verdict wins over a passing record too
    out = promote(src["card"], src["record"], str(tmp_path / "promoted"), passed=False)
    assert not out["promoted"] and "did not pass" in out["message"]
    assert not (tmp_path / "promoted").exists()


def test_report_only_without_a_location(tmp_path):
    src = make_model(tmp_path / "src")
    out = promote(src["card"], src["record"], "")
    assert not out["promoted"] and out["destination"] is None
    assert "would promote model 'tiny'" in out["message"] and sha(src["weights"]) in out["message"]


def test_a_record_is_needed_and_must_hold_a_verdict(tmp_path):
    src = make_model(tmp_path / "src")
    with pytest.raises(PromoteError, match="needs the gate's test record"):
        promote(src["card"], None, str(tmp_path / "promoted"), passed=True)
    (tmp_path / "odd.json").write_text(json.dumps({"schema": "camgate.test-record/1"}))
    with pytest.raises(PromoteError, match="no boolean verdict.passed"):
        promote(src["card"], str(tmp_path / "odd.json"), str(tmp_path / "promoted"))
    assert not (tmp_path / "promoted").exists()


def test_a_record_of_other_weights_promotes_nothing(tmp_path):
    src = make_model(tmp_path / "src")
    other = write_record(tmp_path / "other.json", True, weights_sha256="0" * 64, src=src)
    with pytest.raises(PromoteError, match="promotes only the weights it tested"):
        promote(src["card"], other, str(tmp_path / "promoted"))
    assert not (tmp_path / "promoted").exists()
    mine = write_record(tmp_path / "mine.json", True, weights_sha256=sha(src["weights"]), src=src)
    assert promote(src["card"], mine, str(tmp_path / "promoted"))["promoted"]


def test_a_record_that_does_not_name_what_it_tested_promotes_nothing(tmp_path, capsys):
    src = make_model(tmp_path / "src")
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"verdict": {"passed": True}}))
    with pytest.raises(PromoteError, match=r"does not name the model card sha256 it tested \(model.card_sha256\)"):
        promote(src["card"], str(bare), str(tmp_path / "promoted"))
    no_weights = write_record(tmp_path / "nw.json", True, card_sha256=sha(Path(src["card"]).read_bytes()))
    with pytest.raises(PromoteError, match=r"does not name the weights sha256 it tested \(model.weights_sha256\)"):
        promote(src["card"], no_weights, str(tmp_path / "promoted"))
    # nor does it say what it would promote
    with pytest.raises(PromoteError, match="does not name the model card sha256"):
        promote(src["card"], str(bare), "")
    assert main(["promote", "--model", src["card"], "--record", str(bare), "--to", str(tmp_path / "promoted")]) == 2
    assert "model.card_sha256" in capsys.readouterr().err
    assert not (tmp_path / "promoted").exists()


def test_a_record_promotes_only_the_card_and_weights_it_tested(tmp_path, capsys):
    src = make_model(tmp_path / "src")
    other = make_model(tmp_path / "other", nudge=0.01)  # other weights, beside a card of the same text
    to = str(tmp_path / "promoted")
    code = main(["promote", "--model", other["card"], "--record", src["record"], "--to", to])
    err = capsys.readouterr().err
    assert code == 2 and "is for weights sha256" in err and "promotes only the weights it tested" in err
    # the same card file, other bytes under the weights' name: the weights differ
    (tmp_path / "src" / "models" / "w.safetensors").write_bytes(other["weights"])
    with pytest.raises(PromoteError, match=r"is for weights sha256 .* promotes only the weights it tested"):
        promote(src["card"], src["record"], to)
    with pytest.raises(PromoteError, match="promotes only the weights it tested"):
        promote(src["card"], src["record"], "")
    # another card for the same weights (a class renamed): not the card the gate ran
    (tmp_path / "src" / "models" / "w.safetensors").write_bytes(src["weights"])
    card = yaml.safe_load(Path(src["card"]).read_text())
    (tmp_path / "src" / "renamed.yaml").write_text(yaml.safe_dump({**card, "classes": ["a", "b", "z"]}))
    with pytest.raises(PromoteError, match="promotes only the model card it tested"):
        promote(str(tmp_path / "src" / "renamed.yaml"), src["record"], to)
    assert not (tmp_path / "promoted").exists()
    assert promote(src["card"], src["record"], to)["promoted"]


# --------------------------------------------------------------------------- the same and other models


def test_another_model_in_the_destination_is_refused_and_left_untouched(tmp_path):
    first = make_model(tmp_path / "first")
    out = promote(first["card"], first["record"], str(tmp_path / "promoted"))
    before = snapshot(tmp_path / "promoted")
    # same name and weights, a different card: the same folder, another model
    other = make_model(tmp_path / "other", classes=("x", "y", "z"))
    with pytest.raises(PromoteError, match="already holds promoted model 'tiny' with a different model card"):
        promote(other["card"], other["record"], str(tmp_path / "promoted"))
    assert snapshot(tmp_path / "promoted") == before and promoted(out["destination"])
    # new weights are a new version beside the first, never over it
    newer = make_model(tmp_path / "newer", nudge=0.01)
    out2 = promote(newer["card"], newer["record"], str(tmp_path / "promoted"))
    assert out2["promoted"] and out2["destination"] != out["destination"]
    assert {k: v for k, v in snapshot(tmp_path / "promoted").items() if k in before} == before


def test_promoting_the_same_model_again_is_a_no_op(tmp_path):
    src = make_model(tmp_path / "src")
    out = promote(src["card"], src["record"], str(tmp_path / "promoted"))
    before = snapshot(tmp_path / "promoted")
    again = promote(src["card"], src["record"], str(tmp_path / "promoted"))
    assert again["promoted"] and again["already_promoted"] and again["files"] == out["files"]
    assert "already promoted" in again["message"] and "nothing copied" in again["message"]
    # a later gate run of the same model: its record does not replace the promoted one
    rerun = write_record(tmp_path / "rerun.json", True, policy="nightly", src=src)
    kept = promote(src["card"], rerun, str(tmp_path / "promoted"))
    assert kept["already_promoted"] and "its own test record is kept" in kept["message"]
    assert snapshot(tmp_path / "promoted") == before


# --------------------------------------------------------------------------- crash safety


def crash_after_first_write(monkeypatch):
    real, calls = storage.write_bytes, []

    def flaky(uri, data):
        if calls:
            raise OSError("disk gone")
        calls.append(uri)
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", flaky)
    return calls


def test_crash_mid_copy_locally_leaves_nothing_and_a_retry_succeeds(tmp_path, monkeypatch):
    src = make_model(tmp_path / "src")
    dest = tmp_path / "promoted" / "tiny" / sha(src["weights"])[:12]
    calls = crash_after_first_write(monkeypatch)
    with pytest.raises(OSError, match="disk gone"):
        promote(src["card"], src["record"], str(tmp_path / "promoted"))
    assert calls  # one file was written before the crash
    assert not dest.exists() and promoted(str(dest)) is None
    assert os.listdir(tmp_path / "promoted" / "tiny") == []  # the staging folder went with it
    monkeypatch.undo()
    check_promoted(promote(src["card"], src["record"], str(tmp_path / "promoted")), src,
                   Path(src["record"]).read_bytes())


def test_crash_mid_copy_on_s3_counts_as_nothing_and_a_retry_completes_it(tmp_path, s3_bucket, monkeypatch):
    src = make_model(tmp_path / "src")
    dest = f"{s3_bucket}/promoted/tiny/{sha(src['weights'])[:12]}"
    crash_after_first_write(monkeypatch)
    with pytest.raises(OSError, match="disk gone"):
        promote(src["card"], src["record"], f"{s3_bucket}/promoted")
    assert storage.list_uris(dest) == [f"{dest}/card.json"]  # a half copy, and no marker
    assert promoted(dest) is None
    monkeypatch.undo()
    out = promote(src["card"], src["record"], f"{s3_bucket}/promoted")
    assert not out["already_promoted"]
    check_promoted(out, src, Path(src["record"]).read_bytes())


def test_a_damaged_promotion_counts_as_nothing_and_is_repaired(tmp_path, s3_bucket):
    src = make_model(tmp_path / "src")
    out = promote(src["card"], src["record"], f"{s3_bucket}/promoted")
    storage.write_bytes(f"{out['destination']}/w.safetensors", b"truncated")
    assert promoted(out["destination"]) is None
    again = promote(src["card"], src["record"], f"{s3_bucket}/promoted")
    assert not again["already_promoted"]
    check_promoted(again, src, Path(src["record"]).read_bytes())


# --------------------------------------------------------------------------- Model Registry (client boundary)


class FakeRegistry:
    """Records what camgate hands the ``model_registry.ModelRegistry`` client (no server can run here)."""

    instances: list = []
    models: dict = {}
    fail: Exception | None = None

    def __init__(self, server_address, port=None, *, author, is_secure=None):
        self.args = dict(server_address=server_address, port=port, author=author, is_secure=is_secure)
        self.calls = []
        FakeRegistry.instances.append(self)

    def get_registered_model(self, name):
        return FakeRegistry.models.get(name)

    def get_model_version(self, name, version):
        rm = FakeRegistry.models.get(name)
        return version if rm is not None and version in rm.versions else None

    def register_model(self, name, uri, *, model_format_name, model_format_version, version,
                       version_description=None, metadata=None):
        # the files are promoted before anything is registered
        assert promoted(os.path.dirname(uri)) is not None
        self.calls.append(dict(name=name, uri=uri, version=version, model_format_name=model_format_name,
                               model_format_version=model_format_version, metadata=metadata))
        if FakeRegistry.fail:
            raise FakeRegistry.fail
        rm = FakeRegistry.models.setdefault(name, types.SimpleNamespace(id="7", versions=set()))
        rm.versions.add(version)
        return rm


@pytest.fixture
def registry(monkeypatch):
    module = types.ModuleType("model_registry")
    module.ModelRegistry = FakeRegistry
    monkeypatch.setitem(sys.modules, "model_registry", module)
    FakeRegistry.instances, FakeRegistry.models, FakeRegistry.fail = [], {}, None
    return FakeRegistry


def test_registers_the_promoted_weights_with_their_evidence(tmp_path, registry):
    src = make_model(tmp_path / "src")
    out = promote(src["card"], src["record"], str(tmp_path / "promoted"), registry="mr.kubeflow.svc:8080",
                  author="ci")
    (client,) = registry.instances
    assert client.args == dict(server_address="http://mr.kubeflow.svc", port=8080, author="ci", is_secure=False)
    (call,) = client.calls
    version = sha(src["weights"])[:12]
    assert call["name"] == "tiny" and call["version"] == version
    assert call["uri"] == os.path.join(out["destination"], "w.safetensors") and os.path.isabs(call["uri"])
    assert call["model_format_name"] == "safetensors"
    md = call["metadata"]
    assert md["weights_sha256"] == sha(src["weights"])
    assert md["record_sha256"] == sha(Path(src["record"]).read_bytes())
    assert md["card_sha256"] == out["files"]["card.json"]
    assert md["gate_passed"] is True and md["gate_policy"] == "strict" and md["gate_trusted"] is True
    assert md["record_uri"] == os.path.join(out["destination"], "record.json")
    assert all(isinstance(v, (bool, int, float, str)) for v in md.values())  # the client's SupportedTypes
    assert out["registered_model_id"] == "7" and f"version {version}" in out["message"]
    # the same model again: already registered, not registered twice
    again = promote(src["card"], src["record"], str(tmp_path / "promoted"), registry="mr.kubeflow.svc:8080")
    assert again["registered_model_id"] == "7" and "already registered" in again["message"]
    assert not registry.instances[1].calls


def test_a_url_address_leaves_port_and_tls_to_the_client(tmp_path, registry):
    src = make_model(tmp_path / "src")
    promote(src["card"], src["record"], str(tmp_path / "promoted"), registry="https://mr.example.com")
    assert registry.instances[0].args["server_address"] == "https://mr.example.com"
    assert registry.instances[0].args["port"] is None and registry.instances[0].args["is_secure"] is None


def test_a_registry_error_leaves_the_files_promoted(tmp_path, registry):
    src = make_model(tmp_path / "src")
    registry.fail = ConnectionError("connection refused")
    with pytest.raises(RegistryError, match=r"is promoted to .*but registering it .* at http://mr:9090 failed: "
                                            r"ConnectionError: connection refused"):
        promote(src["card"], src["record"], str(tmp_path / "promoted"), registry="mr:9090")
    assert promoted(str(tmp_path / "promoted" / "tiny" / sha(src["weights"])[:12])) is not None


@pytest.mark.filterwarnings("ignore:User access token is missing")  # plain HTTP needs none
def test_the_real_client_reports_an_unreachable_registry(tmp_path):
    """With model-registry installed: its own client, a port where nothing listens."""
    pytest.importorskip("model_registry")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = make_model(tmp_path / "src")
    with pytest.raises(RegistryError, match=f"at http://127.0.0.1:{port} failed"):
        promote(src["card"], src["record"], str(tmp_path / "promoted"), registry=f"127.0.0.1:{port}")
    assert promoted(str(tmp_path / "promoted" / "tiny" / sha(src["weights"])[:12])) is not None


def test_without_the_client_nothing_is_copied(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "model_registry", None)  # import fails as when not installed
    src = make_model(tmp_path / "src")
    with pytest.raises(RegistryError, match=r"pip install 'camgate\[registry\]'"):
        promote(src["card"], src["record"], str(tmp_path / "promoted"), registry="mr:8080")
    assert not (tmp_path / "promoted").exists()


# --------------------------------------------------------------------------- CLI and component


def test_cli_exit_codes(tmp_path, capsys):
    src = make_model(tmp_path / "src")
    to = str(tmp_path / "promoted")
    assert main(["promote", "--model", src["card"], "--record", src["record"], "--to", to]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["promoted"] and promoted(out["destination"])
    failed = write_record(tmp_path / "failed.json", False)
    other = make_model(tmp_path / "other", classes=("x", "y", "z"))
    before = snapshot(tmp_path / "promoted")
    assert main(["promote", "--model", src["card"], "--record", failed, "--to", str(tmp_path / "p2")]) == 1
    assert "says the gate failed" in json.loads(capsys.readouterr().out)["message"]
    assert not (tmp_path / "p2").exists()
    assert main(["promote", "--model", other["card"], "--record", other["record"], "--to", to]) == 2
    err = capsys.readouterr().err
    assert "camgate promote: error:" in err and "refusing to overwrite" in err and out["destination"] in err
    assert snapshot(tmp_path / "promoted") == before
    assert main(["promote", "--model", src["card"], "--record", src["record"], "--to", ""]) == 2
    assert "--to must name" in capsys.readouterr().err


def test_component_promotes_with_the_record(tmp_path, capsys):
    pytest.importorskip("kfp")
    from kfp import dsl

    from camgate.kfp import load_model as load_component
    from camgate.kfp import promote as promote_component

    src = make_model(tmp_path / "src")
    model = dsl.Model(uri=str(tmp_path / "a" / "model"))
    (tmp_path / "a").mkdir()
    load_component.python_func(model_card=src["card"], model=model)
    record = dsl.Artifact(uri=src["record"])
    (dest,) = promote_component.python_func(model=model, passed=True, record=record, promote_to=str(tmp_path / "p"))
    assert dest == str(tmp_path / "p" / "tiny" / sha(src["weights"])[:12]) and promoted(dest)
    assert f"promoted model 'tiny' to {dest}" in capsys.readouterr().out
    # the card the pipeline resolved and the user's own card are one model: the CLI agrees it is promoted
    assert promote(src["card"], src["record"], str(tmp_path / "p"))["already_promoted"]
    # no location: report only
    assert promote_component.python_func(model=model, passed=True).destination == ""
    assert "would promote model 'tiny'" in capsys.readouterr().out


def test_component_checks_the_record_against_the_card_it_resolved(tmp_path):
    pytest.importorskip("kfp")
    from kfp import dsl

    from camgate.kfp import load_model as load_component
    from camgate.kfp import promote as promote_component

    src, other = make_model(tmp_path / "src"), make_model(tmp_path / "other", classes=("x", "y", "z"))
    model = dsl.Model(uri=str(tmp_path / "a" / "model"))
    (tmp_path / "a").mkdir()
    load_component.python_func(model_card=src["card"], model=model)
    # the resolved card is another file than the one the gate's record names: the model's metadata links them
    assert model.metadata["card_sha256"] == sha(Path(src["card"]).read_bytes()) != storage.sha256(model.path)
    with pytest.raises(PromoteError, match="promotes only the model card it tested"):
        promote_component.python_func(model=model, passed=True, record=dsl.Artifact(uri=other["record"]),
                                      promote_to=str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()
