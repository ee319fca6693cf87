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
engine.extraArgs unchanged. Call with (dict "root" $ "role" ROLE). Multi-node ("leader", "worker") adds
vLLM's multiprocessing executor across multiNode.size nodes, one pipeline stage per node: every node runs the
same command, the leader as node rank 0 and the workers --headless with their LWS worker index, so
gemmguard's options reach the vLLM processes of every node.
*/}}
{{- define "gemmguard.serveArgs" -}}
{{- $values := .root.Values }}
{{- with $values.engine.model }}
- {{ . | quote }}
{{- end }}
- --host
- 0.0.0.0
- --port
- {{ $values.engine.port | quote }}
- --tensor-parallel-size
- {{ $values.engine.tensorParallelSize | quote }}
{{- if ne .role "server" }}
- --pipeline-parallel-size
- {{ $values.multiNode.size | quote }}
- --distributed-executor-backend
- mp
- --nnodes
- {{ $values.multiNode.size | quote }}
- --node-rank
{{- if eq .role "leader" }}
- "0"
{{- else }}
- $(GEMMGUARD_NODE_RANK)
{{- end }}
# LWS sets LWS_LEADER_ADDRESS in every pod of the group: the leader's stable DNS name.
- --master-addr
- $(LWS_LEADER_ADDRESS)
- --master-port
- {{ $values.multiNode.masterPort | quote }}
{{- if eq .role "worker" }}
- --headless
{{- end }}
{{- end }}
- --selfcheck-policy
- {{ $values.gemmguard.selfcheckPolicy | quote }}
- --selfcheck-refusal-linger
- {{ $values.gemmguard.selfcheckRefusalLinger | quote }}
{{- range $values.gemmguard.denyKernels }}
- --deny-kernel
- {{ . | quote }}
{{- end }}
{{- if not $values.gemmguard.perLayerMetrics }}
- --no-per-layer-metrics
{{- end }}
{{- range $values.engine.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
gemmguard.podSecurityContext: podSecurityContext plus gpu.deviceGroups as supplementalGroups. AMD GPUs
are opened through device files of host groups whose ids vary by host OS, so they must be given.
*/}}
{{- define "gemmguard.podSecurityContext" -}}
{{- $context := deepCopy .Values.podSecurityContext }}
{{- if and (eq .Values.gpu.resourceName "amd.com/gpu") (not .Values.gpu.deviceGroups) }}
{{- fail "gpu.deviceGroups is empty, but AMD GPUs (amd.com/gpu) are opened through /dev/kfd and /dev/dri/renderD*, which belong to the host's video and render groups, whose ids differ by host OS. Find them on a GPU node with `getent group video render` (or `stat -c '%g %n' /dev/kfd /dev/dri/renderD*`) and set them, e.g. --set 'gpu.deviceGroups={44,109}'." }}
{{- end }}
{{- with .Values.gpu.deviceGroups }}
{{- $groups := concat (get $context "supplementalGroups" | default list) . | uniq }}
{{- $_ := set $context "supplementalGroups" $groups }}
{{- end }}
{{- toYaml $context }}
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
# vLLM advertises this address to the other nodes of the group; the pod IP is the one they can reach.
- name: VLLM_HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}
# The pod-lifetime emptyDir of _pod.tpl: liveness and refusal counters survive container restarts.
- name: GEMMGUARD_STATE_DIR
  value: /var/lib/gemmguard
{{- with .Values.engine.env }}
{{ toYaml . }}
{{- end }}
{{- end }}
