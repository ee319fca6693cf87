{{/*
gemmguard.podSpec: the pod spec shared by the Deployment and both LeaderWorkerSet templates.
Call with (dict "root" $ "role" ROLE); ROLE is "server" (Deployment), "leader" or "worker" (multi-node).
The leader starts the Ray head, waits for every worker node, then runs `gemmguard serve`; workers only join
Ray, so they get no API port and no probes.
*/}}
{{- define "gemmguard.podSpec" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $values := $root.Values }}
{{- with $values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
serviceAccountName: {{ include "gemmguard.serviceAccountName" $root }}
automountServiceAccountToken: {{ $values.serviceAccount.automountToken }}
securityContext:
  {{- toYaml $values.podSecurityContext | nindent 2 }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
containers:
  - name: gemmguard
    image: {{ include "gemmguard.image" $root | quote }}
    imagePullPolicy: {{ $values.image.pullPolicy }}
    {{- if eq $role "server" }}
    command: ["gemmguard", "serve"]
    args:
      {{- include "gemmguard.serveArgs" $root | trim | nindent 6 }}
    {{- else if eq $role "leader" }}
    # bash -c SCRIPT NAME ARGS...: the serve arguments arrive as "$@", so no value is re-parsed by a shell.
    command:
      - /bin/bash
      - -c
      - |
        set -euo pipefail
        ray start --head --port={{ $values.multiNode.rayPort }} --dashboard-host=127.0.0.1 --disable-usage-stats
        # vLLM's Ray executor places the model on the GPUs Ray knows about: wait for all LWS_GROUP_SIZE nodes.
        until [ "$(python3 -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null || echo 0)" -ge "${LWS_GROUP_SIZE}" ]; do
          echo "waiting for ${LWS_GROUP_SIZE} Ray nodes"; sleep 5
        done
        exec gemmguard serve "$@"
      - gemmguard-leader
    args:
      {{- include "gemmguard.serveArgs" $root | trim | nindent 6 }}
    {{- else }}
    command:
      - /bin/bash
      - -c
      - |
        set -euo pipefail
        until ray health-check --address="${LWS_LEADER_ADDRESS}:{{ $values.multiNode.rayPort }}" >/dev/null 2>&1; do
          echo "waiting for the Ray head at ${LWS_LEADER_ADDRESS}"; sleep 5
        done
        exec ray start --address="${LWS_LEADER_ADDRESS}:{{ $values.multiNode.rayPort }}" --block --disable-usage-stats
    {{- end }}
    {{- if ne $role "worker" }}
    ports:
      - name: http
        containerPort: {{ $values.engine.port }}
        protocol: TCP
    {{- end }}
    {{- with (include "gemmguard.env" $root | trim) }}
    env:
      {{- . | nindent 6 }}
    {{- end }}
    {{- with $values.engine.envFrom }}
    envFrom:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- if ne $role "worker" }}
    # Start-up and readiness wait for the GEMM self-check: a pod whose kernels fail it never gets traffic.
    startupProbe:
      httpGet:
        path: /gemmguard/ready
        port: http
      periodSeconds: {{ $values.probes.startup.periodSeconds }}
      failureThreshold: {{ $values.probes.startup.failureThreshold }}
      timeoutSeconds: {{ $values.probes.startup.timeoutSeconds }}
    readinessProbe:
      httpGet:
        path: /gemmguard/ready
        port: http
      periodSeconds: {{ $values.probes.readiness.periodSeconds }}
      failureThreshold: {{ $values.probes.readiness.failureThreshold }}
      timeoutSeconds: {{ $values.probes.readiness.timeoutSeconds }}
    livenessProbe:
      httpGet:
        path: {{ $values.probes.liveness.path }}
        port: http
      periodSeconds: {{ $values.probes.liveness.periodSeconds }}
      failureThreshold: {{ $values.probes.liveness.failureThreshold }}
      timeoutSeconds: {{ $values.probes.liveness.timeoutSeconds }}
    {{- end }}
    resources:
      {{- include "gemmguard.resources" $root | nindent 6 }}
    securityContext:
      {{- toYaml $values.securityContext | nindent 6 }}
    volumeMounts:
      - name: cache
        mountPath: /cache
      - name: tmp
        mountPath: /tmp
      - name: home
        mountPath: /home/gemmguard
      - name: shm
        mountPath: /dev/shm
      {{- with $values.extraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
volumes:
  # Models and JIT caches (HF_HOME, VLLM_CACHE_ROOT, Triton, DeepGEMM, AITER: all under /cache in the images).
  - name: cache
    {{- if $values.persistence.enabled }}
    persistentVolumeClaim:
      claimName: {{ $values.persistence.existingClaim | default (include "gemmguard.fullname" $root) }}
    {{- else }}
    emptyDir: {}
    {{- end }}
  # Writable scratch under the read-only root filesystem: Ray's session files and Python's tempfile in /tmp,
  # dot-files that libraries write to $HOME.
  - name: tmp
    emptyDir: {}
  - name: home
    emptyDir: {}
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $values.shm.sizeLimit }}
  {{- with $values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
gemmguard.podMetadata: labels and annotations of every server pod; ROLE becomes app.kubernetes.io/component.
*/}}
{{- define "gemmguard.podMetadata" -}}
{{- $root := .root }}
labels:
  {{- include "gemmguard.labels" $root | nindent 2 }}
  app.kubernetes.io/component: {{ .role }}
  {{- with $root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
