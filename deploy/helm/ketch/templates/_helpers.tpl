{{/* Names, labels and image references shared by the templates. */}}

{{- define "ketch.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ketch.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ketch.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image: a name of Ketch's (ketch, python-sklearn, ...) or a full reference. */}}
{{- define "ketch.image" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- if or (contains ":" $name) (contains "/" $name) -}}
{{- $name -}}
{{- else -}}
{{- printf "%s%s%s:%s" $root.Values.image.registry $root.Values.image.prefix $name (default $root.Chart.AppVersion $root.Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "ketch.broker" -}}{{ include "ketch.fullname" . }}-broker{{- end -}}

{{/* The broker's addresses, as the other pods reach them through its Service. */}}
{{- define "ketch.address" -}}
{{- $root := index . 0 -}}
{{- printf "tcp://%s:%v" (include "ketch.broker" $root) (index $root.Values.broker.ports (index . 1)) -}}
{{- end -}}

{{/* A model entry's Kubernetes name: <fullname>-<name>-v<version>, DNS-safe. */}}
{{- define "ketch.modelName" -}}
{{- $root := index . 0 -}}
{{- $m := index . 1 -}}
{{- printf "%s-%s-v%s" (include "ketch.fullname" $root) $m.name (toString $m.version) | lower | replace "_" "-" | replace "." "-" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ketch.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ketch.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Curve client keys for a pod: env and mounts (gateway or model). */}}
{{- define "ketch.curveEnv" -}}
- name: KETCH_CURVE_SERVER_KEY
  value: /etc/ketch/curve/server/broker.key
- name: KETCH_CURVE_SECRET
  value: {{ printf "/etc/ketch/curve/self/%s" (index . 1) }}
{{- end -}}

{{- define "ketch.curveMounts" -}}
- name: curve-server
  mountPath: /etc/ketch/curve/server
  readOnly: true
- name: curve-self
  mountPath: /etc/ketch/curve/self
  readOnly: true
{{- end -}}

{{- define "ketch.curveVolumes" -}}
{{- $root := index . 0 -}}
- name: curve-server
  secret:
    secretName: {{ $root.Values.curve.brokerSecret }}
    items:
      - key: broker.key
        path: broker.key
- name: curve-self
  secret:
    secretName: {{ index . 1 }}
    defaultMode: 0400
{{- end -}}
