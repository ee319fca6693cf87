{{/*
gemmguard.podSpec: the pod spec shared by the Deployment and both LeaderWorkerSet templates.
Call with (dict "root" $ "role" ROLE); ROLE is "server" (Deployment), "leader" or "worker" (multi-node).
Every role runs `gemmguard serve` with the same arguments and environment, so each node's vLLM processes
(workers included) see the same gemmguard settings: the leader as node rank 0 with the API server, the
workers `--headless` (no API: /metrics alone on the port; no probes) with their LWS worker index as node rank.
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
  {{- include "gemmguard.podSecurityContext" $root | nindent 2 }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
containers:
  - name: gemmguard
    image: {{ include "gemmguard.image" $root | quote }}
    imagePullPolicy: {{ $values.image.pullPolicy }}
    command: ["gemmguard", "serve"]
    args:
      {{- include "gemmguard.serveArgs" (dict "root" $root "role" $role) | trim | nindent 6 }}
    # Every role: the API and /metrics on the leader (or the Deployment's pod); on a headless
    # worker, /metrics alone (its node's build, restarts, and the refusal linger).
    ports:
      - name: http
        containerPort: {{ $values.engine.port }}
        protocol: TCP
    env:
      {{- include "gemmguard.env" $root | trim | nindent 6 }}
      {{- if eq $role "worker" }}
      # The node rank of a worker is its index in the LWS group (the leader is 0); --node-rank reads it.
      - name: GEMMGUARD_NODE_RANK
        valueFrom:
          fieldRef:
            fieldPath: metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']
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
      - name: state
        mountPath: /var/lib/gemmguard
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
    emptyDir:
      sizeLimit: {{ $values.persistence.emptyDirSizeLimit }}
    {{- end }}
  # Writable scratch under the read-only root filesystem: Python's tempfile and torch's compile
  # artefacts in /tmp, dot-files that libraries write to $HOME.
  - name: tmp
    emptyDir: {}
  - name: home
    emptyDir: {}
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $values.shm.sizeLimit }}
  # GEMMGUARD_STATE_DIR: counters that must outlive a container restart (canary failures, restarts,
  # refusals). An emptyDir lives as long as the pod, through container restarts, and no longer.
  - name: state
    emptyDir:
      sizeLimit: 16Mi
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
