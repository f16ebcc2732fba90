{{/* Prometheus Operator objects (values under `monitoring`). */}}

{{/* The Secret holding kube-rbac-proxy's serving certificate; empty: a self-signed one. */}}
{{- define "netprobe.metricsTlsSecret" -}}
{{- if .Values.monitoring.tls.secretName -}}
{{- .Values.monitoring.tls.secretName -}}
{{- else if .Values.monitoring.tls.certManager.enabled -}}
{{- printf "%s-metrics-tls" (include "netprobe.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The name Prometheus verifies the proxy's certificate against. */}}
{{- define "netprobe.metricsServerName" -}}
{{- .Values.monitoring.tls.serverName | default (printf "%s-metrics.%s.svc" (include "netprobe.fullname" .) .Release.Namespace) -}}
{{- end -}}

{{/* Refuses a monitor that could only scrape with insecureSkipVerify, or without the proxy. */}}
{{- define "netprobe.monitorRequirements" -}}
{{- if not .Values.metrics.rbacProxy.enabled -}}
{{- fail "monitoring.serviceMonitor/podMonitor scrape through kube-rbac-proxy: set metrics.rbacProxy.enabled=true" -}}
{{- end -}}
{{- if not (include "netprobe.metricsTlsSecret" .) -}}
{{- fail "monitoring.serviceMonitor/podMonitor verify the proxy's certificate (no insecureSkipVerify): set monitoring.tls.secretName or monitoring.tls.certManager.enabled" -}}
{{- end -}}
{{- end -}}

{{/* One scrape endpoint: HTTPS to kube-rbac-proxy, the scraper's token, the CA and name checked. */}}
{{- define "netprobe.scrapeEndpoint" -}}
port: https-metrics
scheme: https
path: /metrics
interval: {{ .monitor.interval }}
scrapeTimeout: {{ .monitor.scrapeTimeout }}
authorization:
  type: Bearer
  credentials:
    name: {{ include "netprobe.fullname" .root }}-scraper-token
    key: token
tlsConfig:
  serverName: {{ include "netprobe.metricsServerName" .root }}
  ca:
    secret:
      name: {{ .root.Values.monitoring.tls.ca.secretName | default (include "netprobe.metricsTlsSecret" .root) }}
      key: {{ .root.Values.monitoring.tls.ca.key }}
relabelings:
  # The agent's node (the pods are hostNetwork: their address is the node's).
  - sourceLabels: [__meta_kubernetes_pod_node_name]
    targetLabel: node
{{- end -}}

{{/* The Service <fullname>-metrics is rendered (the ServiceMonitor and `helm test` need it). */}}
{{- define "netprobe.metricsService" -}}
{{- if and .Values.metrics.rbacProxy.enabled (or .Values.monitoring.service.enabled .Values.monitoring.serviceMonitor.enabled) }}true{{ end }}
{{- end }}
