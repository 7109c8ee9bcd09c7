{{/*
Names. The release is the experiment: objects are named after it. The controller Job takes the
release name itself (Job names must stay within 63 characters, releases within 53).
*/}}
{{- define "clusterfit.fullname" -}}
{{- .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- end -}}

{{- define "clusterfit.configMapName" -}}
{{- printf "%s-config" (include "clusterfit.fullname" .) -}}
{{- end -}}

{{- define "clusterfit.serviceAccountName" -}}
{{- printf "%s-controller" (include "clusterfit.fullname" .) -}}
{{- end -}}

{{/* The standard labels; `component` says which part of the release an object is. */}}
{{- define "clusterfit.labels" -}}
app.kubernetes.io/name: clusterfit
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: clusterfit
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "clusterfit.controllerImage" -}}
{{- printf "%s:%s" .Values.controller.image.repository (.Values.controller.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* S3 credentials from the Secret, by reference only. */}}
{{- define "clusterfit.s3Env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.secretName | quote }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.secretName | quote }}, key: AWS_SECRET_ACCESS_KEY}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.secretName | quote }}, key: AWS_SESSION_TOKEN, optional: true}
{{- end -}}

{{/*
The experiment config the controller and every step read: .Values.experiment plus the three keys
the release decides (EXPERIMENT.NAME when empty, KUBERNETES.NAMESPACE, KUBERNETES.S3_SECRET_NAME).
*/}}
{{- define "clusterfit.experiment" -}}
{{- $exp := deepCopy (.Values.experiment | default dict) -}}
{{- $meta := deepCopy (get $exp "EXPERIMENT" | default dict) -}}
{{- if not $meta.NAME -}}{{- $_ := set $meta "NAME" .Release.Name -}}{{- end -}}
{{- $_ := set $exp "EXPERIMENT" $meta -}}
{{- $kube := deepCopy (get $exp "KUBERNETES" | default dict) -}}
{{- $_ := set $kube "NAMESPACE" .Release.Namespace -}}
{{- $_ := set $kube "S3_SECRET_NAME" .Values.s3.secretName -}}
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
{{- if not .Values.s3.secretName -}}
{{- fail "s3.secretName is required: the name of a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (see k8s/s3-secret.example.yaml)" -}}
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
{{- if .Values.checks.pytorchJobCRD -}}
{{- $crd := lookup "apiextensions.k8s.io/v1" "CustomResourceDefinition" "" "pytorchjobs.kubeflow.org" -}}
{{- if and (not $crd) (not (.Capabilities.APIVersions.Has "kubeflow.org/v1/PyTorchJob")) -}}
{{- fail "the cluster does not serve kubeflow.org/v1 PyTorchJob: install the Kubeflow training operator (its CRD) first; to render offline pass --api-versions kubeflow.org/v1/PyTorchJob or set checks.pytorchJobCRD=false" -}}
{{- end -}}
{{- end -}}
{{- end -}}
