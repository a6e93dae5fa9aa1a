"""Every config in cluster/ passes Ray's own validation; the KubeRay manifests are well formed
and their commands parse with the ``ray-convrfm`` parser."""

import shlex
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHER = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def test_every_config_is_covered():
    assert {p.name for p in LAUNCHER} == {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    config = prepare_config(raw)  # what `ray up` does: merge the provider's defaults
    validate_config(config)  # Ray's JSON schema and node-type checks
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # no shard worker lands on the driver's node
    gpu = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 8 for t in gpu)
    assert any("[cloud]" in c for c in config["setup_commands"])  # s3fs / gcsfs for stores
    assert "/home/ubuntu/ray_convrfm" in config["file_mounts"]


def _check_pod_groups(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert container["image"].endswith("ray-convrfm:latest")
    (group,) = spec["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert spec["enableInTreeAutoscaling"] is True


def test_kuberay_raycluster_manifest():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_pod_groups(doc["spec"])


def test_kuberay_rayjob_runs_a_resumable_fit():
    from ray_convrfm.tools.cli import _parser

    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    _check_pod_groups(doc["spec"]["rayClusterSpec"])
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "ray-convrfm"
    args = _parser().parse_args(argv[1:])
    assert args.command == "fit" and args.address == "auto"
    # results and the kernel store (default OUT/kernels.zarr) outlive the job's cluster, so a
    # retried job resumes from the same store
    assert args.out.startswith("s3://") and args.store is None
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert args.workers * args.gpus_per_worker <= group["maxReplicas"]
