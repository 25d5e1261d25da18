"""The Kubernetes manifests in deploy/ agree with each other and with the container image."""

import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).parent.parent / "deploy"


def _pods(document):
    if document["kind"] == "RayCluster":
        spec = document["spec"]
        yield spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield group["template"]["spec"]
    elif document["kind"] == "Deployment":
        yield document["spec"]["template"]["spec"]


def test_every_pod_shares_the_workspace_secret_and_image():
    documents = [doc for path in sorted(DEPLOY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    kinds = {doc["kind"]: doc for doc in documents}
    assert {"RayCluster", "PersistentVolumeClaim", "Deployment", "Secret"} <= kinds.keys()
    claim = kinds["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node reads and writes the same artifacts
    pods = [pod for doc in documents for pod in _pods(doc)]
    assert len(pods) == 4  # head, GPU group, crawl group, driver
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/workspace"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert container["envFrom"] == [{"secretRef": {"name": kinds["Secret"]["metadata"]["name"]}}]
        assert container["image"] == pods[0]["containers"][0]["image"]
    gpu = next(g for g in kinds["RayCluster"]["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "LORAFACTORY_DB" in kinds["Secret"]["stringData"]
    driver = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    head_service = f"{kinds['RayCluster']['metadata']['name']}-head-svc"  # the service KubeRay creates
    assert driver[:3] == ["lorafactory", "fleet", "run"] and f"ray://{head_service}:10001" in driver


def test_the_image_installs_the_clusters_ray_version():
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (DEPLOY / "Dockerfile").read_text())
    cluster = yaml.safe_load_all((DEPLOY / "raycluster.yaml").read_text())
    assert pinned and next(cluster)["spec"]["rayVersion"] == pinned[1]
