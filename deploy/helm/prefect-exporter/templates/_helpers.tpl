{{/*
Names and labels, as Helm's own starter chart and the prometheus-community
exporter charts make them.
*/}}
{{- define "prefect-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
<release>-<chart>, or <release> when it already contains the chart name; 63
characters at most (a DNS label).
*/}}
{{- define "prefect-exporter.fullname" -}}
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

{{- define "prefect-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "prefect-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "prefect-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "prefect-exporter.labels" -}}
helm.sh/chart: {{ include "prefect-exporter.chart" . }}
{{ include "prefect-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
[registry/]repository:tag, the tag defaulting to appVersion (what `make image`
tags besides latest).
*/}}
{{- define "prefect-exporter.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString }}
{{- if .Values.image.registry }}
{{- printf "%s/%s:%s" .Values.image.registry .Values.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Whether the chart makes the credential Secret (prefect.secret has a value), after
refusing the ambiguous case of both a chart-made and an existing Secret.
*/}}
{{- define "prefect-exporter.createSecret" -}}
{{- $s := .Values.prefect.secret }}
{{- if or $s.apiKey $s.authString }}
{{- if .Values.prefect.existingSecret.name }}
{{- fail "prefect.secret and prefect.existingSecret.name are both set: choose one" }}
{{- end }}
{{- true }}
{{- end }}
{{- end }}

{{/* The Secret the credential env refers to, or nothing when there is none. */}}
{{- define "prefect-exporter.secretName" -}}
{{- if include "prefect-exporter.createSecret" . }}
{{- include "prefect-exporter.fullname" . }}
{{- else }}
{{- .Values.prefect.existingSecret.name }}
{{- end }}
{{- end }}

{{/*
The scrape interval: serviceMonitor.interval, else the collection interval (one
default only: config.EXPORTER_INTERVAL).
*/}}
{{- define "prefect-exporter.scrapeInterval" -}}
{{- .Values.serviceMonitor.interval | default (printf "%ss" (toString .Values.config.EXPORTER_INTERVAL)) }}
{{- end }}

{{/*
The job label of the scraped target: the one monitoring/alerts.yaml's
PrefectExporterDown matches (up{job="..."}), read from that file so that the two
cannot differ. Without it the job would be the Service's name.
*/}}
{{- define "prefect-exporter.jobName" -}}
{{- $match := .Files.Get "alerts.yaml" | regexFind "up\\{job=\"[^\"]+\"\\}" }}
{{- if not $match }}
{{- fail "alerts.yaml has no up{job=\"...\"} selector to take the job name from" }}
{{- end }}
{{- $match | trimPrefix "up{job=\"" | trimSuffix "\"}" }}
{{- end }}
