"""Renders and lints deploy/helm/prefect-exporter for tests/deploy.rs, offline,
with Helm 4 as a library (helm-python-sdk); the assertions are on the Rust side.

    python tests/helm_chart.py render CHART VALUES_JSON
        {"manifests": {template path: text}} or {"error": message}: a values
        error (the schema) or a template's `fail` is an answer, not a crash.
    python tests/helm_chart.py lint CHART VALUES_JSON
        helm lint --strict's report: {"messages": [...], "errors": [...]}

The release is named "prefect-exporter" in the namespace "monitoring". Helm logs
each symbolic link it follows (alerts.yaml) on stderr; the caller shows stderr only
when something failed.
"""

import json
import sys

import helm_python

RELEASE = "prefect-exporter"
NAMESPACE = "monitoring"


def main(argv):
    if len(argv) != 4 or argv[1] not in ("render", "lint"):
        sys.exit(__doc__)
    command, chart, values = argv[1], argv[2], json.loads(argv[3])
    if command == "lint":
        out = helm_python.lint(chart, values, strict=True, namespace=NAMESPACE)
    else:
        try:
            manifests = helm_python.Chart.load(chart).render(
                values, name=RELEASE, namespace=NAMESPACE, is_install=True
            )
            out = {"manifests": manifests}
        except (helm_python.HelmValuesError, helm_python.HelmRenderError) as e:
            out = {"error": str(e)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv)
