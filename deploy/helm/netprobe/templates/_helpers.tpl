{{/* Object names: "netprobe", "netprobe-agent", … for a release named netprobe. */}}
{{- define "netprobe.fullname" -}}
{{- if contains "netprobe" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-netprobe" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The agent selector: cluster-mode trace finds agents by app.kubernetes.io/name=netprobe. */}}
{{- define "netprobe.selectorLabels" -}}
app.kubernetes.io/name: netprobe
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "netprobe.labels" -}}
{{ include "netprobe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* metrics.address, checked: loopback only (hostNetwork). */}}
{{- define "netprobe.metricsAddress" -}}
{{- if not (regexMatch "^127\\.[0-9]+\\.[0-9]+\\.[0-9]+:[0-9]+$" .Values.metrics.address) -}}
{{- fail (printf "metrics.address %q: must be 127.x.x.x:PORT (the pod shares the node's network; scrape through metrics.rbacProxy)" .Values.metrics.address) -}}
{{- end -}}
{{- .Values.metrics.address -}}
{{- end -}}

{{- define "netprobe.metricsHost" -}}
{{- regexReplaceAll ":[0-9]+$" (include "netprobe.metricsAddress" .) "" -}}
{{- end -}}

{{- define "netprobe.metricsPort" -}}
{{- regexReplaceAll "^.*:" (include "netprobe.metricsAddress" .) "" -}}
{{- end -}}
