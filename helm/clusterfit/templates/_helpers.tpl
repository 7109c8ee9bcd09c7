{{/*
Names. The release is the experiment: objects are named after it. The controller Job takes the
release name itself, or fullnameOverride (Job names must stay within 63 characters, releases
within 53). nameOverride replaces the chart's name in the app.kubernetes.io/name label.
*/}}
{{- define "clusterfit.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "clusterfit.fullname" -}}
{{- .Values.fullnameOverride | default .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- end -}}

{{/*
The config ConfigMap is immutable and named after its content: another config is another ConfigMap,
so a step pod restarted during an upgrade still reads the config its job was created with.
*/}}
{{- define "clusterfit.configMapName" -}}
{{- printf "%s-config-%s" (include "clusterfit.fullname" .) (include "clusterfit.experiment" . | sha256sum | trunc 10) -}}
{{- end -}}

{{/*
The controller Job is named after everything the chart renders from (a Job's pod template cannot
change): a changed value is a new Job, which `helm upgrade` creates in place of the old one, and a
new `rerun` value reruns the pipeline. <fullname>-<8 hex digits> stays within 63 characters.
*/}}
{{- define "clusterfit.controllerJobName" -}}
{{- $revision := printf "%s|%s|%s" (include "clusterfit.experiment" .) (toJson .Values) .Chart.Version | sha256sum | trunc 8 -}}
{{- printf "%s-%s" (include "clusterfit.fullname" .) $revision -}}
{{- end -}}

{{/*
`helm upgrade` refuses while the release's controller runs another revision: it would replace the
running controller and, with the old config's ConfigMap, the step jobs it owns. Cancelled
(suspended), completed and failed controllers are replaced. A lookup of Jobs in the release's own
namespace, which the installing user may read; `helm template` and client dry runs see none.
*/}}
{{- define "clusterfit.refuseRunningUpgrade" -}}
{{- $current := include "clusterfit.controllerJobName" . -}}
{{- $jobs := lookup "batch/v1" "Job" .Release.Namespace "" -}}
{{- range ($jobs.items | default list) -}}
{{- $labels := .metadata.labels | default dict -}}
{{- if and (eq (get $labels "app.kubernetes.io/instance") $.Release.Name) (eq (get $labels "app.kubernetes.io/component") "controller") (ne .metadata.name $current) -}}
{{- $finished := false -}}
{{- range ((.status | default dict).conditions | default list) -}}
{{- if and (has .type (list "Complete" "Failed")) (eq .status "True") -}}{{- $finished = true -}}{{- end -}}
{{- end -}}
{{- if not (or $finished (.spec.suspend | default false)) -}}
{{- fail (printf "release %s is running: its controller Job %s has not finished, and this upgrade would replace it (and delete the step jobs of its config). Wait until it completes (kubectl -n %s wait --for=condition=Complete job/%s), or stop it first (clusterfit cancel config=<the release's config>), then upgrade" $.Release.Name .metadata.name $.Release.Namespace .metadata.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "clusterfit.serviceAccountName" -}}
{{- printf "%s-controller" (include "clusterfit.fullname" .) -}}
{{- end -}}

{{/* The standard labels; `component` says which part of the release an object is. */}}
{{- define "clusterfit.labels" -}}
app.kubernetes.io/name: {{ include "clusterfit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: clusterfit
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "clusterfit.controllerImage" -}}
{{- printf "%s:%s" .Values.controller.image.repository (.Values.controller.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* S3 credentials from the Secret, by reference only; none without s3.secretName (workload identity). */}}
{{- define "clusterfit.s3Env" -}}
{{- if .Values.s3.secretName }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.secretName | quote }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.secretName | quote }}, key: AWS_SECRET_ACCESS_KEY}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.secretName | quote }}, key: AWS_SESSION_TOKEN, optional: true}
{{- end }}
{{- end -}}

