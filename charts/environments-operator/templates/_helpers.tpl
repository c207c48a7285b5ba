{{/* Names, labels and the derived settings shared by the templates. */}}

{{- define "environments-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "environments-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A name derived from the full name, kept within the 63 characters a label or Service allows. */}}
{{- define "environments-operator.suffixed" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "environments-operator.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "environments-operator.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: environments-operator
{{- end }}

{{- define "environments-operator.labels" -}}
{{ include "environments-operator.commonLabels" . }}
{{ include "environments-operator.selectorLabels" . }}
{{- end }}

{{- define "environments-operator.emulatorLabels" -}}
{{ include "environments-operator.commonLabels" . }}
{{ include "environments-operator.emulatorSelectorLabels" . }}
{{- end }}

{{- define "environments-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "environments-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "environments-operator.emulatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "environments-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: emulator
{{- end }}

{{- define "environments-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "environments-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "environments-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "environments-operator.peeringName" -}}
{{- default (include "environments-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{- define "environments-operator.emulatorServiceName" -}}
{{- include "environments-operator.suffixed" (list . "emulator") }}
{{- end }}

{{/* The emulator as worker pods reach it: its Service, by fully qualified name (pods run in other namespaces). */}}
{{- define "environments-operator.emulatorServiceUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "environments-operator.emulatorServiceName" .) .Release.Namespace (int .Values.emulator.port) }}
{{- end }}

{{/* ANTHROPIC_BASE_URL of the operator: the emulator (over loopback when it is a sidecar), else the value. */}}
{{- define "environments-operator.baseUrl" -}}
{{- if .Values.emulator.enabled }}
{{- if eq .Values.emulator.mode "sidecar" }}
{{- printf "http://127.0.0.1:%d" (int .Values.emulator.port) }}
{{- else }}
{{- include "environments-operator.emulatorServiceUrl" . }}
{{- end }}
{{- else }}
{{- .Values.anthropic.baseUrl }}
{{- end }}
{{- end }}

{{/* ANTHROPIC_BASE_URL of worker pods: the value, else the emulator's Service; empty means the operator's own. */}}
{{- define "environments-operator.workerBaseUrl" -}}
{{- if .Values.worker.baseUrl }}
{{- .Values.worker.baseUrl }}
{{- else if .Values.emulator.enabled }}
{{- include "environments-operator.emulatorServiceUrl" . }}
{{- end }}
{{- end }}

{{/* The Secret holding ANTHROPIC_API_KEY, or nothing when no default key is configured. */}}
{{- define "environments-operator.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if or .Values.apiKey.value .Values.emulator.enabled }}
{{- include "environments-operator.suffixed" (list . "api-key") }}
{{- end }}
{{- end }}

{{- define "environments-operator.apiKeySecretKey" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecretKey }}
{{- else }}
{{- "api-key" }}
{{- end }}
{{- end }}

{{/* Fails the render on combinations that would deploy a broken or unsafe operator. */}}
{{- define "environments-operator.validate" -}}
{{- $replicas := int .Values.replicaCount }}
{{- if and (not .Values.peering.enabled) (gt $replicas 1) }}
{{- fail "replicaCount > 1 needs peering.enabled: without kopf peering every replica would handle every resource" }}
{{- end }}
{{- if and (not (kindIs "invalid" .Values.peering.priority)) (gt $replicas 1) }}
{{- fail "peering.priority must be empty (a random priority per pod) when replicaCount > 1: replicas with the same priority all pause" }}
{{- end }}
{{- if and .Values.emulator.enabled .Values.anthropic.baseUrl }}
{{- fail "emulator.enabled and anthropic.baseUrl are exclusive: the emulator is the base URL" }}
{{- end }}
{{- if and .Values.emulator.enabled (eq .Values.emulator.mode "sidecar") (gt $replicas 1) }}
{{- fail "emulator.mode sidecar needs replicaCount 1 (each pod's emulator holds its own state); use emulator.mode deployment" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (lt $replicas 2) }}
{{- fail "podDisruptionBudget.enabled needs replicaCount >= 2: with one replica it would block every node drain" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (eq (int .Values.metrics.port) 0) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.port > 0" }}
{{- end }}
{{- if and .Values.metrics.prometheusRule.enabled (eq (int .Values.metrics.port) 0) }}
{{- fail "metrics.prometheusRule.enabled needs metrics.port > 0: its alerts read the operator's metrics" }}
{{- end }}
{{- if and .Values.metrics.grafanaDashboard.enabled (eq (int .Values.metrics.port) 0) }}
{{- fail "metrics.grafanaDashboard.enabled needs metrics.port > 0: the dashboard shows the operator's metrics" }}
{{- end }}
{{- /* Ports of the operator pod's one network namespace: two servers on one port, one crash-loops. */}}
{{- if eq (int .Values.metrics.port) (int .Values.probes.port) }}
{{- fail "metrics.port and probes.port must differ" }}
{{- end }}
{{- if and .Values.emulator.enabled (eq .Values.emulator.mode "sidecar") (has (int .Values.emulator.port) (list (int .Values.probes.port) (int .Values.metrics.port))) }}
{{- fail "emulator.port must differ from probes.port and metrics.port: the sidecar emulator shares the operator pod's ports" }}
{{- end }}
{{- end }}

{{/*
The rules the operator needs in every namespace it serves: a ClusterRole's in all-namespaces mode, a
Role's in each listed namespace otherwise. Only what the operator calls; see the README's RBAC table.
*/}}
{{- define "environments-operator.namespacedRules" -}}
# Environments and WorkerPools: watched by kopf, which patches them for finalizers and annotations.
- apiGroups: ["managedagents.dev"]
  resources: ["environments", "workerpools"]
  verbs: ["list", "watch", "patch"]
# Their status subresource: conditions and the API's answer.
- apiGroups: ["managedagents.dev"]
  resources: ["environments/status", "workerpools/status"]
  verbs: ["patch"]
# Owner references with blockOwnerDeletion on worker pods and their Secrets (admission plugin
# OwnerReferencesPermissionEnforcement, on by default on OpenShift).
- apiGroups: ["managedagents.dev"]
  resources: ["workerpools/finalizers"]
  verbs: ["update"]
# Worker pods: one per work item, created behind a scheduling gate and released (patch) once the item
# is acknowledged; read back when an item meets its pod again; watched and listed for their phase;
# deleted after their TTL.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Per-work-item Secrets, warm pods' assignments, and the API/environment keys that resources reference.
# watch is never called: RBAC lets the operator create a warm pod's Role (get and watch its assignment
# Secret) only if it holds those permissions itself.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Warm workers (minWorkers): each warm pod runs as a ServiceAccount of its own, whose Role and
# RoleBinding let it get and watch its assignment Secret and nothing else; all three go with the pod.
# Listed to sweep those a crash left without their pod, and when the pool is deleted. Creating a Role is
# bounded by RBAC's escalation check: it may grant only what the operator holds itself.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["list", "create", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["list", "create", "delete"]
# Events reporting what the operator did to a resource (kopf posts them; it never updates one).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
