{{- define "dpo-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dpo-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dpo-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dpo-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dpo-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dpo-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Rules the operator needs inside every namespace it manages. */}}
{{- define "dpo-operator.applicationRules" -}}
# Application: the DPOJobs themselves, read from the watch cache only (no get).
- apiGroups: ["dpo.dev"]
  resources: ["dpojobs"]
  verbs: ["list", "watch"]
# Application: a DPOSweep creates its trials (DPOJobs) and approves its winner (an annotation).
- apiGroups: ["dpo.dev"]
  resources: ["dpojobs"]
  verbs: ["create", "patch"]
# Application: DPOSweeps, read from the watch cache only.
- apiGroups: ["dpo.dev"]
  resources: ["dposweeps"]
  verbs: ["list", "watch"]
# Application: status is written through the status subresource only.
- apiGroups: ["dpo.dev"]
  resources: ["dpojobs/status", "dposweeps/status"]
  verbs: ["patch"]
# Application: training, eval-gate and promote Jobs, and a sweep's chooser; patched to suspend, deleted to restart a
# group or after TTL; read (get) only when a create conflicts, to see whose the object is.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Application: pod status tells exit codes and termination messages; never logs.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Application: the trainer config (patched after a spec edit) and the rendezvous Service of
# each DPOJob.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Application: one NetworkPolicy per namespace with DPOJobs, fencing the trainers' ports.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create"]
# Framework and application: kopf and the operator post Events on DPOJobs.
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