{{/* imagePullSecrets of the controller and test pods: the release-wide ones and controller's own. */}}
{{- define "clusterfit.imagePullSecrets" -}}
{{- $names := concat .Values.imagePullSecrets .Values.controller.imagePullSecrets | uniq -}}
{{- if $names }}
imagePullSecrets:
{{- range $names }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The experiment config the controller and every step read: .Values.experiment plus the keys the
release decides (EXPERIMENT.NAME when empty, KUBERNETES.NAMESPACE, KUBERNETES.S3_SECRET_NAME) and
the release-wide pod values the controller passes on to the step pods (podLabels, podAnnotations,
imagePullSecrets, extraVolumes, extraVolumeMounts, terminationGracePeriodSeconds), added to the
experiment's own KUBERNETES keys (the chart's values win on a clash).
*/}}
{{- define "clusterfit.experiment" -}}
{{- $exp := deepCopy (.Values.experiment | default dict) -}}
{{- $meta := deepCopy (get $exp "EXPERIMENT" | default dict) -}}
{{- if not $meta.NAME -}}{{- $_ := set $meta "NAME" .Release.Name -}}{{- end -}}
{{- $_ := set $exp "EXPERIMENT" $meta -}}
{{- $kube := deepCopy (get $exp "KUBERNETES" | default dict) -}}
{{- $_ := set $kube "NAMESPACE" .Release.Namespace -}}
{{- $_ := set $kube "S3_SECRET_NAME" .Values.s3.secretName -}}
{{- range $key, $value := dict "POD_LABELS" .Values.podLabels "POD_ANNOTATIONS" .Values.podAnnotations -}}
{{- if $value -}}{{- $_ := set $kube $key (merge (deepCopy $value) (get $kube $key | default dict)) -}}{{- end -}}
{{- end -}}
{{- range $key, $value := dict "IMAGE_PULL_SECRETS" .Values.imagePullSecrets "VOLUMES" .Values.extraVolumes "VOLUME_MOUNTS" .Values.extraVolumeMounts -}}
{{- if $value -}}{{- $_ := set $kube $key (concat (get $kube $key | default list) $value | uniq) -}}{{- end -}}
{{- end -}}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) -}}
{{- $_ := set $kube "TERMINATION_GRACE_PERIOD_SECONDS" .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- $_ := set $exp "KUBERNETES" $kube -}}
{{- toYaml $exp -}}
{{- end -}}

{{/*
Early failures, each naming the value to fix. Included by every template, so `helm template`
and `helm install` both stop before anything reaches the cluster.
*/}}
{{- define "clusterfit.validate" -}}
{{- if gt (len .Release.Name) 53 -}}
{{- fail (printf "release name %q has %d characters: at most 53 (Helm stores releases in Secrets named after them)" .Release.Name (len .Release.Name)) -}}
{{- end -}}
{{- $exp := include "clusterfit.experiment" . | fromYaml -}}
{{- $root := $exp.EXPERIMENT.ROOT | default "" -}}
{{- if not (hasPrefix "s3://" $root) -}}
{{- fail (printf "experiment.EXPERIMENT.ROOT must be an s3:// URI (got %q): the steps run in separate pods that share nothing but object storage" $root) -}}
{{- end -}}
{{- $name := $exp.EXPERIMENT.NAME -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "experiment.EXPERIMENT.NAME %q (default: the release name) must be a DNS label: lower-case letters, digits and '-', starting with a letter" $name) -}}
{{- end -}}
{{- $steps := list "pretrain" "extract" "cluster" "train" "evaluate" -}}
{{- if and $exp.PIPELINE $exp.PIPELINE.STEPS -}}{{- $steps = $exp.PIPELINE.STEPS -}}{{- end -}}
{{- range $steps -}}
{{- $job := printf "%s-%s" $name . -}}
{{- if gt (len $job) 50 -}}
{{- fail (printf "experiment.EXPERIMENT.NAME %q (default: the release name) is too long: step job %q has %d characters, at most 50" $name $job (len $job)) -}}
{{- end -}}
{{- end -}}
{{- /* Discovery, not a lookup of the (cluster-scoped) CRD: a user allowed only the namespace can install. */ -}}
{{- if .Values.checks.pytorchJobCRD -}}
{{- if not (.Capabilities.APIVersions.Has "kubeflow.org/v1/PyTorchJob") -}}
{{- fail "the cluster does not serve kubeflow.org/v1 PyTorchJob: install the Kubeflow training operator (its CRD) first; to render offline pass --api-versions kubeflow.org/v1/PyTorchJob or set checks.pytorchJobCRD=false" -}}
{{- end -}}
{{- end -}}
{{- end -}}
