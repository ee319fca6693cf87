{{/*
gemmguard.name: the chart name, or nameOverride.
*/}}
{{- define "gemmguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
gemmguard.fullname: the name of every resource; the release name alone when it already holds the chart name.
*/}}
{{- define "gemmguard.fullname" -}}
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

{{/*
gemmguard.chart: chart name and version, for the helm.sh/chart label.
*/}}
{{- define "gemmguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
gemmguard.labels: labels of every resource.
*/}}
{{- define "gemmguard.labels" -}}
helm.sh/chart: {{ include "gemmguard.chart" . }}
{{ include "gemmguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
gemmguard.selectorLabels: the immutable selector; only name and instance, so label edits never orphan pods.
*/}}
{{- define "gemmguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gemmguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
gemmguard.serviceAccountName: the ServiceAccount the pods run as.
*/}}
{{- define "gemmguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gemmguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
gemmguard.image: repository with the digest if given, else the tag, which defaults to the chart's appVersion.
*/}}
{{- define "gemmguard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
gemmguard.gpuCount: GPUs per pod; defaults to the tensor-parallel size, since each pod holds one TP group.
*/}}
{{- define "gemmguard.gpuCount" -}}
{{- if kindIs "invalid" .Values.gpu.count }}
{{- .Values.engine.tensorParallelSize }}
{{- else }}
{{- .Values.gpu.count }}
{{- end }}
{{- end }}

{{/*
gemmguard.resources: the resources value with the GPU request added to limits (requests follow limits for
extended resources, and Kubernetes accepts them only when both are equal).
*/}}
{{- define "gemmguard.resources" -}}
{{- $res := deepCopy (.Values.resources | default dict) }}
{{- if .Values.gpu.resourceName }}
{{- $count := include "gemmguard.gpuCount" . | atoi }}
{{- $limits := get $res "limits" | default dict }}
{{- $_ := set $limits .Values.gpu.resourceName $count }}
{{- $_ := set $res "limits" $limits }}
{{- with get $res "requests" }}
{{- $_ := set . $.Values.gpu.resourceName $count }}
{{- end }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
gemmguard.serveArgs: the arguments of `gemmguard serve`, as a YAML list: the model, the chart's flags, then
engine.extraArgs unchanged. Multi-node adds vLLM's Ray executor and one pipeline stage per node.
*/}}
{{- define "gemmguard.serveArgs" -}}
{{- with .Values.engine.model }}
- {{ . | quote }}
{{- end }}
- --host
- 0.0.0.0
- --port
- {{ .Values.engine.port | quote }}
- --tensor-parallel-size
- {{ .Values.engine.tensorParallelSize | quote }}
{{- if .Values.multiNode.enabled }}
- --pipeline-parallel-size
- {{ .Values.multiNode.size | quote }}
- --distributed-executor-backend
- ray
{{- end }}
- --selfcheck-policy
- {{ .Values.gemmguard.selfcheckPolicy | quote }}
{{- range .Values.gemmguard.denyKernels }}
- --deny-kernel
- {{ . | quote }}
{{- end }}
{{- if not .Values.gemmguard.perLayerMetrics }}
- --no-per-layer-metrics
{{- end }}
{{- range .Values.engine.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
gemmguard.env: environment of the server container: secrets by reference only, never their values.
*/}}
{{- define "gemmguard.env" -}}
{{- if .Values.apiKey.existingSecret }}
- name: VLLM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKey.existingSecret }}
      key: {{ .Values.apiKey.secretKey }}
{{- end }}
{{- if .Values.huggingface.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.huggingface.existingSecret }}
      key: {{ .Values.huggingface.secretKey }}
{{- end }}
{{- if .Values.huggingface.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- if .Values.multiNode.enabled }}
# vLLM and Ray advertise this address to the other nodes; the pod IP is the one they can reach.
- name: VLLM_HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}
{{- with .Values.engine.env }}
{{ toYaml . }}
{{- end }}
{{- end }}
