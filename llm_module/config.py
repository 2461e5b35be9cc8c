"""JSORC action config for ``llm``, in the shape of jaseci_ai_kit's ``jac_nlp.config``.

    jsctl jsorc actions config llm_module.config llm
    jsctl jsorc actions load llm -mode remote      # JSORC creates Service/ConfigMap/Deployment

JSORC then loads the actions from ``http://llm-module/`` (the Service name), a URL it builds
itself, so it cannot carry a ``/t/<token>`` prefix: JSORC-managed pods run without a token and
rely on the cluster network (restrict it with a NetworkPolicy). For a token, deploy
``deploy/k8s.yaml`` yourself and ``actions load remote http://llm-module/t/<token>``.
"""

from __future__ import annotations

NAME = "llm-module"
PORT = 8000  # the image runs as a non-root user, so not 80
IMAGE = "llm-module:cpu"

LLM_ACTION_CONFIG = {
    "module": "llm_module.llm",
    "loaded_module": "llm_module.llm",
    "remote": {
        "Service": {
            "kind": "Service",
            "apiVersion": "v1",
            "metadata": {"name": NAME, "creationTimestamp": None},
            "spec": {
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": PORT}],
                "selector": {"pod": NAME},
                "type": "ClusterIP",
                "sessionAffinity": "None",
                "internalTrafficPolicy": "Cluster",
            },
            "status": {"loadBalancer": {}},
        },
        "ConfigMap": {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {"name": f"{NAME}-up", "creationTimestamp": None},
            "data": {"prod_up": f"llm-module serve --host 0.0.0.0 --port {PORT} --data-root /data"},
        },
        "Deployment": {
            "kind": "Deployment",
            "apiVersion": "apps/v1",
            "metadata": {"name": NAME, "creationTimestamp": None},
            "spec": {
                "replicas": 1,  # adapters and jobs live in the pod
                "selector": {"matchLabels": {"pod": NAME}},
                "template": {
                    "metadata": {"name": NAME, "creationTimestamp": None, "labels": {"pod": NAME}},
                    "spec": {
                        "volumes": [
                            {"name": "prod-script", "configMap": {"name": f"{NAME}-up", "defaultMode": 420}},
                            {"name": "llm-data", "persistentVolumeClaim": {"claimName": "llm-module-data"}},
                        ],
                        "containers": [
                            {
                                "name": NAME,
                                "image": IMAGE,
                                "command": ["bash", "-c", "source /script/prod_up"],
                                "ports": [{"containerPort": PORT, "protocol": "TCP"}],
                                "env": [{"name": "LLM_MODULE_HOME", "value": "/data/.llm_module"}],
                                "readinessProbe": {"httpGet": {"path": "/readyz", "port": PORT}, "periodSeconds": 5},
                                "livenessProbe": {"httpGet": {"path": "/healthz", "port": PORT},
                                                  "initialDelaySeconds": 10, "periodSeconds": 20},
                                "resources": {"limits": {"memory": "6Gi"}, "requests": {"memory": "3Gi"}},
                                "volumeMounts": [
                                    {"name": "prod-script", "mountPath": "/script"},
                                    {"name": "llm-data", "mountPath": "/data"},
                                ],
                                "terminationMessagePath": "/dev/termination-log",
                                "terminationMessagePolicy": "File",
                                "imagePullPolicy": "IfNotPresent",
                            }
                        ],
                        "restartPolicy": "Always",
                        "terminationGracePeriodSeconds": 30,
                        "dnsPolicy": "ClusterFirst",
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
                        "schedulerName": "default-scheduler",
                    },
                },
                "strategy": {"type": "Recreate"},
                "revisionHistoryLimit": 10,
                "progressDeadlineSeconds": 600,
            },
            "status": {},
        },
    },
}

ACTION_CONFIGS = {"llm": LLM_ACTION_CONFIG}
