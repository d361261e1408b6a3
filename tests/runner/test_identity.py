"""The run identity: in every file camgate writes, built the same way everywhere, carried through
analyze and merge, and checked where files are combined."""
import hashlib

import pyarrow.parquet as pq
import pytest
from helpers import make_set, tiny_card

from camgate.cli import main
from camgate.io import results as res
from camgate.runner.shards import MergeError, merge, plan

KEYS = {"task", "model_card_sha256", "weights_sha256", "method", "target", "target_layer", "static_mask",
        "mask_spec", "topk", "budget", "seed", "data"}


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def identity(uri) -> dict:
    return res.run_metadata(uri)["identity"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny_cnn card and 4-image set, and every kind of file camgate writes for them."""
    root = tmp_path_factory.mktemp("identity")
    _, manifest = make_set(root, n=4)
    card = str(tiny_card(root / "model"))
    f = {"root": root, "manifest": manifest, "card": card}
    for name, verb, extra in (("results", "run", []), ("heatmaps", "run", ["--heatmaps-only"]),
                              ("layers", "layers", []), ("road", "road", [])):
        f[name] = str(root / f"{name}.parquet")
        assert main([verb, "--model", card, "--data", manifest, "--out", f[name], *extra, "--quiet"]) == 0, name
    f["analyzed"] = str(root / "analyzed.parquet")
    assert main(["analyze", f["heatmaps"], "--out", f["analyzed"], "--quiet"]) == 0
    return f


def test_every_file_kind_carries_the_identity(files):
    card, weights = files["card"], files["root"] / "model" / "models" / "w.safetensors"
    for kind in ("results", "heatmaps", "analyzed", "layers", "road"):
        ident = identity(files[kind])
        assert KEYS <= set(ident), (kind, set(ident))
        assert ident["task"] == "classification" and ident["method"] == "gradcam" and ident["target"] == "predicted"
        assert ident["model_card_sha256"] == sha(card) and ident["weights_sha256"] == sha(weights), kind
        assert len(ident["data"]["fingerprint"]) == 64 and ident["data"]["rows"] == 4, kind
        assert ident["budget"] is None and ident["seed"] is None  # not a black-box method
    results = identity(files["results"])
    assert results["target_layer"] == ["features.2"] and results["topk"] == 0.1
    assert results["mask_spec"] == {"invert": False, "invalid_ids": []}
    # heatmaps read no masks: no mask settings, and a fingerprint without mask content
    heat = identity(files["heatmaps"])
    assert heat["mask_spec"] is None and heat["topk"] is None
    assert heat["data"]["fingerprint"] != results["data"]["fingerprint"]
    # heatmaps + analyze = run: the same identity, data fingerprint included
    assert identity(files["analyzed"]) == results
    assert identity(files["layers"])["target_layer"] == ["features.0", "features.1", "features.2", "features.3"]
    road = identity(files["road"])
    assert road["target_layer"] == ["features.2"] and road["road"]["seed"] == 0
    # the per-image content hashes the fingerprint is taken over
    t = pq.read_table(files["results"]).to_pylist()
    assert [r["image_sha256"] for r in t] == [sha(files["root"] / "images" / f"{i:03d}.png") for i in range(4)]
    assert [r["mask_sha256"] for r in t] == [sha(files["root"] / "masks" / f"{i:03d}.png") for i in range(4)]
    # the keys other code reads stay
    md = res.run_metadata(files["results"])
    assert md["method"] == "gradcam" and md["model_card_sha256"] == sha(card) and md["target_layer"] == ["features.2"]


def test_the_data_fingerprint_covers_prefix_data_sets_and_image_content(files, tmp_path):
    root = tmp_path / "set"
    make_set(root, n=3)
    prefix = str(root)
    first, second = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    assert main(["run", "--model", files["card"], "--data", prefix, "--out", first, "--quiet"]) == 0
    assert res.run_metadata(first)["data_sha256"] is None  # no manifest file to hash
    fp = identity(first)["data"]
    assert len(fp["fingerprint"]) == 64 and fp["rows"] == 3
    (root / "images" / "001.png").write_bytes((root / "images" / "002.png").read_bytes())
    assert main(["run", "--model", files["card"], "--data", prefix, "--out", second, "--quiet"]) == 0
    assert identity(second)["data"]["fingerprint"] != fp["fingerprint"]  # same URIs, other content
    assert {k: v for k, v in identity(second).items() if k != "data"} == {
        k: v for k, v in identity(first).items() if k != "data"}


def test_merged_parts_carry_the_one_run_identity(files, tmp_path):
    shards = plan(files["manifest"], 2, str(tmp_path / "shards"))
    parts = [str(tmp_path / f"p{k}.parquet") for k in range(2)]
    for shard, part in zip(shards, parts):
        assert main(["run", "--model", files["card"], "--data", shard, "--out", part, "--quiet"]) == 0
    assert identity(parts[0])["data"] != identity(parts[1])["data"]
    merged = str(tmp_path / "merged.parquet")
    merge(parts, merged)  # without --data: the fingerprint still names the data
    assert identity(merged) == identity(files["results"])


def test_merge_refuses_parts_of_different_identities_naming_the_field(files, tmp_path):
    a, b = plan(files["manifest"], 2, str(tmp_path / "shards"))
    pa_, pb = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    assert main(["run", "--model", files["card"], "--data", a, "--out", pa_, "--quiet"]) == 0
    assert main(["run", "--model", files["card"], "--data", b, "--out", pb, "--mask-marks-valid", "--quiet"]) == 0
    with pytest.raises(MergeError, match=r"'mask_spec' is \{\"invalid_ids\": \[\], \"invert\": false\} in one and "
                                         r"\{\"invalid_ids\": \[\], \"invert\": true\} in the other"):
        merge([pa_, pb], str(tmp_path / "m.parquet"))
    # the same card text beside other weights: named by the identity's weights hash
    from safetensors.torch import save
    from zoo import tiny_cnn

    other = tiny_card(tmp_path / "other")
    state = {k: v + 1.0 for k, v in tiny_cnn().state_dict().items()}
    (tmp_path / "other" / "models" / "w.safetensors").write_bytes(save(state))
    pc = str(tmp_path / "c.parquet")
    assert main(["run", "--model", str(other), "--data", b, "--out", pc, "--quiet"]) == 0
    with pytest.raises(MergeError, match=r"'weights_sha256' is \"[0-9a-f]{64}\" in one and \"[0-9a-f]{64}\""):
        merge([pa_, pc], str(tmp_path / "m.parquet"))
