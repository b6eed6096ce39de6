"""infra/compose.yaml and every manifest of infra/kuberay/ validate against their publishers' schemas, vendored in
shared/schemas/ (README there: source, version, licence); nothing is downloaded. Kubernetes objects are checked
strictly, as `kubectl apply` does by default (an unknown field is an error, not silently dropped)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from test_stack import stack


ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "shared" / "schemas"
KUBERAY = {kind: SCHEMAS / "kuberay-v1.7.0" / f"{kind.lower()}-ray-v1.json"
           for kind in ("RayCluster", "RayJob", "RayCronJob", "RayService")}
KUBERNETES = {"Namespace": "namespace-v1.json", "PersistentVolumeClaim": "persistentvolumeclaim-v1.json",
              "NetworkPolicy": "networkpolicy-networking-v1.json", "ConfigMap": "configmap-v1.json"}


def strict(schema):
    """A CRD's structural schema as the API server applies it with strict field validation: an object with declared
    properties takes no others (unless it says it keeps unknown fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


def kubernetes_validator(kind: str):
    if kind in KUBERAY:
        return jsonschema.Draft7Validator(strict(json.loads(KUBERAY[kind].read_text())))
    definitions = json.loads((SCHEMAS / "kubernetes-v1.37.0" / "_definitions.json").read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    schema = json.loads((SCHEMAS / "kubernetes-v1.37.0" / KUBERNETES[kind]).read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def manifests() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for path in sorted((ROOT / "infra" / "kuberay").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def errors(validator, document) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message[:200]}" for e in validator.iter_errors(document)]


def compose_validator():
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / "compose-spec.json").read_text()))


def test_the_compose_file_is_valid_compose_spec():
    assert errors(compose_validator(), stack()) == []


def test_the_compose_schema_check_catches_a_misspelt_key_and_a_wrong_type():
    validator = compose_validator()
    typo = stack()
    typo["services"]["mlflow"]["restrat"] = typo["services"]["mlflow"].pop("restart")
    assert any("restrat" in e for e in errors(validator, typo))
    wrong = stack()
    wrong["services"]["ray-head"]["shm_size"] = ["2gb"]
    assert errors(validator, wrong)


@pytest.mark.parametrize("name, manifest", manifests(), ids=[n for n, _ in manifests()])
def test_every_kuberay_manifest_is_valid_against_its_schema(name, manifest):
    assert manifest["kind"] in {**KUBERAY, **KUBERNETES}, f"{name}: no vendored schema for this kind"
    assert errors(kubernetes_validator(manifest["kind"]), manifest) == []


def test_the_kuberay_schema_check_catches_a_misspelt_field_and_a_wrong_type():
    cluster = next(doc for _, doc in manifests() if doc["kind"] == "RayCluster")
    validator = kubernetes_validator("RayCluster")
    typo = copy.deepcopy(cluster)
    typo["spec"]["enableInTreeAutoscalling"] = typo["spec"].pop("enableInTreeAutoscaling")
    assert any("enableInTreeAutoscalling" in e for e in errors(validator, typo))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert any("maxReplicas" in e for e in errors(validator, wrong))
    policy = next(doc for _, doc in manifests() if doc["kind"] == "NetworkPolicy")
    bad = copy.deepcopy(policy)
    bad["spec"]["ingres"] = bad["spec"].pop("ingress")
    assert errors(kubernetes_validator("NetworkPolicy"), bad)
