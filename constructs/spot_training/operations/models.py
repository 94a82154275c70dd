"""The model registry of a pipeline: list its packages with their metrics and lineage, compare two, approve or
reject one (boto3 clients are passed in).

Each package the pipeline registers carries its lineage in CustomerMetadataProperties and its evaluation report
(evaluate.py's evaluation.json) as ModelMetrics.ModelQuality.Statistics; the report is read from S3.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spot_training.operations.errors import OperationError

STATUSES = {"approve": "Approved", "reject": "Rejected"}
LINEAGE = ("method", "base_model", "data_fingerprint", "training_job", "pipeline_execution", "training_image",
           "trainer_code", "training_seconds", "billable_seconds")


def group_from_outputs(path: Path) -> str:
    """The `ModelPackageGroupName` output of a `cdk deploy --outputs-file` file."""
    if not path.is_file():
        raise OperationError(f"--outputs {path}: no such file; deploy with `make deploy` or pass --group")
    names = [o["ModelPackageGroupName"] for o in json.loads(path.read_text()).values() if "ModelPackageGroupName" in o]
    if len(names) != 1:
        raise OperationError(f"--outputs {path}: expected one ModelPackageGroupName output, found {len(names)} "
                             "(is evaluate_model off?); pass --group")
    return names[0]


def _report(s3, package: Mapping[str, Any]) -> dict[str, Any] | None:
    uri = package.get("ModelMetrics", {}).get("ModelQuality", {}).get("Statistics", {}).get("S3Uri")
    if not uri:
        return None
    import botocore.exceptions

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except botocore.exceptions.ClientError as error:
        return {"error": f"{uri}: {error.response.get('Error', {}).get('Code', 'error')}"}


def describe(sagemaker, s3, package_arn: str) -> dict[str, Any]:
    """One package: version, status, creation time, metrics (from its report) and lineage."""
    package = sagemaker.describe_model_package(ModelPackageName=package_arn)
    report = _report(s3, package) or {}
    metrics = report.get("metrics", {})
    return {"arn": package["ModelPackageArn"], "version": package.get("ModelPackageVersion"),
            "status": package["ModelApprovalStatus"], "created": str(package.get("CreationTime", "")),
            "base_loss": metrics.get("base", {}).get("loss"), "fine_tuned_loss": metrics.get("fine_tuned", {}).get("loss"),
            "fine_tuned_perplexity": metrics.get("fine_tuned", {}).get("perplexity"),
            "improvement": report.get("improvement"), "tokens": report.get("tokens"),
            "sequence_length": report.get("sequence_length"),
            "report_data_fingerprint": report.get("data", {}).get("fingerprint"),
            "report_base_model": report.get("base_model"),
            "report_error": report.get("error"),
            "model": package.get("InferenceSpecification", {}).get("Containers", [{}])[0].get(
                "ModelDataSource", {}).get("S3DataSource", {}).get("S3Uri"),
            "lineage": dict(package.get("CustomerMetadataProperties", {}))}


def list_models(sagemaker, s3, group: str, *, status: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The group's newest packages first (at most `limit`), each described."""
    import botocore.exceptions

    request: dict[str, Any] = {"ModelPackageGroupName": group, "SortBy": "CreationTime", "SortOrder": "Descending"}
    if status:
        request["ModelApprovalStatus"] = status
    summaries: list[dict[str, Any]] = []
    try:
        while len(summaries) < limit:  # ListModelPackages returns at most 100 a page (MaxResults)
            page = sagemaker.list_model_packages(**request, MaxResults=min(limit - len(summaries), 100))
            summaries += page["ModelPackageSummaryList"]
            if not page.get("NextToken"):
                break
            request["NextToken"] = page["NextToken"]
    except botocore.exceptions.ClientError as error:
        raise OperationError(f"--group {group}: {error.response.get('Error', {}).get('Message', error)}") from None
    return [describe(sagemaker, s3, s["ModelPackageArn"]) for s in summaries[:limit]]


def resolve_package(group: str, package: str, region: str, account: str | None = None) -> str:
    """A package ARN, or a version number of `group` (needs the account, from STS, to build the ARN)."""
    if package.startswith("arn:"):
        return package
    if not package.isdigit():
        raise OperationError(f"{package}: must be a model package ARN or a version number of {group}")
    if account is None:
        raise OperationError(f"{package}: a version number needs the account id; pass the package ARN")
    return f"arn:aws:sagemaker:{region}:{account}:model-package/{group.lower()}/{int(package)}"


def set_status(sagemaker, package_arn: str, decision: str, reason: str) -> str:
    """Approve or reject a package (UpdateModelPackage); a package already in that status is refused."""
    status = STATUSES[decision]
    if not reason.strip():
        raise OperationError(f"--reason: required to {decision} a model (it is kept as its ApprovalDescription)")
    current = sagemaker.describe_model_package(ModelPackageName=package_arn)["ModelApprovalStatus"]
    if current == status:
        raise OperationError(f"{package_arn}: already {status}")
    sagemaker.update_model_package(ModelPackageArn=package_arn, ModelApprovalStatus=status,
                                   ApprovalDescription=reason[:1024])
    return status


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def models_text(models: Sequence[Mapping[str, Any]], group: str) -> str:
    if not models:
        return f"{group}: no model packages"
    lines = [f"{group}: {len(models)} model package(s), newest first",
             f"  {'version':>7}  {'status':<22} {'fine-tuned':>10} {'base':>10} {'improves':>9}  method  training job"]
    for m in models:
        lines.append(f"  {m['version'] or '-':>7}  {m['status']:<22} {_number(m['fine_tuned_loss']):>10} "
                     f"{_number(m['base_loss']):>10} {_number(m['improvement']):>9}  {m['lineage'].get('method', '-'):<6}  "
                     f"{m['lineage'].get('training_job', '-')}")
        if m.get("report_error"):
            lines.append(f"           evaluation report unreadable: {m['report_error']}")
    return "\n".join(lines)


def compare_text(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """Two packages side by side: metrics, then each lineage field (a `*` marks those that differ)."""
    rows = [("version", a["version"], b["version"]), ("status", a["status"], b["status"]),
            ("fine-tuned loss", _number(a["fine_tuned_loss"], 6), _number(b["fine_tuned_loss"], 6)),
            ("base loss", _number(a["base_loss"], 6), _number(b["base_loss"], 6)),
            ("improvement", _number(a["improvement"], 6), _number(b["improvement"], 6)),
            ("evaluated tokens", a["tokens"], b["tokens"]), ("model", a["model"], b["model"])]
    rows += [(name, a["lineage"].get(name, "-"), b["lineage"].get(name, "-")) for name in LINEAGE]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}    A: {a['arn']}", f"{'':{width}}    B: {b['arn']}"]
    for name, left, right in rows:
        lines.append(f"{'*' if left != right else ' '} {name:<{width}}  {left}  |  {right}")
    if a["fine_tuned_loss"] is not None and b["fine_tuned_loss"] is not None:
        better = "A" if a["fine_tuned_loss"] < b["fine_tuned_loss"] else "B" if b["fine_tuned_loss"] < a["fine_tuned_loss"] \
            else "neither"
        same_data = a["lineage"].get("data_fingerprint") == b["lineage"].get("data_fingerprint")
        lines.append(f"lower fine-tuned validation loss: {better}" + ("" if same_data else
                     " (evaluated on different data: the fingerprints differ, so the losses are not comparable)"))
    return "\n".join(lines)
