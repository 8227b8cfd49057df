{{- define "invariant.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "invariant.labels" -}}
app.kubernetes.io/part-of: invariant
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* An image reference: by digest when one is given (the production way), else by tag. */}}
{{- define "invariant.image" -}}
{{- if .digest -}}
{{ .repository }}@{{ .digest }}
{{- else -}}
{{ .repository }}:{{ .tag }}
{{- end -}}
{{- end -}}

{{- define "invariant.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{ if .Values.redis.tls.enabled }}rediss{{ else }}redis{{ end }}://:$(REDIS_PASSWORD)@{{ include "invariant.fullname" . }}-redis:6379/0
{{- else -}}
{{- $url := required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- if and .Values.redis.tls.enabled (not (hasPrefix "rediss://" $url)) -}}
{{- fail "redis.tls.enabled: redis.externalUrl must be a rediss:// URL" -}}
{{- end -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{- define "invariant.cacheSecret" -}}
{{- .Values.cache.existingSecret | default (printf "%s-cache" (include "invariant.fullname" .)) -}}
{{- end -}}

{{/* What the operator does in a namespace it acts in: its DMs and their status, the worker
     Deployment, Service and NetworkPolicy it applies, the pods it folds into status, events. */}}
{{- define "invariant.operatorNamespacedRules" -}}
- apiGroups: ["invariant.dev"]
  resources: ["deterministicmodels"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["invariant.dev"]
  resources: ["deterministicmodels/status"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch"]
# pods: read, and patched only to set or remove the invariant.dev/serving label (operator/kube.py)
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/* The peers that may call worker pods (JSON, for INVARIANT_OPERATOR_WORKER_INGRESS): this release's
     gateway and operator pods, from the release's namespace, and networkPolicy.workerFrom. */}}
{{- define "invariant.workerIngress" -}}
{{- $peers := list -}}
{{- range $component := list "gateway" "operator" -}}
{{- $peers = append $peers (dict
      "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" $.Release.Namespace))
      "podSelector" (dict "matchLabels" (dict "app.kubernetes.io/instance" $.Release.Name "app.kubernetes.io/component" $component))) -}}
{{- end -}}
{{- concat $peers .Values.networkPolicy.workerFrom | toJson -}}
{{- end -}}

{{/* The TLS Secret (required with redis.tls.enabled). */}}
{{- define "invariant.redisTlsSecret" -}}
{{- required "redis.tls.enabled: set redis.tls.existingSecret to a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt" .Values.redis.tls.existingSecret -}}
{{- end -}}
