"""The cluster manifests and the Dockerfile agree with pyproject.toml and jobs/ on what matters."""

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
KUBERAY = ["raycluster.yaml", "rayjob-train.yaml"]


def _pins() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {req.name: req for req in map(Requirement, project["dependencies"])}


def _ray_version() -> str:
    (spec,) = _pins()["ray"].specifier
    assert spec.operator == "=="
    return spec.version


def _dockerfile() -> list[tuple[str, str]]:
    lines = (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    return [tuple(line.split(None, 1)) for line in lines if line.strip() and not line.startswith("#")]


def _workdir() -> str:
    return next(arg for op, arg in _dockerfile() if op == "WORKDIR")


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


@pytest.fixture(params=KUBERAY)
def kuberay(request) -> dict:
    return yaml.safe_load((REPO / "cluster" / request.param).read_text())


def test_dockerfile_base_image_and_pins_match_pyproject():
    steps = _dockerfile()
    base = next(arg for op, arg in steps if op == "FROM")
    assert base.startswith(f"rayproject/ray:{_ray_version()}-"), base
    pins = _pins()
    installed = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    for command in installed:
        for pinned in re.findall(r"([A-Za-z0-9_.\-]+)==([\w.]+)", command):
            name, version = pinned
            assert name in pins and pins[name].specifier.contains(version), (name, version)
    assert any(arg.rstrip().endswith("pip install --no-cache-dir .") for arg in installed)  # pyproject's pins


def test_dockerfile_env_comes_before_the_installs():
    steps = [op for op, _ in _dockerfile()]
    last_env = max(i for i, op in enumerate(steps) if op == "ENV")
    first_run = steps.index("RUN")
    assert last_env < first_run, "an ENV after the RUN that needs it does not reach that RUN"


def test_kuberay_cluster_runs_ray_of_pyproject_with_token_auth(kuberay):
    spec = _cluster_spec(kuberay)
    assert spec["rayVersion"] == _ray_version()
    assert spec["authOptions"]["mode"] == "token"


def _image() -> str:
    return yaml.safe_load((REPO / "cluster" / "aws-autoscaler.yaml").read_text())["docker"]["image"]


def test_kuberay_pods_run_the_image_with_the_s3_secret(kuberay):
    for container in _containers(_cluster_spec(kuberay)):
        assert container["image"] == _image(), container["name"]
        assert container["workingDir"] == _workdir()
        assert {"secretRef": {"name": "simgan-s3"}} in container["envFrom"]


def test_kuberay_has_a_gpu_worker_group(kuberay):
    gpu_groups = [g for g in _cluster_spec(kuberay)["workerGroupSpecs"]
                  if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups


def test_rayjob_entrypoint_is_absolute_and_exists_and_fits_the_gpus():
    job = yaml.safe_load((REPO / "cluster" / "rayjob-train.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    paths = [argv[1], argv[argv.index("--config") + 1]]
    for path in paths:
        assert path.startswith(_workdir() + "/"), path
        assert (REPO / path.removeprefix(_workdir() + "/")).is_file(), path
    overrides = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    assert overrides["train.use_gpu"] == "true"
    gpus = sum(g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    assert int(overrides["train.num_workers"]) <= gpus


def test_aws_autoscaler_on_demand_head_spot_gpu_workers_profiles_and_auth():
    config = yaml.safe_load((REPO / "cluster" / "aws-autoscaler.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in workers)
    assert all(re.match(r"^p\d|^g\d", t["node_config"]["InstanceType"]) for t in workers)  # GPU instance families
    for name, node_type in types.items():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in config["file_mounts"]
